"""Two bot cores on one PostgreSQL database, as two processes would run: each with its own
engine, repository, lock connections, worker and manager. A conversation's turns take
turns across them, settings changed through one are seen by the other, and SQLite says
it serves one process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest

from bot.core import Core, open_core
from bot.events import ConversationKey
from tests.conftest import Harness
from tests.fakes.events import incoming
from tests.fakes.fake_engine import FakeEngine
from tests.fakes.targets import RecordingTarget

ALICE = ConversationKey("telegram", "c1", "u1")


@asynccontextmanager
async def two_cores(harness: Harness) -> AsyncIterator[tuple[Core, Core, FakeEngine, FakeEngine]]:
    """Two cores on the harness's database, each opening it itself (no shared repository)."""
    first, second = FakeEngine(), FakeEngine()
    for engine in (first, second):
        engine.step_delay = 0.01
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_core(harness.settings(), lambda: first))
        b = await stack.enter_async_context(open_core(harness.settings(), lambda: second))
        yield a, b, first, second


@pytest.mark.parametrize("db_backend", ["postgresql"])
async def test_one_conversations_messages_alternating_between_two_processes_stay_in_order(
    harness: Harness,
) -> None:
    async with two_cores(harness) as (a, b, engine_a, engine_b):
        assert a.repository.shared and b.repository.shared
        targets = [RecordingTarget() for _ in range(6)]
        handled = []
        for i, target in enumerate(targets):
            core = a if i % 2 == 0 else b
            handled.append(asyncio.create_task(core.manager.handle(incoming(f"message {i}"), target)))
            await asyncio.sleep(0.05)  # a reply takes longer: each arrives while one runs
        await asyncio.gather(*handled)

    for i, target in enumerate(targets):
        assert target.text == f"Echo: message {i}", i
    history = await harness.repo.recent_messages(ALICE, 100)
    # One turn at a time across both: each question is followed by its own answer.
    expected = [
        (role, text) for i in range(6) for role, text in (("user", f"message {i}"), ("assistant", f"Echo: message {i}"))
    ]
    assert [(m.role, m.content) for m in history] == expected
    assert len(engine_a.added) == 3 and len(engine_b.added) == 3


@pytest.mark.parametrize("db_backend", ["postgresql"])
async def test_settings_changed_in_one_process_apply_to_the_next_turn_in_the_other(harness: Harness) -> None:
    async with two_cores(harness) as (a, b, _engine_a, engine_b):
        await b.manager.handle(incoming("before", user="admin"), RecordingTarget())  # b has read them once
        answer = RecordingTarget()
        await a.manager.handle(incoming("/config set system_prompt You are a pirate.", user="admin", chat="c1"), answer)
        assert "system_prompt" in answer.text
        admin_key = ConversationKey("telegram", "c1", "admin")

        await b.manager.handle(incoming("after", user="admin"), RecordingTarget())
        assert "You are a pirate." in engine_b.added[-1]
        assert await b.repository.get_settings(admin_key) == {"system_prompt": "You are a pirate."}

        await a.manager.handle(incoming("/config reset", user="admin"), RecordingTarget())
        await b.manager.handle(incoming("again", user="admin"), RecordingTarget())
        assert "You are a pirate." not in engine_b.added[-1]


@pytest.mark.parametrize("db_backend", ["postgresql"])
async def test_stats_count_what_every_process_stored(harness: Harness) -> None:
    async with two_cores(harness) as (a, b, _engine_a, _engine_b):
        await a.manager.handle(incoming("one", user="u1"), RecordingTarget())
        await b.manager.handle(incoming("two", user="u2"), RecordingTarget())
        stats = RecordingTarget()
        await a.manager.handle(incoming("/stats", user="admin"), stats)
    # The admin is a user too: the /stats command is stored as a turn of their conversation.
    assert "Users: 3" in stats.text and "Messages: 4" in stats.text
    assert "Tokens generated (this process)" in stats.text


async def test_sqlite_is_one_process_and_takes_no_locks(harness: Harness) -> None:
    assert harness.repo.shared is False
    async with harness.repo.conversation_turn(ALICE), harness.repo.conversation_turn(ALICE):
        pass  # nothing to wait for: the manager alone orders a conversation's turns
