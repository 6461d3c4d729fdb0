"""Prompt building: the newest turns that fit the context, trimmed by tokens."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from bot.chat.prompt import build_prompt, reply_budget
from bot.errors import InputRejected
from bot.events import Role
from bot.model.scheduler import Worker
from bot.ports import StoredMessage
from tests.fakes.fake_engine import MARKERS, FakeEngine


def history(*turns: tuple[Role, str], counts_off_by: int = 0) -> list[StoredMessage]:
    """Stored messages, oldest first; `counts_off_by` makes each stored token count wrong."""
    now = datetime.now(UTC)
    return [
        StoredMessage(i, role, text, max(0, len(text) + counts_off_by), now) for i, (role, text) in enumerate(turns)
    ]


def rendered(ids: list[int]) -> str:
    """The fake tokenizer's ids as text, role markers included."""
    return "".join(MARKERS.get(i) or chr(i) for i in ids)


@pytest.fixture
async def worker() -> AsyncIterator[Worker]:
    async with Worker(FakeEngine(context_length=200)) as started:
        yield started


async def test_a_short_history_is_rendered_whole_with_the_system_prompt(worker: Worker) -> None:
    turns = history(("user", "hi"), ("assistant", "hello"), ("user", "how are you?"))
    prompt = await build_prompt(worker, "Be brief.", turns, max_new_tokens=50)
    text = rendered(prompt.ids)
    assert text == (
        "<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>hello<|end|><|user|>how are you?<|end|><|assistant|>"
    )
    assert prompt.max_new_tokens == 50


async def test_the_reply_budget_is_at_most_half_the_context_and_at_least_one() -> None:
    assert reply_budget(200, 50) == 50
    assert reply_budget(200, 1000) == 100
    assert reply_budget(1, 10) == 1


async def test_a_long_history_keeps_only_the_newest_turns_that_fit(worker: Worker) -> None:
    turns = history(*[("user" if i % 2 == 0 else "assistant", f"message number {i:02d} " + "x" * 20) for i in range(9)])
    prompt = await build_prompt(worker, None, turns, max_new_tokens=100)
    text = rendered(prompt.ids)
    assert len(prompt.ids) <= 200 - prompt.max_new_tokens
    assert "message number 08" in text  # the new message is always there
    kept = [i for i in range(9) if f"message number {i:02d}" in text]
    assert kept == list(range(kept[0], 9)) and kept[0] > 0  # a contiguous newest run; the oldest went


async def test_wrong_stored_token_counts_are_corrected_by_the_real_render(worker: Worker) -> None:
    # Each turn claims 0 tokens, so the estimate keeps everything; the render must trim.
    turns = history(*[("user", f"turn {i} " + "y" * 30) for i in range(8)], counts_off_by=-1000)
    prompt = await build_prompt(worker, None, turns, max_new_tokens=100)
    text = rendered(prompt.ids)
    assert len(prompt.ids) <= 100
    assert "turn 7 " in text and "turn 0 " not in text


async def test_a_system_prompt_that_does_not_fit_with_the_message_is_dropped(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    turns = history(("user", "q" * 80))
    with caplog.at_level(logging.WARNING, logger="bot.chat.prompt"):
        prompt = await build_prompt(worker, "s" * 60, turns, max_new_tokens=100)
    text = rendered(prompt.ids)
    assert "<|system|>" not in text and "q" * 80 in text
    assert "system prompt dropped" in caplog.text


async def test_a_message_longer_than_the_context_is_refused(worker: Worker) -> None:
    with pytest.raises(InputRejected):
        await build_prompt(worker, None, history(("user", "z" * 150)), max_new_tokens=100)


async def test_an_empty_history_is_a_programming_error(worker: Worker) -> None:
    with pytest.raises(ValueError, match="history"):
        await build_prompt(worker, "sys", [], max_new_tokens=10)
