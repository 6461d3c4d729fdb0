"""The conversation manager with a real repository (SQLite file, then PostgreSQL) and the
real worker around a deterministic fake engine."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from bot.chat import conversation
from bot.chat.conversation import EMPTY_REPLY, ConversationManager
from bot.events import ConversationKey, IncomingMessage
from tests.conftest import Harness
from tests.fakes.events import incoming
from tests.fakes.fake_engine import FakeEngine
from tests.fakes.targets import RecordingTarget

# The whole manager suite (ordering, restarts, failures) runs on both engines.
pytestmark = pytest.mark.parametrize("db_backend", ["sqlite", "postgresql"])


def msg(text: str, *, user: str = "u1", chat: str = "c1", private: bool = True) -> IncomingMessage:
    return incoming(text, user=user, chat=chat, private=private)


async def turns(harness: Harness, limit: int = 10) -> list[tuple[str, str]]:
    """The stored conversation of u1 in c1 as (role, content), oldest first."""
    return [(m.role, m.content) for m in await harness.repo.recent_messages(key(), limit)]


def key(user: str = "u1", chat: str = "c1") -> ConversationKey:
    return ConversationKey("telegram", chat, user)


async def test_a_message_gets_a_streamed_reply_and_both_are_stored(harness: Harness) -> None:
    async with harness.manager() as manager:
        target = RecordingTarget()
        await manager.handle(msg("hello there"), target)
    assert target.messages == ["Echo: hello there"]
    stored = await harness.repo.recent_messages(key(), 10)
    assert [(m.role, m.content) for m in stored] == [("user", "hello there"), ("assistant", "Echo: hello there")]
    assert stored[0].token_count > 0 and stored[1].platform_message_id == "0"
    # the reply's count is what the model generated: one token per character, then EOS
    assert stored[1].token_count == len("Echo: hello there") + 1


async def test_messages_of_one_conversation_are_answered_in_order(harness: Harness) -> None:
    harness.engine.step_delay = 0.01
    async with harness.manager() as manager:
        target = RecordingTarget()
        texts = [f"message {i}" for i in range(4)]
        await asyncio.gather(*(manager.handle(msg(t), target) for t in texts))
    assert target.messages == [f"Echo: {t}" for t in texts]
    stored = await harness.repo.recent_messages(key(), 20)
    expected = [c for t in texts for c in (("user", t), ("assistant", f"Echo: {t}"))]
    assert [(m.role, m.content) for m in stored] == expected
    assert harness.engine.max_active == 1  # one conversation never overlaps itself


async def test_different_conversations_are_served_concurrently(harness: Harness) -> None:
    harness.engine.step_delay = 0.02
    async with harness.manager() as manager:
        targets = [RecordingTarget() for _ in range(4)]
        await asyncio.gather(*(manager.handle(msg(f"hi from {i}", user=f"u{i}"), t) for i, t in enumerate(targets)))
    assert [t.messages for t in targets] == [[f"Echo: hi from {i}"] for i in range(4)]
    assert harness.engine.max_active >= 2


async def test_history_is_trimmed_to_the_token_budget(harness: Harness) -> None:
    harness.engine = FakeEngine(context_length=400)
    async with harness.manager(max_new_tokens=100, history_turns=200) as manager:
        target = RecordingTarget()
        for i in range(12):
            await manager.handle(msg(f"turn {i:02d} " + "x" * 20), target)
    last_prompt = harness.engine.added[-1]
    assert "turn 11" in last_prompt  # the newest message is always there
    assert "turn 00" not in last_prompt  # the oldest no longer fit
    assert len(harness.engine.added_ids[-1]) <= 400 - 100
    assert "You are a test bot." in last_prompt  # the system prompt survives trimming


async def test_history_turns_limits_how_much_is_read(harness: Harness) -> None:
    async with harness.manager(history_turns=2) as manager:
        target = RecordingTarget()
        for text in ("first", "second", "third"):
            await manager.handle(msg(text), target)
    last_prompt = harness.engine.added[-1]
    assert "third" in last_prompt and "Echo: second" in last_prompt
    assert "first" not in last_prompt


async def test_history_survives_a_restart_on_the_same_database_file(harness: Harness, tmp_path: Path) -> None:
    async with harness.manager() as manager:
        await manager.handle(msg("remember the word banana"), RecordingTarget())
    await harness.restart_database()
    async with harness.manager() as manager:
        await manager.handle(msg("what was the word?"), RecordingTarget())
    assert "remember the word banana" in harness.engine.added[-1]


async def test_empty_and_whitespace_messages_get_help_and_reach_no_model(harness: Harness) -> None:
    async with harness.manager() as manager:
        for text in ("", "   \n\t"):
            target = RecordingTarget()
            await manager.handle(msg(text), target)
            assert "/help" in target.text
    assert harness.engine.added == []
    assert await harness.repo.recent_messages(key(), 5) == []


async def test_too_long_input_is_refused_and_not_sent_to_the_model(harness: Harness) -> None:
    async with harness.manager(max_input_chars=50) as manager:
        target = RecordingTarget()
        await manager.handle(msg("y" * 51), target)
    assert "too long" in target.text and "50" in target.text
    assert harness.engine.added == []
    assert await harness.repo.recent_messages(key(), 5) == []


async def test_binary_input_is_refused(harness: Harness) -> None:
    async with harness.manager() as manager:
        target = RecordingTarget()
        await manager.handle(msg("\x00\x01\x02binary\x03\x04\x05\x06"), target)
    assert "binary" in target.text
    assert harness.engine.added == []


async def test_unicode_is_stored_and_answered_verbatim(harness: Harness) -> None:
    text = "Привет 👋 مرحبا <b>not html</b> @everyone"
    async with harness.manager() as manager:
        target = RecordingTarget()
        await manager.handle(msg(text), target)
    assert target.messages == [f"Echo: {text}"]
    assert (await harness.repo.recent_messages(key(), 1))[0].content == f"Echo: {text}"


async def test_lone_surrogates_are_replaced_not_crashing_storage(harness: Harness) -> None:
    async with harness.manager() as manager:
        target = RecordingTarget()
        await manager.handle(msg("broken \ud83d emoji"), target)
    assert target.messages == ["Echo: broken \ufffd emoji"]


async def test_a_failed_generation_apologises_and_keeps_the_user_message(harness: Harness) -> None:
    harness.engine.fail_on = "EXPLODE"
    async with harness.manager() as manager:
        target = RecordingTarget()
        await manager.handle(msg("please EXPLODE"), target)
        assert "Sorry" in target.text
        ok = RecordingTarget()
        await manager.handle(msg("and now?"), ok)
    assert ok.messages == ["Echo: and now?"]
    assert await turns(harness) == [
        ("user", "please EXPLODE"),
        ("user", "and now?"),
        ("assistant", "Echo: and now?"),
    ]


async def test_beyond_max_pending_messages_users_are_told_busy_and_nothing_is_stored(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.engine.step_delay = 0.05
    # A model queue far smaller than the burst: accepted turns wait for it, never refused.
    async with harness.manager(max_batch_size=1, queue_size=1, max_pending_messages=3) as manager:
        targets = [RecordingTarget() for _ in range(5)]
        with caplog.at_level(logging.INFO, logger="bot.chat.conversation"):
            await asyncio.gather(*(manager.handle(msg(f"hello {i}", user=f"u{i}"), t) for i, t in enumerate(targets)))
    assert [t.text for t in targets[:3]] == [f"Echo: hello {i}" for i in range(3)]  # in arrival order
    assert all("busy" in t.text for t in targets[3:])
    for i in (3, 4):  # refused: not stored, so no later prompt carries an unanswered turn
        assert await harness.repo.recent_messages(key(user=f"u{i}"), 5) == []
    assert (await harness.repo.stats()).messages == 6
    refusals = [r for r in caplog.records if r.getMessage().startswith("busy: refused")]
    assert len(refusals) == 2
    assert all(r.levelno == logging.INFO and r.exc_info is None for r in refusals)


async def test_an_empty_reply_is_shown_as_a_note_and_not_stored(harness: Harness) -> None:
    harness.engine.reply = lambda _text: ""
    async with harness.manager() as manager:
        target = RecordingTarget()
        await manager.handle(msg("say nothing"), target)
    assert target.messages == [EMPTY_REPLY]
    assert [m.role for m in await harness.repo.recent_messages(key(), 5)] == ["user"]


async def test_reset_during_generation_stops_it_early(harness: Harness) -> None:
    harness.engine.step_delay = 0.02
    harness.engine.reply = lambda _text: "word " * 400
    async with harness.manager(max_new_tokens=2000) as manager:
        target = RecordingTarget()
        reply = asyncio.create_task(manager.handle(msg("talk a lot"), target))
        await asyncio.wait_for(target.first_send.wait(), 5)
        started = time.monotonic()
        reset_target = RecordingTarget()
        await manager.handle(msg("/reset"), reset_target)
        await asyncio.wait_for(reply, 5)
        assert time.monotonic() - started < 2
    assert "[stopped]" in target.text
    assert "forgot" in reset_target.text
    assert await harness.repo.recent_messages(key(), 5) == []
    assert harness.engine.steps < 400


async def test_delivery_failure_mid_stream_stops_cleanly_and_keeps_history(harness: Harness) -> None:
    harness.engine.step_delay = 0.01
    harness.engine.reply = lambda _text: "long answer " * 20
    async with harness.manager() as manager:
        target = RecordingTarget()
        target.fail_edits = True  # the first message was deleted by the user
        await manager.handle(msg("hi"), target)
        ok = RecordingTarget()
        await manager.handle(msg("again", user="u2"), ok)
    assert ok.messages == ["long answer " * 20]  # other conversations are unaffected
    stored = await harness.repo.recent_messages(key(), 5)
    assert stored[0].role == "user" and stored[0].content == "hi"
    # what was generated before the failure is kept, as a prefix of the whole answer
    assert [m.role for m in stored] == ["user", "assistant"]
    assert ("long answer " * 20).startswith(stored[1].content)


async def test_blocked_chat_drops_the_reply_without_crashing(harness: Harness) -> None:
    async with harness.manager() as manager:
        target = RecordingTarget()
        target.fail_sends = True
        await manager.handle(msg("hi"), target)
        assert target.messages == []
        ok = RecordingTarget()
        await manager.handle(msg("hi again"), ok)
    assert ok.messages == ["Echo: hi again"]
    # nothing reached the user the first time, so no assistant turn was stored for it
    assert await turns(harness) == [
        ("user", "hi"),
        ("user", "hi again"),
        ("assistant", "Echo: hi again"),
    ]


async def test_shutdown_stops_replies_in_progress_promptly(harness: Harness) -> None:
    harness.engine.step_delay = 0.02
    harness.engine.reply = lambda _text: "word " * 400
    target = RecordingTarget()
    manager: ConversationManager
    async with harness.manager(max_new_tokens=2000) as manager:
        reply = asyncio.create_task(manager.handle(msg("talk a lot"), target))
        await asyncio.wait_for(target.first_send.wait(), 5)
        started = time.monotonic()
    assert time.monotonic() - started < 3
    await asyncio.wait_for(reply, 1)
    assert "[stopped]" in target.text


async def test_typing_is_shown_while_waiting_unless_the_answer_is_quick(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversation, "TYPING_DELAY_S", 0.2)
    async with harness.manager() as manager:
        instant = RecordingTarget()
        await manager.handle(msg("hi"), instant)
        harness.engine.step_delay = 0.05
        slow = RecordingTarget()
        await manager.handle(msg("hello again"), slow)
    assert instant.typing_count == 0
    assert slow.typing_count >= 1
