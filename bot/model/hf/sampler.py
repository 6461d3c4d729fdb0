"""Each row's next token: the argmax for greedy rows, else temperature and top-p
sampling with the row's own generator, so a seeded request draws the same tokens
alone or in any batch."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bot.ports import SamplingParams


@dataclass(frozen=True, slots=True)
class RowSampler:
    """How one row of the batch picks its tokens."""

    params: SamplingParams
    generator: torch.Generator | None  # None for greedy

    @classmethod
    def for_params(cls, params: SamplingParams, device: torch.device) -> RowSampler:
        """Greedy at temperature 0; otherwise a generator seeded with `params.seed`
        (a random seed when None)."""
        if params.temperature <= 0:
            return cls(params, None)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return cls(params, generator)


def sample(logits: torch.Tensor, rows: Sequence[RowSampler]) -> list[int]:
    """One token per row of `logits` ``[rows, vocab]``, each as its `RowSampler` says."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if row.generator is not None]
    if sampled:
        index = torch.tensor(sampled, dtype=torch.long, device=logits.device)
        temps = torch.tensor([rows[i].params.temperature for i in sampled], dtype=torch.float32, device=logits.device)
        probs = torch.softmax(logits[index].float() / temps[:, None], dim=-1)
        probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always the top token).
        top_p = torch.tensor(
            [_top_p_threshold(rows[i].params.top_p) for i in sampled],
            dtype=torch.float32,
            device=logits.device,
        )
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p[:, None], 0.0)
        for j, i in enumerate(sampled):
            choice = torch.multinomial(probs[j], 1, generator=rows[i].generator)
            tokens[i] = order[j, choice[0]]
    return [int(t) for t in tokens.tolist()]


def _top_p_threshold(top_p: float) -> float:
    """1 keeps every token (no cumulative sum reaches infinity); never 0 (keeps none)."""
    return float("inf") if top_p >= 1 else max(top_p, 1e-6)
