"""Opening the database: pragmas, directories, tables, and every bad DATABASE_URL."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.errors import ConfigError
from storage.database import create_engine, init_db, open_database
from tests.pg import PostgresCluster


@pytest.mark.parametrize("db_backend", ["sqlite"])  # SQLite's own pragmas and locks
async def test_every_new_connection_gets_wal_foreign_keys_and_busy_timeout(
    db_engine: AsyncEngine,
) -> None:
    # The pool holds one connection; dispose between checks so each is a new DBAPI one.
    for _ in range(2):
        async with db_engine.connect() as connection:
            pragmas = {
                name: (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar_one()
                for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
            }
        assert pragmas == {
            "journal_mode": "wal",
            "foreign_keys": 1,
            "busy_timeout": 5000,
            "synchronous": 1,  # NORMAL
        }
        await db_engine.dispose()


@pytest.mark.parametrize("db_backend", ["sqlite"])  # SQLite's own pragmas and locks
async def test_a_sqlite_file_is_served_by_one_connection(db_engine: AsyncEngine) -> None:
    # One writer at a time: a single connection serializes work instead of lock waits.
    assert db_engine.pool.size() == 1  # type: ignore[attr-defined]
    assert db_engine.pool._max_overflow == 0  # type: ignore[attr-defined]


async def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "bot.db"
    async with open_database(f"sqlite+aiosqlite:///{path}"):
        pass
    assert path.is_file()


async def test_init_db_creates_tables_and_indexes_and_is_idempotent(
    db_engine: AsyncEngine,
) -> None:
    await init_db(db_engine)  # the fixture already ran it once

    def describe(sync_connection: object) -> tuple[set[str], set[str], set[str]]:
        inspector = inspect(sync_connection)
        return (
            set(inspector.get_table_names()),
            {i["name"] or "" for i in inspector.get_indexes("messages")},
            {c["name"] or "" for c in inspector.get_unique_constraints("conversations")},
        )

    async with db_engine.connect() as connection:
        tables, indexes, uniques = await connection.run_sync(describe)
    assert {"conversations", "messages"} <= tables
    assert "ix_messages_conversation_id_id" in indexes
    assert "uq_conversations_key" in uniques


async def test_opening_is_logged_with_the_url(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="storage.database")
    async with open_database(db_url):
        pass
    assert f"Database ready: {db_url}" in caplog.text


def test_password_in_a_rejected_url_is_not_shown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        create_engine(f"sqlite+aiosqlite://user:s3cret@/{tmp_path / 'bot.db'}")
    assert info.value.setting == "DATABASE_URL"
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("not a url", "not a database URL"),
        ("nosuchdb://host/db", "unsupported database 'nosuchdb'"),
        ("mysql+aiomysql://user:pw@host/db", "unsupported database 'mysql'"),
        ("sqlite+nosuchdriver:///bot.db", "unknown database driver"),
        ("sqlite:///bot.db", "async driver"),
        # asyncpg ships with the bot; psycopg 3 (an async driver too) does not.
        ("postgresql+psycopg://user:s3cret@host/db", "not installed"),
    ],
)
def test_bad_database_url_raises_config_error_naming_the_setting(url: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_engine(url)
    assert info.value.setting == "DATABASE_URL"
    assert reason in info.value.problem
    assert "s3cret" not in str(info.value)
    assert "\n" not in str(info.value)


def test_directory_that_cannot_be_created_raises_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError) as info:
        create_engine(f"sqlite+aiosqlite:///{blocker / 'sub' / 'bot.db'}")
    assert info.value.setting == "DATABASE_URL"
    assert "cannot create directory" in info.value.problem


async def test_file_that_is_not_a_database_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    path.write_bytes(b"this is not a SQLite database " * 100)
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        with pytest.raises(ConfigError) as info:
            await init_db(engine)
    finally:
        await engine.dispose()
    assert info.value.setting == "DATABASE_URL"
    assert "file is not a database" in info.value.problem


async def test_database_path_that_is_a_directory_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        async with open_database(f"sqlite+aiosqlite:///{tmp_path}"):
            pass
    assert info.value.setting == "DATABASE_URL"
    assert "unable to open database file" in info.value.problem
    await _aiosqlite_threads_ended()


async def _aiosqlite_threads_ended() -> None:
    """aiosqlite (0.22) stops the thread of a connection that failed to open without
    waiting for it; if this test's loop closed first, the thread would report "Event
    loop is closed" during a later test."""
    for thread in threading.enumerate():
        if thread.name.endswith("(_connection_worker_thread)"):
            await asyncio.to_thread(thread.join, 5)


async def test_in_memory_database_works() -> None:
    async with open_database("sqlite+aiosqlite://") as engine, engine.connect() as connection:
        assert (await connection.execute(text("SELECT count(*) FROM messages"))).scalar() == 0


# --------------------------------------------------------------------------- PostgreSQL


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens once the socket is closed


@pytest.mark.parametrize(
    "problem", ["nothing listening", "no such database", "no such user"], ids=["closed-port", "database", "user"]
)
async def test_an_unusable_postgresql_url_is_one_config_error(
    problem: str, postgres_cluster: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    url = {
        "nothing listening": f"postgresql+asyncpg://bot:pw-s3cret@127.0.0.1:{_closed_port()}/bot",
        "no such database": postgres_cluster.url("no_such_database"),
        "no such user": postgres_cluster.url().replace("postgres@", "nobody_here:pw-s3cret@"),
    }[problem]
    with pytest.raises(ConfigError) as info:
        async with open_database(url):
            pass
    assert info.value.setting == "DATABASE_URL"
    assert info.value.problem.startswith("cannot open the database: ")
    assert "\n" not in str(info.value) and "pw-s3cret" not in str(info.value) + caplog.text


def test_a_postgresql_url_without_a_driver_uses_asyncpg() -> None:
    engine = create_engine("postgresql://bot@127.0.0.1:5432/bot")
    assert engine.url.drivername == "postgresql+asyncpg"
    assert engine.pool.size() == 10  # type: ignore[attr-defined]


@pytest.mark.parametrize("db_backend", ["sqlite"])
async def test_sqlite_says_it_serves_one_process(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="storage.database")
    async with open_database(db_url):
        pass
    assert "SQLite serves one bot process; for several processes use PostgreSQL" in caplog.text
