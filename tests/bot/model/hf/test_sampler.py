"""Choosing each row's next token: greedy, temperature and top-p, seeds."""

from __future__ import annotations

import pytest
import torch

from bot.model.hf import HFEngine
from bot.model.hf.sampler import RowSampler, sample
from bot.ports import SamplingParams
from tests.bot.model.hf.drive import GREEDY, QUESTIONS, chat_prompt, run_alone, run_batch

CPU = torch.device("cpu")


def sampler(temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> RowSampler:
    return RowSampler.for_params(SamplingParams(temperature=temperature, top_p=top_p, seed=seed), CPU)


def flat_logits(rows: int, vocab: int = 50) -> torch.Tensor:
    return torch.zeros((rows, vocab))


def test_greedy_rows_take_the_argmax_and_need_no_generator() -> None:
    rows = [sampler(), sampler()]
    assert [row.generator for row in rows] == [None, None]
    assert sample(torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]]), rows) == [1, 0]


def test_a_seeded_row_draws_the_same_tokens_alone_and_beside_other_rows() -> None:
    def draws(batch: list[RowSampler], row: int) -> list[int]:
        return [sample(flat_logits(len(batch)), batch)[row] for _ in range(20)]

    alone = draws([sampler(1.0, seed=7)], 0)
    assert len(set(alone)) > 1  # it does sample
    assert draws([sampler(), sampler(0.5, seed=3), sampler(1.0, seed=7)], 2) == alone
    assert draws([sampler(1.0, seed=8)], 0) != alone


def test_a_tiny_top_p_keeps_only_the_top_token() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.5, 0.9]])
    assert {sample(logits, [sampler(1.0, top_p=1e-9, seed=seed)])[0] for seed in range(20)} == {1}


def test_top_p_of_one_keeps_every_token() -> None:
    row = sampler(1.0, top_p=1.0, seed=0)
    assert {sample(flat_logits(1, 4), [row])[0] for _ in range(200)} == {0, 1, 2, 3}


def test_an_unseeded_row_gets_a_random_seed() -> None:
    assert len({sample(flat_logits(1, 1000), [sampler(1.0)])[0] for _ in range(5)}) > 1


# --------------------------------------------------------------------------- the default model


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
