"""Splitting and throttled streaming of replies (bot/streaming.py)."""

from __future__ import annotations

import re

import pytest

from bot.chat.streaming import ReplyStreamer, split_message
from bot.errors import DeliveryError
from tests.fakes.targets import RecordingTarget


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_short_text_is_one_message() -> None:
    assert split_message("hello world", 100) == ["hello world"]


def test_split_prefers_paragraph_then_line_then_word_boundaries() -> None:
    text = "a" * 60 + "\n\n" + "b" * 30
    assert split_message(text, 80) == ["a" * 60, "b" * 30]
    text = "a" * 60 + "\n" + "b" * 30
    assert split_message(text, 80) == ["a" * 60, "b" * 30]
    words = " ".join(["word"] * 100)
    parts = split_message(words, 50)
    assert all(len(p) <= 50 for p in parts)
    assert all(re.fullmatch(r"word( word)*", p) for p in parts)
    assert " ".join(parts) == words


def test_a_word_longer_than_the_limit_is_cut_hard() -> None:
    text = "x" * 250
    parts = split_message(text, 100)
    assert all(len(p) <= 100 for p in parts)
    assert "".join(parts) == text


def test_split_inside_code_fence_closes_and_reopens_it() -> None:
    code = "\n".join(f"print({i})  # line" for i in range(300))
    text = "Here:\n```python\n" + code + "\n```\nDone."
    parts = split_message(text, 2000)
    assert len(parts) > 2
    for part in parts:
        assert len(part) <= 2000
        assert part.count("```") % 2 == 0, part[:40]
    assert parts[1].startswith("```python\n")
    body = [line for p in parts for line in p.splitlines() if line.startswith("print(")]
    assert body == code.splitlines()


def test_unicode_is_never_split_inside_a_character() -> None:
    text = "🙂" * 5000
    parts = split_message(text, 4096)
    assert "".join(parts) == text


async def test_first_text_is_sent_at_once_then_edits_are_throttled() -> None:
    clock = FakeClock()
    target = RecordingTarget(edit_interval=1.0)
    streamer = ReplyStreamer(target, clock=clock)
    await streamer.push("  ")
    assert target.calls == []  # whitespace alone shows nothing
    await streamer.push("Hel")
    assert target.calls == [("send", "  Hel")]
    for piece in "lo there":
        clock.now += 0.15
        await streamer.push(piece)
    edits = [c for c in target.calls if c[0] == "edit"]
    assert edits == [("edit", "  Hello ther")]  # 1.2 s of pieces: one edit, at 1.05 s
    await streamer.finish()
    assert target.messages == ["  Hello there"]


async def test_long_reply_continues_in_new_messages_and_final_text_is_exact() -> None:
    clock = FakeClock()
    target = RecordingTarget(max_chars=100, edit_interval=0.5)
    streamer = ReplyStreamer(target, clock=clock)
    words = [f"w{i} " for i in range(120)]
    for w in words:
        clock.now += 0.2
        await streamer.push(w)
    await streamer.finish()
    assert len(target.messages) > 3
    assert all(len(m) <= 100 for m in target.messages)
    assert " ".join(m.strip() for m in target.messages).split() == "".join(words).split()
    assert streamer.message_ids == [str(i) for i in range(len(target.messages))]


async def test_delivery_errors_propagate_to_the_caller() -> None:
    target = RecordingTarget(edit_interval=0.0)
    streamer = ReplyStreamer(target)
    await streamer.push("hello")
    target.fail_edits = True
    with pytest.raises(DeliveryError):
        await streamer.push(" world")
