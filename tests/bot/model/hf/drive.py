"""Driving an engine the way the worker does, and transformers' own greedy decoding
to compare with."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bot.events import ChatTurn
from bot.model.hf import HFEngine
from bot.ports import SamplingParams

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
    once they have `n` tokens. Every step answers exactly the active sequences."""
    join_at = join_at or {}
    remove_at = remove_at or {}
    out: dict[int, list[int]] = {}
    active: set[int] = set()

    def admit(ids: list[int]) -> None:
        if ids:
            for seq_id, token in engine.add([(i, *requests[i]) for i in ids]).items():
                out[seq_id] = [token]
                active.add(seq_id)

    try:
        admit([i for i in requests if i not in join_at])
        steps = 0
        while active or any(i not in out for i in requests):
            admit([i for i, at in join_at.items() if at == steps])
            tokens = engine.step()
            assert set(tokens) == active
            for seq_id, token in tokens.items():
                out[seq_id].append(token)
            steps += 1
            done = [i for i in active if len(out[i]) >= n or remove_at.get(i) == steps]
            engine.remove(done)
            active.difference_update(done)
    finally:
        engine.remove(list(active))
    return out


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


def tiny_llama(tokenizer_dir: Path, heads: int, kv_heads: int, head_dim: int, tied: bool) -> Any:
    """A random 3-layer Llama (with the test tokenizer) of the given attention shape."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(heads * 100 + kv_heads * 10 + head_dim)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        initializer_range=0.3,  # peaked logits: no near-ties between greedy candidates
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model: Any = LlamaForCausalLM(config)
    model.eval()
    model.generation_config.eos_token_id = None
    return model, tokenizer
