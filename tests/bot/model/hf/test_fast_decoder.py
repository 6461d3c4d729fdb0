"""Compiling the fast decode step (bot/model/hf/fast_decoder.py): which models and
settings get it, and the default model's compiled graphs against the transformers
model (float32 exact, float16 recorded)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.errors import ModelLoadError
from bot.model.hf import HFEngine, load_engine
from tests.bot.model.hf.drive import (
    GREEDY,
    QUESTIONS,
    chat_prompt,
    reference_greedy,
    run_alone,
    run_batch,
    tiny_llama,
)


@pytest.mark.parametrize("weight_dtype", ["float32", "float16"])
def test_every_batch_size_has_a_graph(tiny_gpt2_dir: Path, tmp_path: Path, weight_dtype: str) -> None:
    from bot.model.hf.fast_decoder import FastDecoder, FastStepConfig
    from bot.model.hf.fast_step import KERNELS, graph_for, kernel_for

    model, _ = tiny_llama(tiny_gpt2_dir, 4, 2, 16, False)
    config = FastStepConfig("auto", weight_dtype, tmp_path, 1)  # type: ignore[arg-type]
    decoder = FastDecoder(model, context_length=128, config=config, compiled=False)
    for rows in range(1, max(start for start, _ in KERNELS[config.weight_dtype]) + 2):
        assert decoder.usable(rows), rows
        step = decoder.graph(graph_for(rows, config.weight_dtype))
        assert step.kernel == kernel_for(rows, config.weight_dtype)  # type: ignore[attr-defined]


def test_architectures_outside_the_llama_family_take_the_hf_path(
    tiny_gpt2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="bot.model.hf.loader"):
        engine = load_engine(str(tiny_gpt2_dir), cache_dir=tmp_path, compile_mode="auto")
    assert engine.decode_path == "hf"
    assert not engine.wait_for_fast_step(0)
    assert any("not in the Llama family" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [({"compile_mode": "always"}, "MODEL_COMPILE"), ({"weight_dtype": "int8"}, "MODEL_WEIGHT_DTYPE")],
)
def test_bad_fast_step_settings_name_the_setting(
    tiny_gpt2_dir: Path, tmp_path: Path, kwargs: dict[str, str], setting: str
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_engine(
            str(tiny_gpt2_dir),
            cache_dir=tmp_path,
            compile_mode=kwargs.get("compile_mode", "off"),
            weight_dtype=kwargs.get("weight_dtype", "float16"),
        )
    assert caught.value.setting == setting


# --------------------------------------------------------------------------- the default model, compiled

# A cold compile of the graphs takes a minute or more on 2 busy cores (once per session).
COMPILE_TIMEOUT = 1500


@pytest.fixture(scope="session")
def compiled_engine(default_engine: HFEngine, model_cache_dir: Path) -> Iterator[HFEngine]:
    """The default model with the compiled step and float32 weights, compiled once per
    session (the inductor cache lives in the session's model cache)."""
    engine = load_engine(None, cache_dir=model_cache_dir, compile_mode="auto", weight_dtype="float32")
    assert engine.wait_for_fast_step(COMPILE_TIMEOUT), "the decode step did not compile"
    yield engine


@pytest.mark.model
@pytest.mark.timeout(COMPILE_TIMEOUT)
def test_compiled_step_greedy_matches_transformers_generate(compiled_engine: HFEngine, default_model_dir: Path) -> None:
    assert compiled_engine.decode_path == "fast"
    for question in QUESTIONS[:2]:
        prompt = chat_prompt(compiled_engine, question)
        assert run_alone(compiled_engine, prompt, 40) == reference_greedy(default_model_dir, prompt, 40)


@pytest.mark.model
@pytest.mark.timeout(COMPILE_TIMEOUT)
def test_compiled_step_runs_past_the_spare_cache_columns_without_recompiling(compiled_engine: HFEngine) -> None:
    from torch._dynamo.utils import counters

    from bot.model.hf.kv_cache import SLACK_COLUMNS

    prompt = chat_prompt(compiled_engine, QUESTIONS[1])
    run_alone(compiled_engine, prompt, 3)
    graphs = counters["stats"]["unique_graphs"]
    # The cache fills its spare columns and is grown (a full cache once made the
    # step's guards fail: a recompile of minutes in the middle of a reply).
    assert len(run_alone(compiled_engine, prompt, SLACK_COLUMNS + 8)) == SLACK_COLUMNS + 8
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.model
@pytest.mark.timeout(COMPILE_TIMEOUT)
def test_compiled_step_batch_with_late_joiners_matches_each_alone(compiled_engine: HFEngine) -> None:
    from bot.model.hf.fast_step import KERNELS, graph_for

    # Rows: `base`, two joining between steps (crossing into the last kernel's range),
    # then the two late joiners alone at the end, then the last one: every float32 graph.
    base = KERNELS["float32"][-1][0] - 2
    counts = {base, base + 1, base + 2, 2, 1}
    assert {graph_for(r, "float32") for r in counts} == {"one", *(k for start, k in KERNELS["float32"] if start > 1)}
    topics = ["the sea", "a cat", "spring", "a robot", "a village", "a library", "rain", "a train", "the moon"]
    questions = [f"{verb} {topic}." for verb in ("Describe", "Praise", "Explain") for topic in topics]
    prompts = {i: chat_prompt(compiled_engine, q) for i, q in enumerate(questions[: base + 2])}
    n = 12
    alone = {i: run_alone(compiled_engine, p, n) for i, p in prompts.items()}
    late = {base: 3, base + 1: 6}
    together = run_batch(compiled_engine, {i: (p, GREEDY) for i, p in prompts.items()}, n, join_at=late)
    assert together == alone


@pytest.mark.model
@pytest.mark.timeout(COMPILE_TIMEOUT)
def test_float16_weights_agree_with_float32_and_know_paris(
    compiled_engine: HFEngine, model_cache_dir: Path, record_property: Any
) -> None:
    half = load_engine(None, cache_dir=model_cache_dir, compile_mode="auto", weight_dtype="float16")
    assert half.wait_for_fast_step(COMPILE_TIMEOUT), "the float16 decode step did not compile"
    n = 32
    agreement: list[int] = []
    for question in QUESTIONS:
        prompt = chat_prompt(half, question)
        exact, approx = run_alone(compiled_engine, prompt, n), run_alone(half, prompt, n)
        same = next((i for i, (a, b) in enumerate(zip(exact, approx, strict=True)) if a != b), n)
        agreement.append(same)
    record_property("float16_tokens_equal_to_float32", agreement)
    logging.getLogger(__name__).info("float16 vs float32: leading equal tokens %s of %d", agreement, n)
    answer = half.decode(run_alone(half, chat_prompt(half, QUESTIONS[0]), 12))
    assert "Paris" in answer
