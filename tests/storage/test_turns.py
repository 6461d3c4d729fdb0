"""Durable turns in `SqlRepository`, on a real SQLite file and on PostgreSQL: accepting a
message once per platform message id, the history a turn's prompt sees, finishing turns
(answered, cut off, undelivered then delivered, missed, failed), the daily usage counted
with them, the open turns a restart answers, and `ping`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.errors import StorageError
from bot.events import IncomingMessage, Platform
from bot.ports import FinishedReply
from storage.models import DailyUsage, Turn
from storage.repository import SqlRepository
from tests.storage.conftest import ALICE, BOB


def message(text: str, message_id: str, *, user: str = "alice", platform: Platform = "telegram") -> IncomingMessage:
    """A message of ALICE (or BOB) in chat-1, as an adapter hands it over."""
    return IncomingMessage(
        platform=platform,
        chat_id="chat-1",
        user_id=user,
        display_name=f"{user.title()} Example",
        message_id=message_id,
        text=text,
        is_private=False,
        timestamp=datetime.now(UTC),
        thread_id="topic-7",
    )


async def history(repo: SqlRepository, key: Any = ALICE) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in await repo.recent_messages(key, 50)]


async def usage_rows(engine: AsyncEngine) -> list[tuple[str, str, int, int, int]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(
                DailyUsage.platform,
                DailyUsage.user_id,
                DailyUsage.prompt_tokens,
                DailyUsage.generated_tokens,
                DailyUsage.messages,
            ).order_by(DailyUsage.user_id)
        )
        return [(row[0], row[1], row[2], row[3], row[4]) for row in rows]


async def turn_states(engine: AsyncEngine) -> dict[int, str]:
    async with engine.connect() as connection:
        return {row.id: row.state for row in await connection.execute(select(Turn.id, Turn.state))}


async def test_a_message_is_accepted_once_per_platform_message_id(repo: SqlRepository) -> None:
    first = await repo.accept_turn(message("hello", "m1"), "message", 3)
    again = await repo.accept_turn(message("hello", "m1"), "message", 3)  # a redelivered update
    other_chat = await repo.accept_turn(message("hello", "m1", platform="discord"), "message", 3)

    assert isinstance(first, int) and again is None and isinstance(other_chat, int)
    [stored] = await repo.recent_messages(ALICE, 10)
    assert (stored.role, stored.content, stored.token_count, stored.platform_message_id) == ("user", "hello", 3, "m1")


async def test_the_same_message_arriving_twice_at_once_is_accepted_once(repo: SqlRepository) -> None:
    results = await asyncio.gather(*(repo.accept_turn(message("hi", "m7"), "message", 1) for _ in range(3)))

    assert len([r for r in results if r is not None]) == 1
    assert await history(repo) == [("user", "hi")]


async def test_a_command_is_a_turn_without_a_stored_message(repo: SqlRepository, db_engine: AsyncEngine) -> None:
    turn_id = await repo.accept_turn(message("/reset", "c1"), "command", 0)
    assert turn_id is not None
    assert await repo.accept_turn(message("/reset", "c1"), "command", 0) is None
    await repo.finish_turn(turn_id, "answered")

    assert await history(repo) == []
    assert await turn_states(db_engine) == {turn_id: "answered"}
    assert await repo.open_turns("telegram") == []


async def test_turns_overlapping_in_one_conversation_keep_question_answer_order(repo: SqlRepository) -> None:
    # Three questions accepted before the first answer is written (a user typing fast).
    ids = [await repo.accept_turn(message(f"q{i}", f"m{i}"), "message", 1) for i in range(3)]
    assert all(isinstance(i, int) for i in ids)
    first, second, third = (i for i in ids if i is not None)

    assert [m.content for m in await repo.turn_history(first, 10)] == ["q0"]
    await repo.finish_turn(first, "answered", FinishedReply("a0", 2, ("r0",)))
    # The second turn's prompt: the first exchange, then its question; not the third yet.
    assert [m.content for m in await repo.turn_history(second, 10)] == ["q0", "a0", "q1"]
    await repo.finish_turn(second, "answered", FinishedReply("a1", 2, ("r1",)))
    assert [m.content for m in await repo.turn_history(third, 2)] == ["a1", "q2"]  # the newest `limit`

    assert await history(repo) == [
        ("user", "q0"),
        ("assistant", "a0"),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
    ]
    replies = [m for m in await repo.recent_messages(ALICE, 10) if m.role == "assistant"]
    assert [(m.platform_message_id, m.token_count, m.status) for m in replies] == [("r0", 2, None), ("r1", 2, None)]


async def test_a_cut_off_reply_is_stored_as_shown_and_marked(repo: SqlRepository) -> None:
    turn_id = await repo.accept_turn(message("tell me", "m1"), "message", 2)
    assert turn_id is not None
    await repo.finish_turn(turn_id, "answered", FinishedReply("Once upon … [stopped]", 4, ("r1",), cut_off=True))

    [question, answer] = await repo.recent_messages(ALICE, 10)
    assert (answer.content, answer.status) == ("Once upon … [stopped]", "cut_off")
    assert question.status is None


async def test_an_undelivered_reply_is_hidden_until_delivered_then_shown_once_and_counted_once(
    repo: SqlRepository, db_engine: AsyncEngine
) -> None:
    turn_id = await repo.accept_turn(message("q", "m1"), "message", 5)
    assert turn_id is not None
    await repo.finish_turn(turn_id, "undelivered", FinishedReply("the answer", 7, (), prompt_tokens=40))

    assert await history(repo) == [("user", "q")]  # prompts do not see what the user never saw
    [open_turn] = await repo.open_turns("telegram")
    assert (open_turn.id, open_turn.state, open_turn.reply) == (turn_id, "undelivered", "the answer")

    await repo.finish_turn(turn_id, "answered", FinishedReply("the answer", 7, ("r9",), prompt_tokens=40))

    assert await history(repo) == [("user", "q"), ("assistant", "the answer")]
    assert (await repo.recent_messages(ALICE, 10))[-1].platform_message_id == "r9"
    assert await repo.open_turns("telegram") == []
    assert await usage_rows(db_engine) == [("telegram", "alice", 40, 7, 1)]


async def test_finishing_counts_daily_usage_per_user(repo: SqlRepository, db_engine: AsyncEngine) -> None:
    turns = [
        await repo.accept_turn(message(f"q{i}", f"m{i}", user=user), "message", 1)
        for i, user in enumerate(["alice", "alice", "bob"])
    ]
    replies = [
        FinishedReply("a", 10, prompt_tokens=100),
        FinishedReply("b", 5, prompt_tokens=50),
        FinishedReply("c", 1),
    ]
    # Finished together: one group commit adds up alice's two turns.
    await asyncio.gather(
        *(repo.finish_turn(t, "answered", r) for t, r in zip(turns, replies, strict=True) if t is not None)
    )

    assert await usage_rows(db_engine) == [("telegram", "alice", 150, 15, 2), ("telegram", "bob", 0, 1, 1)]


async def test_a_missed_turn_hides_its_message_and_a_failed_one_keeps_it(
    repo: SqlRepository, db_engine: AsyncEngine
) -> None:
    missed = await repo.accept_turn(message("long ago", "m1"), "message", 1)
    failed = await repo.accept_turn(message("the model broke", "m2"), "message", 1)
    assert missed is not None and failed is not None
    await repo.finish_turn(missed, "missed")
    await repo.finish_turn(failed, "failed")

    assert await history(repo) == [("user", "the model broke")]
    assert await repo.open_turns("telegram") == []
    assert await turn_states(db_engine) == {missed: "missed", failed: "failed"}
    assert (await repo.stats()).messages == 1
    assert await usage_rows(db_engine) == []


async def test_open_turns_are_the_platforms_unanswered_turns_oldest_first_with_their_event(
    repo: SqlRepository,
) -> None:
    answered = await repo.accept_turn(message("done", "m1"), "message", 1)
    pending = await repo.accept_turn(message("waiting", "m2"), "message", 1)
    shown = await repo.accept_turn(message("half shown", "m3", user="bob"), "message", 1)
    await repo.accept_turn(message("elsewhere", "m4", platform="discord"), "message", 1)
    await repo.accept_turn(message("/help", "m5"), "command", 0)
    assert answered is not None and pending is not None and shown is not None
    await repo.finish_turn(answered, "answered", FinishedReply("yes", 1))
    await repo.reply_started(shown, ["r1"])
    await repo.reply_started(shown, ["r1", "r2"])

    turns = await repo.open_turns("telegram")

    assert [(t.id, t.state, t.event.text, t.reply_message_ids) for t in turns] == [
        (pending, "pending", "waiting", ()),
        (shown, "pending", "half shown", ("r1", "r2")),
    ]
    event = turns[1].event
    assert (event.platform, event.chat_id, event.user_id, event.message_id) == ("telegram", "chat-1", "bob", "m3")
    assert (event.display_name, event.is_private, event.thread_id) == ("Bob Example", False, "topic-7")
    assert turns[1].accepted_at.tzinfo is not None


async def test_a_reset_conversation_leaves_no_open_turn_and_no_late_reply(repo: SqlRepository) -> None:
    turn_id = await repo.accept_turn(message("forget me", "m1"), "message", 1)
    assert turn_id is not None
    await repo.clear_conversation(ALICE)

    assert await repo.open_turns("telegram") == []
    assert await repo.turn_history(turn_id, 10) == []
    await repo.finish_turn(turn_id, "answered", FinishedReply("too late", 1))
    assert await history(repo) == []


async def test_turn_steps_arriving_together_share_one_transaction(repo: SqlRepository, db_engine: AsyncEngine) -> None:
    events = [message(f"q{i}", f"m{i}", user=f"user{i}") for i in range(20)]
    commits: list[int] = []

    @event.listens_for(db_engine.sync_engine, "commit")
    def count(_conn: Any) -> None:
        commits.append(1)

    ids = await asyncio.gather(*(repo.accept_turn(e, "message", 1) for e in events))
    assert len(commits) == 1
    histories = await asyncio.gather(*(repo.turn_history(i, 5) for i in ids if i is not None))
    assert [[m.content for m in h] for h in histories] == [[f"q{i}"] for i in range(20)]
    # With one process per store (SQLite) a turn's history is read with its acceptance;
    # a shared store (PostgreSQL) reads it when the turn starts, under its lock.
    reads = 0 if db_engine.dialect.name == "sqlite" else 1
    assert len(commits) == 1 + reads
    await asyncio.gather(
        *(repo.finish_turn(i, "answered", FinishedReply(f"a{n}", 1)) for n, i in enumerate(ids) if i is not None)
    )
    assert len(commits) == 2 + reads
    assert await history(repo, BOB) == []  # nobody else's
    assert (await repo.stats()).messages == 40


async def test_ping_answers_while_the_database_does(repo: SqlRepository) -> None:
    await repo.ping()


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_ping_fails_once_the_sqlite_file_is_gone(repo: SqlRepository, db_path: Path) -> None:
    await repo.ping()
    await asyncio.to_thread(db_path.unlink)
    with pytest.raises(StorageError, match="gone"):
        await repo.ping()
