"""Durable turns through the real manager, repository (a SQLite file) and worker around the
fake engine: redeliveries answered once, recovery after a restart (answer, resume the
shown message, deliver a stored reply, tell about a missed one), replies the platform
does not take, shutdown mid-reply, a burst of 200 users x 5 messages, storage failures,
and what the observer is told."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import text

from bot.chat import conversation
from bot.chat.conversation import STOPPED_SUFFIX, ConversationManager
from bot.config import load_settings
from bot.errors import ConfigError
from bot.events import ConversationKey, IncomingMessage, Platform
from bot.ports import FinishedReply, MessageOutcome
from tests.conftest import Harness
from tests.fakes.events import incoming
from tests.fakes.targets import RecordingTarget

ALICE = ConversationKey("telegram", "c1", "u1")


class Observed:
    """An `Observer` that counts what it is told."""

    def __init__(self) -> None:
        self.outcomes: Counter[tuple[Platform, MessageOutcome]] = Counter()
        self.errors: Counter[tuple[Platform, str]] = Counter()

    def message(self, platform: Platform, outcome: MessageOutcome) -> None:
        self.outcomes[(platform, outcome)] += 1

    def platform_error(self, platform: Platform, kind: str) -> None:
        self.errors[(platform, kind)] += 1


@asynccontextmanager
async def observed(harness: Harness, **overrides: Any) -> AsyncIterator[tuple[ConversationManager, Observed]]:
    """A manager reporting to an `Observed`, on the harness's core."""
    seen = Observed()
    async with (
        harness.core(**overrides) as core,
        ConversationManager(core.settings, core.repository, core.model, observer=seen) as manager,
    ):
        yield manager, seen


async def stored(harness: Harness, key: ConversationKey = ALICE) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in await harness.repo.recent_messages(key, 50)]


async def states(harness: Harness) -> list[str]:
    async with harness.db.connect() as connection:
        return [row[0] for row in await connection.execute(text("SELECT state FROM turns ORDER BY id"))]


def again(event: IncomingMessage) -> IncomingMessage:
    """The same update delivered once more (a webhook retry, a polling redelivery)."""
    return IncomingMessage(**{f: getattr(event, f) for f in event.__slots__})  # type: ignore[attr-defined]


async def test_a_redelivered_message_is_answered_once(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    event = incoming("hello")
    async with observed(harness) as (manager, seen):
        first, second = RecordingTarget(), RecordingTarget()
        await manager.handle(event, first)
        with caplog.at_level(logging.INFO, logger="bot.chat.conversation"):
            await manager.handle(again(event), second)
    assert first.messages == ["Echo: hello"] and second.messages == []
    assert await stored(harness) == [("user", "hello"), ("assistant", "Echo: hello")]
    assert seen.outcomes == Counter({("telegram", "answered"): 1, ("telegram", "duplicate"): 1})
    assert "accepted before: not answered again" in caplog.text


async def test_a_message_redelivered_while_it_is_being_answered_is_answered_once(harness: Harness) -> None:
    harness.engine.step_delay = 0.02
    event = incoming("slow one")
    async with harness.manager() as manager:
        targets = [RecordingTarget() for _ in range(3)]
        await asyncio.gather(*(manager.handle(again(event), t) for t in targets))
    assert sorted(t.text for t in targets) == ["", "", "Echo: slow one"]
    assert len(harness.engine.added) == 1


async def test_a_redelivered_command_is_run_once(harness: Harness) -> None:
    async with harness.manager() as manager:
        await manager.handle(incoming("keep me"), RecordingTarget())
        reset = incoming("/reset")
        first, second = RecordingTarget(), RecordingTarget()
        await manager.handle(reset, first)
        await manager.handle(incoming("new start"), RecordingTarget())
        await manager.handle(again(reset), second)  # would forget "new start"
    assert "forgot" in first.text and second.messages == []
    assert await stored(harness) == [("user", "new start"), ("assistant", "Echo: new start")]
    assert await states(harness) == ["answered"] * 3  # keep me, /reset, new start


async def test_submit_returns_once_accepted_and_the_reply_follows(harness: Harness) -> None:
    harness.engine.step_delay = 0.02
    async with harness.manager() as manager:
        target = RecordingTarget()
        reply = await manager.submit(incoming("hello"), target)
        # Stored before the reply exists: a crash now leaves it to be answered after a restart.
        assert await stored(harness) == [("user", "hello")]
        assert [t.event.text for t in await harness.repo.open_turns("telegram")] == ["hello"]
        await reply
    assert target.messages == ["Echo: hello"]
    assert await harness.repo.open_turns("telegram") == []


async def test_turns_accepted_before_a_restart_are_answered_in_order_once(harness: Harness) -> None:
    # As a killed bot left them: accepted, never answered.
    for text_ in ("first", "second"):
        await harness.repo.accept_turn(incoming(text_), "message", 1)
    await harness.repo.accept_turn(incoming("other user", user="u2"), "message", 1)
    targets: dict[str, RecordingTarget] = {}

    def target_for(event: IncomingMessage) -> RecordingTarget:
        return targets.setdefault(event.user_id, RecordingTarget())

    async with observed(harness) as (manager, seen):
        await manager.recover("telegram", target_for)
        await manager.recover("telegram", target_for)  # a reconnect: nothing twice
        await manager.recover("discord", target_for)
        await asyncio.wait_for(wait_until(lambda: not manager_busy(manager)), 5)
        await manager.handle(incoming("third"), targets["u1"])
    assert targets["u1"].messages == ["Echo: first", "Echo: second", "Echo: third"]
    assert targets["u2"].messages == ["Echo: other user"]
    assert await stored(harness) == [
        ("user", "first"),
        ("assistant", "Echo: first"),
        ("user", "second"),
        ("assistant", "Echo: second"),
        ("user", "third"),
        ("assistant", "Echo: third"),
    ]
    assert await harness.repo.open_turns("telegram") == []
    assert seen.outcomes[("telegram", "answered")] == 4


async def test_a_reply_cut_off_by_a_crash_is_finished_in_the_message_the_user_saw(harness: Harness) -> None:
    turn_id = await harness.repo.accept_turn(incoming("hello"), "message", 1)
    assert turn_id is not None
    chat = RecordingTarget(messages=["Echo: he"])  # what the killed bot had shown
    await harness.repo.reply_started(turn_id, ["0"])

    async with harness.manager() as manager:
        await manager.recover("telegram", lambda _event: chat)
        await asyncio.wait_for(wait_until(lambda: manager.waiting_turns() == 0 and not manager_busy(manager)), 5)
    assert chat.messages == ["Echo: hello"]
    assert {call for call, _ in chat.calls} == {"edit"}  # edited in place, nothing sent again
    assert await stored(harness) == [("user", "hello"), ("assistant", "Echo: hello")]


async def test_a_turn_older_than_recover_max_age_is_told_missed_not_answered(harness: Harness) -> None:
    await harness.repo.accept_turn(incoming("what is the weather like on the moon these days?"), "message", 1)
    chat = RecordingTarget()
    async with observed(harness, recover_max_age=0) as (manager, seen):
        await manager.recover("telegram", lambda _event: chat)
        await asyncio.wait_for(wait_until(lambda: bool(chat.messages)), 5)
        await asyncio.wait_for(wait_until(lambda: seen.outcomes[("telegram", "missed")] == 1), 5)
    [notice] = chat.messages
    assert "missed" in notice and "“what is the weather like on the moon these days?”" in notice
    assert harness.engine.added == []
    assert await stored(harness) == []  # hidden: later prompts do not carry it
    assert await states(harness) == ["missed"]


async def test_a_reply_the_platform_does_not_take_is_kept_and_delivered_later(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(conversation, "REDELIVERY_DELAYS_S", (0.05, 0.1))
    chat = RecordingTarget()
    chat.unavailable = True  # 500s beyond the adapter's retries
    async with observed(harness) as (manager, seen):
        with caplog.at_level(logging.WARNING, logger="bot.chat.conversation"):
            await manager.handle(incoming("hello"), chat)
        assert chat.messages == [] and await states(harness) == ["undelivered"]
        assert await stored(harness) == [("user", "hello")]  # not in prompts while unseen
        assert "not delivered (server_error" in caplog.text
        await asyncio.sleep(0.3)
        assert chat.refused >= 2  # retried
        chat.unavailable = False
        await asyncio.wait_for(wait_until(lambda: chat.messages == ["Echo: hello"]), 5)
        await asyncio.wait_for(wait_until(lambda: not manager_busy(manager)), 5)
    assert await states(harness) == ["answered"]
    assert await stored(harness) == [("user", "hello"), ("assistant", "Echo: hello")]
    assert seen.outcomes[("telegram", "undelivered")] == 1
    assert seen.errors[("telegram", "server_error")] >= 3
    assert len(harness.engine.added) == 1  # delivered, not generated again


async def test_an_undelivered_reply_is_delivered_after_a_restart_without_generating_again(harness: Harness) -> None:
    turn_id = await harness.repo.accept_turn(incoming("hello"), "message", 1)
    assert turn_id is not None
    await harness.repo.finish_turn(turn_id, "undelivered", FinishedReply("the stored answer", 3))
    chat = RecordingTarget()
    async with harness.manager(recover_max_age=0) as manager:  # its age does not matter
        await manager.recover("telegram", lambda _event: chat)
        await asyncio.wait_for(wait_until(lambda: chat.messages == ["the stored answer"]), 5)
        await asyncio.wait_for(wait_until(lambda: not manager_busy(manager)), 5)
    assert harness.engine.added == []
    assert await stored(harness) == [("user", "hello"), ("assistant", "the stored answer")]
    assert await states(harness) == ["answered"]


async def test_a_chat_that_is_gone_fails_the_turn_for_good(harness: Harness) -> None:
    chat = RecordingTarget()
    chat.fail_sends = True  # the bot was blocked
    async with observed(harness) as (manager, seen):
        await manager.handle(incoming("hello"), chat)
    assert await states(harness) == ["failed"]
    assert seen.errors == Counter({("telegram", "forbidden"): 1})
    assert seen.outcomes == Counter({("telegram", "failed"): 1})


async def test_shutdown_stores_the_cut_off_reply_and_leaves_waiting_turns_for_the_restart(harness: Harness) -> None:
    harness.engine.step_delay = 0.02
    harness.engine.reply = lambda text_: "word " * 200 if text_ == "talk" else f"Echo: {text_}"
    chat = RecordingTarget()
    async with harness.manager(max_new_tokens=2000) as manager:
        talking = asyncio.create_task(manager.handle(incoming("talk"), chat))
        await asyncio.wait_for(chat.first_send.wait(), 5)
        waiting = await manager.submit(incoming("and then?"), chat)
    await asyncio.wait_for(asyncio.gather(talking, waiting), 2)
    [shown] = chat.messages
    assert shown.endswith(STOPPED_SUFFIX)
    [(_, question), (_, answer), (_, later)] = await stored(harness)
    assert (question, answer, later) == ("talk", shown, "and then?")  # history and chat agree
    assert (await harness.repo.recent_messages(ALICE, 5))[1].status == "cut_off"
    assert await states(harness) == ["answered", "pending"]

    harness.engine.step_delay = 0.0
    async with harness.manager() as manager:  # the restart
        await manager.recover("telegram", lambda _event: chat)
        await asyncio.wait_for(wait_until(lambda: len(chat.messages) == 2 and not manager_busy(manager)), 5)
    assert chat.messages[1] == "Echo: and then?"
    assert await states(harness) == ["answered", "answered"]


async def test_a_reset_drops_waiting_turns_for_good(harness: Harness) -> None:
    harness.engine.step_delay = 0.02
    harness.engine.reply = lambda _text: "word " * 100
    chat = RecordingTarget()
    async with harness.manager(max_new_tokens=2000) as manager:
        first = await manager.submit(incoming("one"), chat)
        second = await manager.submit(incoming("two"), chat)
        await asyncio.wait_for(chat.first_send.wait(), 5)
        await manager.handle(incoming("/reset"), RecordingTarget())
        await asyncio.wait_for(asyncio.gather(first, second), 2)
    assert await stored(harness) == []
    assert await harness.repo.open_turns("telegram") == []
    assert len(harness.engine.added) == 1


async def test_a_burst_of_200_users_times_5_messages_is_accepted_and_answered_in_order(harness: Harness) -> None:
    # The default bounds (MAX_PENDING_MESSAGES, the model queue) with the fake model.
    users = [f"user{i}" for i in range(200)]
    targets = {user: RecordingTarget() for user in users}
    async with observed(harness) as (manager, seen):
        await asyncio.gather(
            *(
                manager.handle(incoming(f"{user} says {n}", user=user), targets[user])
                for n in range(5)
                for user in users
            )
        )
    assert seen.outcomes == Counter({("telegram", "answered"): 1000})
    for user in users:
        assert targets[user].messages == [f"Echo: {user} says {n}" for n in range(5)]
    assert (await harness.repo.stats()).messages == 2000


async def test_storage_failures_tell_users_and_log_one_traceback_per_interval(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    async with harness.manager() as manager:
        async with harness.db.begin() as connection:
            await connection.execute(text("DROP TABLE turns"))  # the disk went bad
        targets = [RecordingTarget() for _ in range(5)]
        with caplog.at_level(logging.ERROR, logger="bot.chat.conversation"):
            for i, target in enumerate(targets):
                await manager.handle(incoming(f"hello {i}", user=f"u{i}"), target)
    assert all("memory" in t.text for t in targets)
    errors = [r for r in caplog.records if r.name == "bot.chat.conversation" and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert harness.engine.added == []


@pytest.mark.parametrize(
    ("name", "value"), [("RECOVER_MAX_AGE", "-1"), ("RECOVER_MAX_AGE", "ten minutes"), ("MAX_PENDING_MESSAGES", "0")]
)
def test_a_bad_bound_stops_start_up_with_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings(_env_file=None)
    assert info.value.setting == name and "\n" not in str(info.value)


def manager_busy(manager: ConversationManager) -> bool:
    """Whether the manager still works on a turn (answering, delivering, or telling)."""
    return bool(manager.in_flight())


async def wait_until(condition: Any, every: float = 0.01) -> None:
    """Polls `condition` (the callers bound the wait with `asyncio.wait_for`)."""
    for _ in itertools.count():
        if condition():
            return
        await asyncio.sleep(every)
