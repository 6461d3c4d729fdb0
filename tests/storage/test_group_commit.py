"""Group commit: appends arriving together share a transaction, yet each succeeds,
fails or is cancelled on its own. First through `SqlRepository` on real SQLite files,
then `GroupCommit` alone around a fake commit function."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.errors import StorageError
from bot.events import ConversationKey
from bot.ports import StoredMessage
from storage.group_commit import Append, Appended, GroupCommit
from storage.repository import SqlRepository
from tests.storage.conftest import ALICE, BOB, captured_sql


def _commits(engine: AsyncEngine) -> list[int]:
    """Grows by one for every committed transaction from now on."""
    seen: list[int] = []

    @event.listens_for(engine.sync_engine, "commit")
    def count(_conn: Any) -> None:
        seen.append(1)

    return seen


async def test_appends_arriving_together_share_one_transaction_and_statement(
    repo: SqlRepository, db_engine: AsyncEngine
) -> None:
    keys = [ConversationKey("telegram", "group", f"user{i}") for i in range(30)]
    for key in keys:
        await repo.add_message(key, "user", f"{key.user_id} earlier", 1)
    seen = captured_sql(db_engine)
    commits = _commits(db_engine)

    histories = await asyncio.gather(
        *(repo.add_and_recent(key, "user", f"{key.user_id} now", 2, f"p{i}", 5) for i, key in enumerate(keys))
    )

    for i, (key, history) in enumerate(zip(keys, histories, strict=True)):
        assert [m.content for m in history] == [f"{key.user_id} earlier", f"{key.user_id} now"]
        assert history[-1].platform_message_id == f"p{i}" and history[-1].token_count == 2
        assert history[0].id < history[1].id
    inserts = [sql for sql, _ in seen if sql.lstrip().upper().startswith("INSERT")]
    selects = [sql for sql, _ in seen if sql.lstrip().upper().startswith("SELECT")]
    # All 30 were queued before the writer ran: one transaction, one INSERT, one SELECT.
    assert (len(commits), len(inserts), len(selects)) == (1, 1, 1)


async def test_appends_to_one_conversation_are_written_in_order_each_seeing_only_its_past(
    repo: SqlRepository,
) -> None:
    histories = await asyncio.gather(*(repo.add_and_recent(ALICE, "user", f"m{i}", 1, None, 10) for i in range(6)))
    for i, history in enumerate(histories):
        assert [m.content for m in history] == [f"m{j}" for j in range(i + 1)]
    assert [m.content for m in await repo.recent_messages(ALICE, 10)] == [f"m{i}" for i in range(6)]


async def test_one_unstorable_append_fails_alone_in_a_group_commit(repo: SqlRepository) -> None:
    keys = [ConversationKey("telegram", "group", f"user{i}") for i in range(6)]
    texts = ["fine", "also fine", "bad \ud800 surrogate", "fine too", "and this", "last"]
    results = await asyncio.gather(
        *(repo.add_message(key, "user", content, 1) for key, content in zip(keys, texts, strict=True)),
        return_exceptions=True,
    )
    assert isinstance(results[2], StorageError)
    for key, content, result in zip(keys, texts, results, strict=True):
        if content.startswith("bad"):
            assert await repo.recent_messages(key, 5) == []
        else:
            assert not isinstance(result, BaseException)
            assert [m.content for m in await repo.recent_messages(key, 5)] == [content]


async def test_close_waits_for_appends_in_progress(repo: SqlRepository) -> None:
    tasks = [asyncio.create_task(repo.add_message(ALICE, "user", f"m{i}", 1)) for i in range(5)]
    await asyncio.sleep(0)
    await repo.close()
    assert all(t.done() for t in tasks)
    assert len(await repo.recent_messages(ALICE, 10)) == 5


@pytest.mark.parametrize("db_backend", ["sqlite"])  # SQLite's own pragmas and locks
async def test_a_cancelled_append_already_being_written_is_committed_before_cancelled_error(
    repo: SqlRepository, db_path: Path
) -> None:
    await repo.add_message(ALICE, "user", "first", 1)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
        task = asyncio.create_task(repo.add_message(ALICE, "user", "blocked", 1), name="blocked-add")
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.sleep(0.1)
        assert not task.done()  # the caller waits for the write it started
        blocker.execute("ROLLBACK")
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        blocker.close()
    # Committed by the time the caller saw CancelledError: a /reset that runs next
    # can never have the message land after it.
    assert [m.content for m in await repo.recent_messages(ALICE, 10)] == ["first", "blocked"]


@pytest.mark.parametrize("db_backend", ["sqlite"])  # SQLite's own pragmas and locks
async def test_a_cancelled_append_still_waiting_its_turn_is_never_written(repo: SqlRepository, db_path: Path) -> None:
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        writing = asyncio.create_task(repo.add_message(ALICE, "user", "being written", 1))
        await asyncio.sleep(0.1)
        waiting = asyncio.create_task(repo.add_message(BOB, "user", "waiting", 1))
        await asyncio.sleep(0.1)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting  # at once: nothing of it was started
        assert not writing.done()
        blocker.execute("ROLLBACK")
        await writing
    finally:
        blocker.close()
    assert [m.content for m in await repo.recent_messages(ALICE, 10)] == ["being written"]
    assert await repo.recent_messages(BOB, 10) == []


# --------------------------------------------------------------------------- GroupCommit alone


class FakeCommit:
    """A commit function: records the contents of every batch and sets `called`, waits
    while `gate` is closed, then raises `failures[content]` for a batch holding that
    content, or stores the batch, each append reading back only itself."""

    def __init__(self, failures: dict[str, Exception] | None = None) -> None:
        self.batches: list[list[str]] = []
        self.called = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures = failures or {}
        self._next_id = 1

    async def __call__(self, batch: Sequence[Append]) -> list[Appended]:
        self.batches.append([append.content for append in batch])
        self.called.set()
        await self.gate.wait()
        for append in batch:
            if append.content in self.failures:
                raise self.failures[append.content]
        results = []
        for append in batch:
            stored = StoredMessage(self._next_id, append.role, append.content, append.token_count, append.created_at)
            self._next_id += 1
            results.append(Appended(stored, [stored]))
        return results


def _append(key: ConversationKey, content: str) -> Append:
    return Append(key, "user", content, 1, None, limit=1)


def _user(name: str) -> ConversationKey:
    return ConversationKey("telegram", "group", name)


async def test_a_batch_holds_at_most_max_batch_appends_and_one_per_conversation() -> None:
    commit = FakeCommit()
    group_commit = GroupCommit(commit, max_batch=3)
    sent = [(ALICE, "m0"), (ALICE, "m1"), (BOB, "m2"), (_user("c"), "m3"), (_user("d"), "m4"), (_user("e"), "m5")]

    results = await asyncio.gather(*(group_commit.write(_append(key, content)) for key, content in sent))

    # ALICE's second append waits for the next batch, and goes first in it.
    assert commit.batches == [["m0", "m2", "m3"], ["m1", "m4", "m5"]]
    assert [r.message.content for r in results] == [content for _, content in sent]
    assert [r.newest for r in results] == [[r.message] for r in results]


async def test_an_urgent_write_goes_in_the_next_batch_ahead_of_those_waiting() -> None:
    commit = FakeCommit()
    commit.gate.clear()
    group_commit = GroupCommit(commit, max_batch=2)
    first = asyncio.create_task(group_commit.write(_append(ALICE, "in flight")))
    await commit.called.wait()  # the first batch is being written
    waiting = [asyncio.create_task(group_commit.write(_append(_user(f"u{i}"), f"w{i}"))) for i in range(3)]
    urgent = asyncio.create_task(group_commit.write(_append(BOB, "urgent"), urgent=True))
    await asyncio.sleep(0)
    commit.gate.set()
    await asyncio.gather(first, urgent, *waiting)
    assert commit.batches == [["in flight"], ["urgent", "w0"], ["w1", "w2"]]


async def test_a_failed_batch_is_written_again_one_append_at_a_time(caplog: pytest.LogCaptureFixture) -> None:
    commit = FakeCommit({"b": StorageError("bad row")})
    group_commit = GroupCommit(commit, max_batch=8)

    with caplog.at_level(logging.WARNING, logger="storage.group_commit"):
        results = await asyncio.gather(
            *(group_commit.write(_append(_user(c), c)) for c in "abc"),
            return_exceptions=True,
        )

    assert commit.batches == [["a", "b", "c"], ["a"], ["b"], ["c"]]
    assert isinstance(results[1], StorageError) and str(results[1]) == "bad row"
    assert [r.message.content for r in results if isinstance(r, Appended)] == ["a", "c"]
    assert "group commit of 3 messages failed (bad row); writing them one by one" in caplog.text


async def test_an_unexpected_error_fails_the_batch_with_storage_error_and_the_writer_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    commit = FakeCommit({"b": RuntimeError("bug")})
    group_commit = GroupCommit(commit, max_batch=8)

    with caplog.at_level(logging.ERROR, logger="storage.group_commit"):
        results = await asyncio.gather(
            *(group_commit.write(_append(_user(c), c)) for c in "ab"),
            return_exceptions=True,
        )

    assert commit.batches == [["a", "b"]]  # not retried one by one
    assert [str(r) for r in results] == ["database error: RuntimeError"] * 2
    assert all(isinstance(r, StorageError) for r in results)
    assert "unexpected error while storing messages" in caplog.text
    assert (await group_commit.write(_append(ALICE, "later"))).message.content == "later"


async def test_appends_left_when_the_writer_is_cancelled_fail_as_shutting_down() -> None:
    commit = FakeCommit()
    commit.gate.clear()
    group_commit = GroupCommit(commit, max_batch=8)
    started = asyncio.create_task(group_commit.write(_append(ALICE, "started")))
    queued = asyncio.create_task(group_commit.write(_append(ALICE, "queued")))  # same conversation: next batch
    await commit.called.wait()  # the writer is inside the commit
    [writer] = [task for task in asyncio.all_tasks() if task.get_name() == "storage:appends"]

    writer.cancel()  # as when the event loop closes
    await group_commit.close()

    for task in (started, queued):
        with pytest.raises(StorageError, match="storage is shutting down"):
            await task
    assert commit.batches == [["started"]]
