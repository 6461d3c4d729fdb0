"""Fixtures for tests/bot. (The real default model is `default_engine` in tests/conftest.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

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
