"""The fast decode step (bot/model/hf/fast_step.py): its maths against the transformers
forward on tiny random Llama models (run eagerly: the same code inductor
compiles; `test_fast_decoder` runs it compiled with the real default model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bot.events import ChatTurn
from bot.model.hf import HFEngine
from tests.bot.model.hf.drive import GREEDY, run_alone, run_batch, tiny_llama

# (query heads, key/value heads, head size, tied embeddings)
TINY_LLAMAS = [
    pytest.param(4, 2, 16, True, id="gqa-hd16-tied"),
    pytest.param(4, 4, 32, False, id="mha-hd32-untied"),
    pytest.param(8, 2, 8, False, id="gqa4-hd8-untied"),
    pytest.param(6, 3, 64, True, id="gqa-hd64-tied"),
]


def _engine(model: Any, tokenizer: Any, tmp_path: Path, weight_dtype: str = "float32") -> HFEngine:
    """The engine around `model` with the fast step run eagerly (no compiler)."""
    import torch

    from bot.model.hf.chat_template import ChatTokenizer
    from bot.model.hf.fast_decoder import FastDecoder, FastStepConfig

    config = FastStepConfig("auto", weight_dtype, tmp_path, 1)  # type: ignore[arg-type]
    fast = FastDecoder(model, context_length=128, config=config, compiled=False)
    return HFEngine(
        model,
        ChatTokenizer(tokenizer, None),
        context_length=128,
        device=torch.device("cpu"),
        loaded_from="directory",
        fast=fast,
    )


def _generate(model: Any, prompt: list[int], n: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "tied"), TINY_LLAMAS)
@pytest.mark.parametrize("kernel", ["mulsum", "matmul_wx", "matmul_xw"])
def test_tiny_llama_step_logits_match_the_transformers_forward(
    tiny_gpt2_dir: Path, heads: int, kv_heads: int, head_dim: int, tied: bool, kernel: str
) -> None:
    import torch

    from bot.model.hf.fast_step import LlamaDecodeStep

    model, _ = tiny_llama(tiny_gpt2_dir, heads, kv_heads, head_dim, tied)
    step = LlamaDecodeStep(model, context_length=128, weight_dtype="float32", kernel=kernel)  # type: ignore[arg-type]
    torch.manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (3, 11))
    with torch.inference_mode():
        expected = model(prompt).logits[:, -1]
        past = model(prompt[:, :-1], use_cache=True).past_key_values
        # buffers with spare columns, as the engine's cache has them
        kv: list[torch.Tensor] = []
        for layer in past.layers:
            for t in (layer.keys, layer.values):
                buffer = torch.full((*t.shape[:2], t.shape[2] + 5, t.shape[3]), float("nan"))
                buffer[:, :, : t.shape[2]] = t
                kv.append(buffer)
        positions = torch.full((3,), 10)
        logits, keys, values = step(prompt[:, -1], positions, torch.ones(3, 10, dtype=torch.bool), kv)
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    full = model(prompt, use_cache=True).past_key_values
    torch.testing.assert_close(keys, torch.stack([layer.keys[:, :, -1] for layer in full.layers]))
    torch.testing.assert_close(values, torch.stack([layer.values[:, :, -1] for layer in full.layers]))


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "tied"), TINY_LLAMAS)
def test_tiny_llama_greedy_is_identical_to_generate_alone_and_in_a_batch_with_late_joiners(
    tiny_gpt2_dir: Path, tmp_path: Path, heads: int, kv_heads: int, head_dim: int, tied: bool
) -> None:
    model, tokenizer = tiny_llama(tiny_gpt2_dir, heads, kv_heads, head_dim, tied)
    engine = _engine(model, tokenizer, tmp_path)
    questions = ["Hello", "The quick brown fox jumps over the lazy dog.", "Paris is", "A small model"]
    prompts = {i: engine.render_chat("Be nice.", [ChatTurn("user", q)]) for i, q in enumerate(questions)}
    n = 12
    reference = {i: _generate(model, p, n) for i, p in prompts.items()}
    assert engine.decode_path == "fast"  # the fast step (run eagerly here) decodes
    alone = {i: run_alone(engine, p, n) for i, p in prompts.items()}
    assert alone == reference
    together = run_batch(engine, {i: (p, GREEDY) for i, p in prompts.items()}, n, join_at={2: 3, 3: 5})
    assert together == reference


def test_float16_weights_tiny_llama_agree_with_float32(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = tiny_llama(tiny_gpt2_dir, 4, 2, 16, False)
    prompt = tokenizer.encode("Paris is the capital of")
    exact = run_alone(_engine(model, tokenizer, tmp_path, "float32"), prompt, 10)
    half = run_alone(_engine(model, tokenizer, tmp_path, "float16"), prompt, 10)
    assert exact == _generate(model, prompt, 10)
    assert half[0] == exact[0]  # the same first answer; later tokens are recorded, not promised
