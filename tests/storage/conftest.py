"""Storage fixtures: a real SQLite file or PostgreSQL database per test, the conversations the tests write to,
and a way to see the SQL a test sends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.events import ConversationKey
from storage.database import open_database
from storage.repository import SqlRepository
from tests.pg import DbBackend

ALICE = ConversationKey("telegram", "chat-1", "alice")
BOB = ConversationKey("telegram", "chat-1", "bob")
ALICE_ELSEWHERE = ConversationKey("telegram", "chat-2", "alice")
SAME_IDS_ON_DISCORD = ConversationKey("discord", "chat-1", "alice")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_backend(request: pytest.FixtureRequest) -> DbBackend:
    """Every storage test runs on both engines, except those that parametrize
    `db_backend` themselves (SQLite's pragmas and file locks)."""
    backend: DbBackend = request.param
    return backend


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """The SQLite file of `database_url` (for the SQLite-only tests)."""
    return tmp_path / "data" / "bot.db"


@pytest.fixture
def db_url(database_url: str) -> str:
    return database_url


# The database engine's connections belong to the loop that opened them: the test's own loop.
@pytest_asyncio.fixture(loop_scope="function")
async def db_engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    # Not in SQLite's exclusive locking mode: some tests hold the write lock from a second
    # connection (tests/storage/test_database.py checks the bot's exclusive mode itself).
    async with open_database(db_url, exclusive=False) as engine:
        yield engine


@pytest_asyncio.fixture(loop_scope="function")
async def repo(db_engine: AsyncEngine) -> AsyncIterator[SqlRepository]:
    repository = SqlRepository.from_engine(db_engine)
    yield repository
    await repository.close()  # before the engine is disposed


def captured_sql(engine: AsyncEngine) -> list[tuple[str, Any]]:
    """Every statement the engine sends from now on, with its parameters."""
    seen: list[tuple[str, Any]] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        seen.append((statement, parameters))

    return seen
