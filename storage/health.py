"""The database's health: one bot process per SQLite file, a start-up check that the
database can be written (and, for SQLite, is not damaged), and a watch on the SQLite
file while the bot runs.

- **One instance per file.** `instance_lock` takes an OS lock (`flock`) on
  `<database>.lock` for the life of the process; a second bot on the same file stops at
  start-up with one line naming `DATABASE_URL` and the pid that holds it. The kernel
  drops the lock when the process ends, even by `kill -9`, so a crash never leaves a
  stale lock behind. Several processes are what PostgreSQL is for.
- **Start-up.** `check_writable` looks at the file's and its directory's permissions and
  flags (SQLite would only say "disk I/O error"); `check_database` makes one real write
  (the schema revision rewritten with itself, committed), so a read-only file, replica,
  role or `?mode=ro` URL fails at once instead of on every message. For SQLite it runs `PRAGMA quick_check` on
  files up to `QUICK_CHECK_MAX_BYTES` (256 MiB: a few seconds at most, cold); a larger
  file is only logged, so start-up stays fast — check it offline with `sqlite3`.
- **While running.** `watch_sqlite_file` compares the file's identity (device and inode)
  with the one the connection opened before every statement and every commit. A
  database file (or its directory) deleted or replaced under a running bot is written
  to nowhere: SQLite keeps writing the unlinked inode, and all of it is gone at exit.
  The watch makes those writes fail with `StorageError` before a commit can claim
  success, logs one ERROR when it happens and one INFO when the file is back.

Memory-mapped I/O: the Python build's SQLite has `mmap_size` 0 (reads use `read()`), but
WAL's `-shm` index is a shared memory map of a file. Writing to a map whose file was made
immutable (`chattr +i`), or whose file system is full, kills the process with SIGBUS —
no exception, no log line. `storage.database` therefore sets `locking_mode=EXCLUSIVE`
before `journal_mode=WAL`: SQLite then keeps the WAL index in heap memory and creates no
`-shm` file (see https://sqlite.org/wal.html, "Use of WAL without shared-memory"), so the
same faults become I/O errors that the repository reports as `StorageError`. The bot
loses nothing by it (one process, on one connection, uses the file); the price is that
no other process can open the file while the bot runs (copy it, or stop the bot, to look
inside with `sqlite3`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.errors import ConfigError, StorageError, first_line

logger = logging.getLogger(__name__)

QUICK_CHECK_MAX_BYTES = 256 * 1024 * 1024
"""`PRAGMA quick_check` reads every page. Measured on the 2-core test VM with a 204 MiB
file (450k rows, one index): 0.17 s from the page cache, 3.6 s after dropping it — a
few seconds at most, next to a model load of several. Larger files (about half a million
messages) skip it at start-up, with a log line."""


def lock_path(database: Path) -> Path:
    """The lock file that marks `database` as in use: `<database>.lock`."""
    return database.with_name(database.name + ".lock")


@contextlib.contextmanager
def instance_lock(database: Path) -> Iterator[None]:
    """Hold the OS lock on `database`'s lock file while the block runs. Raises
    `ConfigError` (naming `DATABASE_URL`) when another process holds it."""
    path = lock_path(database)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError("DATABASE_URL", f"cannot create the lock file {path}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ConfigError("DATABASE_URL", f"cannot lock {path}: {exc.strerror}") from None
            holder = _read_pid(fd)
            raise ConfigError(
                "DATABASE_URL",
                f"another bot instance{f' (pid {holder})' if holder else ''} is using {database}; "
                "stop it first (a SQLite file serves one process; several need PostgreSQL)",
            ) from None
        # Who holds it, for the next one's message (the lock, not this text, is what counts).
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the file releases the lock


def _read_pid(fd: int) -> str:
    try:
        raw = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return raw if raw.isdigit() else ""


# --------------------------------------------------------------------------- start-up


def check_writable(database: Path) -> None:
    """Raise `ConfigError` naming `DATABASE_URL` if the SQLite file, its WAL or its
    directory cannot be written (read-only permissions, `chattr +i`, a read-only mount):
    SQLite itself would only say "disk I/O error"."""
    directory = database.parent
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError("DATABASE_URL", f"the database cannot be written: its directory {directory} is read-only")
    for path in (database, database.with_name(database.name + "-wal")):
        if path.exists() and not os.access(path, os.W_OK):
            raise ConfigError("DATABASE_URL", f"the database cannot be written: {path} is read-only")


async def check_database(engine: AsyncEngine) -> None:
    """Check at start-up that the database can be written and (SQLite) is not damaged.
    Raises `ConfigError` naming `DATABASE_URL`; run after the schema is migrated."""
    try:
        async with engine.begin() as connection:
            # A real write (the row is rewritten and committed) without changing anything.
            await connection.execute(text("UPDATE alembic_version SET version_num = version_num"))
    except (SQLAlchemyError, OSError, StorageError) as exc:
        raise ConfigError("DATABASE_URL", f"the database cannot be written: {_message(exc)}") from None
    database = sqlite_file(engine)
    if database is None:
        return
    size = database.stat().st_size
    if size > QUICK_CHECK_MAX_BYTES:
        logger.info(
            "Skipping the integrity check of %s (%d MiB, over %d MiB); run `sqlite3 %s 'PRAGMA quick_check'` offline",
            database,
            size >> 20,
            QUICK_CHECK_MAX_BYTES >> 20,
            database,
        )
        return
    try:
        async with engine.connect() as connection:
            problems = [row[0] for row in await connection.exec_driver_sql("PRAGMA quick_check")]
    except (SQLAlchemyError, OSError) as exc:
        problems = [_message(exc)]
    if problems != ["ok"]:
        raise ConfigError(
            "DATABASE_URL",
            f"{database} is damaged ({len(problems)} problem(s) found by PRAGMA quick_check, "
            f"the first: {first_line(Exception(problems[0]), limit=120)}); restore a backup, "
            "or salvage it with `sqlite3 <file> .recover`",
        )


def _message(exc: BaseException) -> str:
    inner = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    return first_line(inner, limit=200)


# --------------------------------------------------------------------------- while running


def sqlite_file(engine: AsyncEngine) -> Path | None:
    """The absolute path of the engine's SQLite file, or None (in memory, or not SQLite)."""
    database = engine.url.database or ""
    if engine.dialect.name != "sqlite" or database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database).absolute()


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class _FileWatch:
    """The listeners of one engine: the file's identity is taken when the engine first
    connects (for the engine's life: a later connection must not adopt an empty file
    that SQLite made in place of a deleted one) and compared before each statement and
    each commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._expected: tuple[int, int] | None = None
        self._emptied = False  # a later connection found an empty file in place of ours
        self._failing = False  # logged once when the file goes, once when it is back

    def on_connect(self, dbapi_connection: Any, _record: Any) -> None:
        if self._expected is None:
            self._expected = _file_id(self.path)
            return
        # A new connection after the first (the pool replaced one). Once no connection
        # holds the deleted file open, the kernel may give the new empty file SQLite
        # makes in its place the same inode number: an empty schema tells them apart.
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT count(*) FROM sqlite_master")
            self._emptied = self._emptied or cursor.fetchone()[0] == 0
        finally:
            cursor.close()

    def check(self, _connection: Connection) -> None:
        expected = self._expected
        if expected is None:
            return
        current = _file_id(self.path)
        if current == expected and not self._emptied:
            if self._failing:
                self._failing = False
                logger.info("The database file %s is back; storing again", self.path)
            return
        what = "deleted" if current is None else "replaced by another file"  # (emptied: replaced)
        if not self._failing:
            self._failing = True
            logger.error(
                "The database file %s was %s while the bot runs: nothing can be stored until it is back "
                "(put it back, or restart the bot to start an empty one)",
                self.path,
                what,
            )
        raise StorageError(f"the database file {self.path} was {what}")

    def before_execute(self, connection: Connection, *_: Any) -> None:
        self.check(connection)

    def before_commit(self, connection: Connection) -> None:
        try:
            self.check(connection)
        except StorageError:
            # SQLAlchemy leaves the failed transaction for the caller to roll back; do it
            # here too, so that nothing of it can ride along with a later commit.
            with contextlib.suppress(Exception):
                connection.connection.dbapi_connection.rollback()  # type: ignore[union-attr]
            raise


def watch_sqlite_file(engine: AsyncEngine) -> None:
    """Make every statement and commit on `engine` fail with `StorageError` once its
    SQLite file is deleted or replaced (and work again once the same file is back).
    Nothing for in-memory databases or other backends."""
    path = sqlite_file(engine)
    if path is None:
        return
    watch = _FileWatch(path)
    sync_engine = engine.sync_engine
    event.listen(sync_engine, "connect", watch.on_connect)
    event.listen(sync_engine, "before_cursor_execute", watch.before_execute)
    event.listen(sync_engine, "commit", watch.before_commit)
