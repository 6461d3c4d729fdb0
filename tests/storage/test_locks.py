"""Per-conversation advisory locks on PostgreSQL, between two repositories on one
database (as two processes would hold them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from bot.errors import StorageError
from storage.database import create_engine, open_database
from storage.locks import lock_id
from storage.repository import SqlRepository
from tests.storage.conftest import ALICE, BOB, SAME_IDS_ON_DISCORD

ON_POSTGRES = pytest.mark.parametrize("db_backend", ["postgresql"])


@pytest_asyncio.fixture(loop_scope="function")
async def other(db_url: str) -> AsyncIterator[SqlRepository]:
    """A second repository with its own engine: another process's."""
    async with open_database(db_url) as engine:
        repository = SqlRepository.from_engine(engine)
        yield repository
        await repository.close()


def test_lock_ids_are_stable_and_distinct() -> None:
    assert lock_id(ALICE) == lock_id(type(ALICE)("telegram", "chat-1", "alice"))
    assert len({lock_id(ALICE), lock_id(BOB), lock_id(SAME_IDS_ON_DISCORD)}) == 3
    assert -(2**63) <= lock_id(ALICE) < 2**63


@ON_POSTGRES
async def test_a_turn_waits_for_the_other_process_and_other_conversations_do_not(
    repo: SqlRepository, other: SqlRepository
) -> None:
    assert repo.shared and other.shared
    events: list[str] = []
    release = asyncio.Event()

    async def first() -> None:
        async with repo.conversation_turn(ALICE):
            events.append("first in")
            await release.wait()
            events.append("first out")

    async def second() -> None:
        async with other.conversation_turn(ALICE):
            events.append("second in")

    holder = asyncio.create_task(first())
    await asyncio.sleep(0.05)
    waiter = asyncio.create_task(second())
    await asyncio.sleep(0.2)
    assert events == ["first in"]  # still waiting
    async with other.conversation_turn(BOB):  # another conversation is not held up
        events.append("bob")
    release.set()
    await asyncio.gather(holder, waiter)
    assert events == ["first in", "bob", "first out", "second in"]


@ON_POSTGRES
async def test_waiters_get_the_lock_in_the_order_they_asked(repo: SqlRepository, other: SqlRepository) -> None:
    order: list[str] = []
    release = asyncio.Event()

    async def turn(repository: SqlRepository, name: str, hold: asyncio.Event | None = None) -> None:
        async with repository.conversation_turn(ALICE):
            order.append(name)
            if hold is not None:
                await hold.wait()

    first = asyncio.create_task(turn(repo, "a1", release))
    await asyncio.sleep(0.05)
    waiting = asyncio.create_task(turn(other, "b1"))
    await asyncio.sleep(0.1)
    release.set()
    await first
    # The first process asks again at once, but the other was waiting already.
    again = asyncio.create_task(turn(repo, "a2"))
    await asyncio.gather(waiting, again)
    assert order == ["a1", "b1", "a2"]


@ON_POSTGRES
async def test_a_turn_cancelled_while_waiting_leaves_no_lock_behind(repo: SqlRepository, other: SqlRepository) -> None:
    release = asyncio.Event()

    async def hold() -> None:
        async with repo.conversation_turn(ALICE):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.05)
    waiter = asyncio.create_task(other.conversation_turn(ALICE).__aenter__())
    await asyncio.sleep(0.1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    await holder
    async with asyncio.timeout(2):  # neither the cancelled request nor the first turn holds it
        async with other.conversation_turn(ALICE), repo.conversation_turn(BOB):
            pass


@ON_POSTGRES
async def test_an_unreachable_database_fails_the_turn_with_storage_error(db_url: str) -> None:
    engine = create_engine(db_url.rsplit("/", 1)[0] + "/no_such_database")
    try:
        lonely = SqlRepository.from_engine(engine)
        with pytest.raises(StorageError, match="conversation lock failed"):
            async with lonely.conversation_turn(ALICE):
                pass
        await lonely.close()
    finally:
        await engine.dispose()
