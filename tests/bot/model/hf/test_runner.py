"""The continuous batch: sequences join and leave between steps, and a batch gives
each sequence exactly what it would get alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.errors import GenerationError
from bot.events import ChatTurn
from bot.model.hf import HFEngine
from bot.model.scheduler import Worker
from bot.ports import GenerationParams
from tests.bot.model.hf.drive import GREEDY, QUESTIONS, chat_prompt, reference_greedy, run_alone, run_batch

# --------------------------------------------------------------------------- a tiny GPT-2


def test_gpt2_batch_with_left_padding_matches_each_sequence_alone(gpt2: HFEngine) -> None:
    questions = ["Hello", "The quick brown fox jumps over the lazy dog.", "Paris is", "A small model"]
    prompts = {i: gpt2.render_chat("Be nice.", [ChatTurn("user", q)]) for i, q in enumerate(questions)}
    assert len({len(p) for p in prompts.values()}) == 4
    n = 20
    alone = {i: run_alone(gpt2, p, n) for i, p in prompts.items()}
    together = run_batch(gpt2, {i: (p, GREEDY) for i, p in prompts.items()}, n, join_at={2: 3, 3: 7})
    assert together == alone


async def test_gpt2_is_never_given_a_prompt_that_fills_the_context(gpt2: HFEngine) -> None:
    # The worker's admission is the one check of a prompt's length.
    almost = [1] * (gpt2.context_length - 1)
    assert run_alone(gpt2, almost, 1)[0] not in gpt2.eos_token_ids
    params = GenerationParams(max_new_tokens=5)
    async with Worker(gpt2) as worker:
        with pytest.raises(GenerationError):
            await anext(worker.generate([1] * gpt2.context_length, params))
        chunks = [chunk async for chunk in worker.generate(almost, params)]
    assert gpt2.step() == {}  # nothing was left in the batch
    assert sum(chunk.tokens for chunk in chunks) == 1  # room for one token
    assert chunks[-1].finish_reason == "length"


def test_a_row_that_reached_the_context_length_must_leave_before_the_next_step(gpt2: HFEngine) -> None:
    try:
        gpt2.add([(1, [1] * (gpt2.context_length - 1), GREEDY), (2, [1, 2], GREEDY)])
        gpt2.step()  # row 1 now holds `context_length` tokens
        assert gpt2.kv_cache_capacity == gpt2.context_length
        with pytest.raises(GenerationError, match="reached the context length"):
            gpt2.step()
        assert gpt2.kv_cache_capacity == gpt2.context_length  # the cache never outgrows the context
        gpt2.remove([1])
        assert list(gpt2.step()) == [2]  # the others go on
    finally:
        gpt2.remove([1, 2])


def test_failed_add_adds_none_of_the_requests(gpt2: HFEngine) -> None:
    good = gpt2.encode("Hello there")
    with pytest.raises(GenerationError):
        gpt2.add([(1, good, GREEDY), (2, [], GREEDY)])
    assert gpt2.step() == {}  # nothing is active


def test_the_heap_goes_back_to_the_os_when_the_batch_empties_not_while_rows_remain(
    gpt2: HFEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.model.hf import runner

    trims: list[int] = []

    def trim() -> bool:
        trims.append(len(gpt2.step()))  # rows still in the batch when memory is handed back
        return True

    monkeypatch.setattr(runner, "return_free_memory", trim)
    prompt = gpt2.encode("Hello there")
    gpt2.add([(1, prompt, GREEDY), (2, prompt, GREEDY)])
    gpt2.remove([1])
    assert trims == []  # row 2 still runs
    gpt2.remove([2])
    assert trims == [0]  # trimmed once the batch was empty


def test_step_with_nothing_active_returns_nothing(gpt2: HFEngine) -> None:
    assert gpt2.step() == {}


def test_adding_an_active_sequence_id_again_is_an_error(gpt2: HFEngine) -> None:
    ids = gpt2.encode("Hello")
    try:
        gpt2.add([(5, ids, GREEDY)])
        with pytest.raises(GenerationError):
            gpt2.add([(5, ids, GREEDY)])
        assert list(gpt2.step()) == [5]  # only the first one is active
    finally:
        gpt2.remove([5])


# --------------------------------------------------------------------------- the default model


@pytest.mark.model
def test_default_model_matches_transformers_generate(default_engine: HFEngine, default_model_dir: Path) -> None:
    prompt = chat_prompt(default_engine, QUESTIONS[2])
    assert run_alone(default_engine, prompt, 40) == reference_greedy(default_model_dir, prompt, 40)


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
