"""Storage fixtures: a real SQLite file per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.database import open_database
from storage.repository import SqlRepository


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "bot.db"


@pytest.fixture
def db_url(db_path: Path) -> str:
    return f"sqlite+aiosqlite:///{db_path}"


# The engine's connections belong to the loop that opened them: the test's own loop.
@pytest_asyncio.fixture(loop_scope="function")
async def db_engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    async with open_database(db_url) as engine:
        yield engine


@pytest_asyncio.fixture(loop_scope="function")
async def repo(db_engine: AsyncEngine) -> AsyncIterator[SqlRepository]:
    repository = SqlRepository.from_engine(db_engine)
    yield repository
    await repository.close()  # before the engine is disposed
