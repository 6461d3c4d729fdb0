"""Alembic migrations on both engines: a new database, the previous release's database
(adopted without losing a row), concurrent starts, a newer database refused, and the
next revision written by `storage.migrate revision`."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.errors import ConfigError
from bot.events import ConversationKey
from storage import migrate
from storage.database import create_engine, open_database
from storage.models import Base
from storage.repository import SqlRepository
from tests.pg import DbBackend

FIXTURES = Path(__file__).parent / "fixtures"
# What tests/storage/fixtures/release_09f24a3.db holds: the previous release's
# SqlRepository wrote it (add_message x7, set_setting x2, then closed).
PREVIOUS_ALICE = ConversationKey("telegram", "chat-1", "alice")
PREVIOUS_BOB = ConversationKey("discord", "guild-chan", "bob")
PREVIOUS_ALICE_TURNS = [
    ("user", "question 0", "tg-0"),
    ("assistant", "answer 0", "tg-r0"),
    ("user", "question 1", "tg-1"),
    ("assistant", "answer 1", "tg-r1"),
    ("user", "question 2", "tg-2"),
    ("assistant", "answer 2", "tg-r2"),
]


def _revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def _current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as connection:
        return await connection.run_sync(_revision)


def _schema_differences(connection: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


async def test_a_new_database_is_migrated_to_head_and_matches_the_models(database_url: str) -> None:
    async with open_database(database_url) as engine:
        assert await _current_revision(engine) == migrate.head_revision()
        async with engine.connect() as connection:
            assert await connection.run_sync(_schema_differences) == []


async def test_reopening_a_migrated_database_keeps_it_at_head(database_url: str) -> None:
    key = ConversationKey("telegram", "c", "u")
    async with open_database(database_url) as engine:
        repo = SqlRepository.from_engine(engine)
        await repo.add_message(key, "user", "kept", 1)
        await repo.close()
    async with open_database(database_url) as engine:
        assert await _current_revision(engine) == migrate.head_revision()
        assert [m.content for m in await SqlRepository.from_engine(engine).recent_messages(key, 5)] == ["kept"]


async def _previous_release_database(db_backend: DbBackend, database_url: str, tmp_path: Path) -> str:
    """A database exactly as the previous release (commit 09f24a3) left it: for SQLite
    the file its code wrote; for PostgreSQL its `create_all` DDL, with the same rows."""
    if db_backend == "sqlite":
        path = tmp_path / "previous.db"
        shutil.copyfile(FIXTURES / "release_09f24a3.db", path)
        return f"sqlite+aiosqlite:///{path}"
    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        await connection.execute((FIXTURES / "release_09f24a3_postgresql.sql").read_text())
        await connection.execute(
            """
            INSERT INTO conversations (platform, chat_id, user_id, settings, created_at, updated_at) VALUES
              ('telegram', 'chat-1', 'alice', '{"temperature": 0.7}', now(), now()),
              ('discord', 'guild-chan', 'bob', '{"system_prompt": "Be brief."}', now(), now());
            INSERT INTO messages (conversation_id, role, content, token_count, platform_message_id, created_at) VALUES
              (1, 'user', 'question 0', 3, 'tg-0', now()), (1, 'assistant', 'answer 0', 2, 'tg-r0', now()),
              (1, 'user', 'question 1', 3, 'tg-1', now()), (1, 'assistant', 'answer 1', 2, 'tg-r1', now()),
              (1, 'user', 'question 2', 3, 'tg-2', now()), (1, 'assistant', 'answer 2', 2, 'tg-r2', now()),
              (2, 'user', 'héllo ✓', 2, NULL, now());
            """
        )
    finally:
        await connection.close()
    return database_url


async def test_the_previous_releases_database_is_adopted_without_losing_a_row(
    db_backend: DbBackend, database_url: str, tmp_path: Path
) -> None:
    url = await _previous_release_database(db_backend, database_url, tmp_path)
    async with open_database(url) as engine:
        assert await _current_revision(engine) == migrate.head_revision()
        repo = SqlRepository.from_engine(engine)
        alice = await repo.recent_messages(PREVIOUS_ALICE, 100)
        assert [(m.role, m.content, m.platform_message_id) for m in alice] == PREVIOUS_ALICE_TURNS
        assert [m.content for m in await repo.recent_messages(PREVIOUS_BOB, 100)] == ["héllo ✓"]
        assert await repo.get_settings(PREVIOUS_ALICE) == {"temperature": 0.7}
        assert await repo.get_settings(PREVIOUS_BOB) == {"system_prompt": "Be brief."}
        assert (await repo.stats()).messages == 7
        # It goes on where it was: new messages get new ids after the old ones.
        newer = await repo.add_message(PREVIOUS_ALICE, "user", "after the upgrade", 1)
        assert newer.id > alice[-1].id
        await repo.close()
        async with engine.connect() as connection:
            assert await connection.run_sync(_schema_differences) == []


async def test_concurrent_starts_migrate_once_and_all_succeed(database_url: str) -> None:
    engines = [create_engine(database_url) for _ in range(4)]
    try:
        await asyncio.gather(*(migrate.upgrade(engine) for engine in engines))
        for engine in engines:
            assert await _current_revision(engine) == migrate.head_revision()
        async with engines[0].connect() as connection:
            versions = (await connection.execute(text("SELECT count(*) FROM alembic_version"))).scalar_one()
        assert versions == 1
    finally:
        for engine in engines:
            await engine.dispose()


async def test_a_database_newer_than_the_code_is_refused_with_one_line(database_url: str) -> None:
    async with open_database(database_url) as engine, engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))

    with pytest.raises(ConfigError) as info:
        async with open_database(database_url):
            pass
    message = str(info.value)
    assert info.value.setting == "DATABASE_URL"
    assert "\n" not in message
    assert "9999_from_the_future" in message and "newer" in message


def test_the_next_revision_is_written_after_the_newest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = tmp_path / "migrations"
    shutil.copytree(migrate.MIGRATIONS, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(migrate, "MIGRATIONS", scripts)
    # The newest shipped revision comes before; the new one is numbered after it.
    newest = max(p.name[:4] for p in (scripts / "versions").glob("[0-9]*_*.py"))

    assert migrate.main(["revision", "add a column"]) == 0

    expected = f"{int(newest) + 1:04d}"
    [written] = [p for p in (scripts / "versions").glob(f"{expected}_*.py")]
    source = written.read_text()
    assert f"revision = '{expected}'" in source or f'revision = "{expected}"' in source
    assert f"down_revision = '{newest}'" in source or f'down_revision = "{newest}"' in source
    assert migrate.head_revision() == expected
