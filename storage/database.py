"""Opening the database that `DATABASE_URL` names: SQLAlchemy's async engine for it (with
SQLite's pragmas on every connection; asyncpg for PostgreSQL), then its schema, migrated
to this release's (`storage.migrate`), then its health (`storage.health`: one process
per SQLite file, writable, not damaged; a watch on the file while the bot runs). Every
bad URL or unusable database becomes one `ConfigError`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path
from typing import Any

from alembic.util.exc import CommandError
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bot.errors import ConfigError, first_line
from storage import health, migrate

logger = logging.getLogger(__name__)

SUPPORTED_BACKENDS = ("sqlite", "postgresql")
SQLITE_PRAGMAS = ("journal_mode=WAL", "foreign_keys=ON", "busy_timeout=5000", "synchronous=NORMAL")
# The bot's own process (`open_database`) sets locking_mode=EXCLUSIVE before WAL: the WAL
# index then lives in heap memory instead of a memory-mapped -shm file, whose faults (an
# immutable file, a full disk) are SIGBUS, not errors (storage/health.py). That process,
# on its one connection, is the only user of the file anyway (it holds the instance lock).
EXCLUSIVE_PRAGMA = "locking_mode=EXCLUSIVE"
_EXAMPLE_URL = "sqlite+aiosqlite:///data/bot.db"


def _bad_url(problem: str) -> ConfigError:
    return ConfigError("DATABASE_URL", problem)


def _sqlite_file(url: URL) -> Path | None:
    """The database file of a SQLite URL, or None for an in-memory database."""
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database)


def _pragma_setter(pragmas: tuple[str, ...]) -> Callable[[Any, Any], None]:
    def set_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            for pragma in pragmas:
                cursor.execute(f"PRAGMA {pragma}")
        finally:
            cursor.close()

    return set_pragmas


def create_engine(url: str, *, exclusive: bool = False) -> AsyncEngine:
    """SQLAlchemy's async engine for `url` (SQLite via aiosqlite, or PostgreSQL).

    For SQLite the file's directory is created, every new connection gets the
    `SQLITE_PRAGMAS` (after `EXCLUSIVE_PRAGMA` with `exclusive`: no other connection,
    in this process or another, can open the file until the engine is disposed), and
    the file is watched (`storage.health.watch_sqlite_file`). Nothing connects yet:
    `init_db` does.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise _bad_url(f"not a database URL; expected something like {_EXAMPLE_URL}") from None
    backend = parsed.get_backend_name()
    if parsed.drivername in ("postgresql", "postgres"):  # no driver named: the async one we ship
        parsed, backend = parsed.set(drivername="postgresql+asyncpg"), "postgresql"
    if backend not in SUPPORTED_BACKENDS:
        raise _bad_url(f"unsupported database {backend!r}; use SQLite ({_EXAMPLE_URL}) or PostgreSQL")
    sqlite_file = _sqlite_file(parsed) if backend == "sqlite" else None
    if sqlite_file is not None:
        try:
            sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _bad_url(f"cannot create directory {sqlite_file.parent}: {exc.strerror}") from None
    try:
        # hide_parameters: message text must not end up in error logs.
        # SQLite takes one writer at a time, and a second connection waiting on the lock
        # sleeps in the busy handler (the latency tail under load): one connection
        # serializes the work without waits.
        pool: dict[str, Any] = (
            # Every unit of work ends in commit or rollback (`sessionmaker.begin()`),
            # so the pool's extra rollback on check-in would be a wasted round trip.
            {"pool_size": 1, "max_overflow": 0, "pool_reset_on_return": None}
            if sqlite_file is not None
            else {"pool_pre_ping": backend != "sqlite"}
        )
        if backend == "postgresql":
            # Appends are group-committed, so few connections write at once; reads of
            # settings and history run beside them. A restarted server's dead
            # connections are found by the ping instead of failing a turn.
            pool.update(pool_size=10, max_overflow=10, pool_reset_on_return=None)
        engine = create_async_engine(parsed, hide_parameters=True, **pool)
    except NoSuchModuleError:
        raise _bad_url(f"unknown database driver {parsed.drivername!r}") from None
    except ImportError as exc:
        raise _bad_url(f"driver for {parsed.drivername!r} is not installed ({exc.name})") from None
    except (ArgumentError, SQLAlchemyError) as exc:
        # e.g. a sync driver ("sqlite://"): the asyncio extension needs an async one.
        raise _bad_url(f"{parsed.drivername!r} cannot be used: {_driver_message(exc)}") from None
    if backend == "sqlite":
        pragmas = (EXCLUSIVE_PRAGMA, *SQLITE_PRAGMAS) if exclusive and sqlite_file is not None else SQLITE_PRAGMAS
        event.listen(engine.sync_engine, "connect", _pragma_setter(pragmas))
        health.watch_sqlite_file(engine)
    return engine


async def init_db(engine: AsyncEngine) -> None:
    """Connect, migrate the schema to this release's (`storage.migrate.upgrade`, under
    a lock), and check that the database can be written and is not damaged
    (`storage.health.check_database`). Raises `ConfigError` if the database is
    unusable or newer than this code."""
    try:
        await migrate.upgrade(engine)
    except (SQLAlchemyError, OSError, CommandError) as exc:
        raise _bad_url(f"cannot open the database: {_driver_message(exc)}") from None
    await health.check_database(engine)
    logger.info("Database ready: %s", engine.url.render_as_string(hide_password=True))
    if engine.dialect.name == "sqlite":
        logger.info("SQLite serves one bot process; for several processes use PostgreSQL")


@asynccontextmanager
async def open_database(url: str, *, exclusive: bool = True) -> AsyncIterator[AsyncEngine]:
    """`create_engine` + `init_db` for the bot's process: a SQLite file is first locked
    for this process (`storage.health.instance_lock`: a second bot on the file stops
    with a `ConfigError`) and opened in exclusive locking mode (see `create_engine`;
    `exclusive=False` only for tests that open the file from a second connection).
    Disposes the engine (closing its connections), then releases the lock, on exit."""
    engine = create_engine(url, exclusive=exclusive)
    database = health.sqlite_file(engine)
    if database is not None:
        health.check_writable(database)
    with health.instance_lock(database) if database is not None else nullcontext():
        try:
            await init_db(engine)
            yield engine
        finally:
            await engine.dispose()


def _driver_message(exc: BaseException) -> str:
    """The first line of the driver's own message, without SQLAlchemy's
    SQL/parameters/background lines."""
    inner = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return first_line(inner, limit=200)
