"""Fixtures for the engine's tests: a tiny GPT-2 built here, and what the real default
model (`default_engine` in tests/conftest.py) cached."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from bot.model.hf import HFEngine

_SENTENCES = [
    "User: Hello there, how are you today?",
    "Assistant: I am fine, thank you. How can I help you?",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "A small model trained on a few sentences only knows a few words.",
    "Be nice. Be brief. Answer the question clearly.",
]


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 with random weights (2 layers, 128 positions) and a byte-level BPE
    tokenizer trained on a few sentences, saved as a model directory. No chat template,
    nothing downloaded."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_SENTENCES, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(out)

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        initializer_range=0.2,  # peaked logits: no near-ties between greedy candidates
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def gpt2_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model cache `gpt2` was loaded with (a model directory needs none)."""
    return tmp_path_factory.mktemp("unused-cache")


@pytest.fixture(scope="session")
def gpt2(tiny_gpt2_dir: Path, gpt2_cache_dir: Path) -> Iterator[HFEngine]:
    """The tiny GPT-2 as an engine, shared: every test leaves it with nothing active."""
    from bot.model.hf import load_engine

    engine = load_engine(str(tiny_gpt2_dir), cache_dir=gpt2_cache_dir)
    yield engine
    assert engine.step() == {}  # nothing is left active


@pytest.fixture(scope="session")
def default_model_dir(default_engine: HFEngine, model_cache_dir: Path) -> Path:
    """The de-quantized default model as a model directory: the one entry of the cache
    the first load filled."""
    (cached,) = model_cache_dir.iterdir()
    return cached


@pytest.fixture(scope="session")
def im_end(default_model_dir: Path) -> int:
    """The id of SmolLM2's end-of-turn token, from the tokenizer saved in the cache."""
    from transformers import AutoTokenizer

    token_id = AutoTokenizer.from_pretrained(default_model_dir).convert_tokens_to_ids("<|im_end|>")
    assert isinstance(token_id, int)
    return token_id
