"""Storage health (storage/health.py): one bot per SQLite file, the start-up checks
(writable, not damaged), and the database file deleted, replaced or made immutable
under a running bot — in this process, and with real bot processes (the real bot
around the fake engine, in the terminal chat mode, on a real SQLite file)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from bot.errors import ConfigError, StorageError
from bot.events import ConversationKey
from storage import health
from storage.database import create_engine, init_db, open_database
from storage.repository import SqlRepository
from tests.fakes.console_process import console_bot

ALICE = ConversationKey("telegram", "chat-1", "alice")
STORAGE_TROUBLE = StorageError.user_message


def url_of(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def _chattr_works(directory: Path) -> bool:
    probe = directory / "chattr-probe"
    probe.write_text("x")
    try:
        made = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False
    if made:
        subprocess.run(["chattr", "-i", str(probe)], check=True)
    probe.unlink()
    return made


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    """`chattr +i` on `paths` for the block (root on a file system that supports it)."""
    subprocess.run(["chattr", "+i", *map(str, paths)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


needs_chattr = pytest.mark.skipif(
    not _chattr_works(Path(os.environ.get("TMPDIR", "/tmp"))),
    reason="chattr +i needs root (CAP_LINUX_IMMUTABLE) and ext4/xfs/btrfs; CI runs as root",
)


# --------------------------------------------------------------------------- one instance per file


async def test_the_bots_connection_keeps_the_wal_index_in_heap_memory(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    async with open_database(url_of(path)) as engine:
        repo = SqlRepository.from_engine(engine)
        await repo.add_message(ALICE, "user", "hello", 1)
        async with engine.connect() as connection:
            mode = (await connection.exec_driver_sql("PRAGMA locking_mode")).scalar_one()
            journal = (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar_one()
        assert (mode, journal) == ("exclusive", "wal")
        # No memory-mapped -shm file: nothing a file-system fault can turn into SIGBUS.
        files = sorted(p.name for p in tmp_path.iterdir())  # noqa: ASYNC240 - the test's own directory
        assert files == ["bot.db", "bot.db-wal", "bot.db.lock", "bot.db.migrate-lock"]
        # And nobody else reads or writes the file meanwhile.
        other = sqlite3.connect(path, timeout=0.1)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("SELECT count(*) FROM messages").fetchall()
        finally:
            other.close()
        await repo.close()
    # Closed: the file is everybody's again, with what was written.
    with contextlib.closing(sqlite3.connect(path)) as other:
        assert other.execute("SELECT content FROM messages").fetchall() == [("hello",)]


async def test_engines_for_tools_and_tests_share_the_file(tmp_path: Path) -> None:
    engine = create_engine(url_of(tmp_path / "bot.db"))
    try:
        await init_db(engine)
        async with engine.connect() as connection:
            assert (await connection.exec_driver_sql("PRAGMA locking_mode")).scalar_one() == "normal"
    finally:
        await engine.dispose()


async def test_a_second_open_of_one_file_is_refused_with_one_line_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "data" / "bot.db"
    async with open_database(url_of(path)):
        with pytest.raises(ConfigError) as info:
            async with open_database(url_of(path)):
                pass
        assert info.value.setting == "DATABASE_URL"
        assert info.value.problem == (
            f"another bot instance (pid {os.getpid()}) is using {path}; "
            "stop it first (a SQLite file serves one process; several need PostgreSQL)"
        )
    # Released on close: the next start gets it.
    async with open_database(url_of(path)) as engine, engine.connect() as connection:
        assert (await connection.execute(text("SELECT count(*) FROM messages"))).scalar_one() == 0


async def test_a_lock_file_that_cannot_be_created_is_one_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    health.lock_path(path).mkdir()  # a directory where the lock file goes
    with pytest.raises(ConfigError) as info:
        async with open_database(url_of(path)):
            pass
    assert info.value.setting == "DATABASE_URL"
    assert "cannot create the lock file" in info.value.problem


# --------------------------------------------------------------------------- start-up checks


async def _fill(path: Path, messages: int) -> None:
    async with open_database(url_of(path)) as engine:
        repo = SqlRepository.from_engine(engine)
        for i in range(messages):
            await repo.add_message(ALICE, "user", f"message {i} " + "x" * 500, 1)
        await repo.close()


def _corrupt_a_table_page(path: Path) -> None:
    """Overwrite the middle of one of the messages table's leaf pages: the file still
    opens, and the schema reads fine, but the page is garbage."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    assert pages > 20
    with path.open("r+b") as f:
        f.seek(page_size * (pages - 5))
        f.write(b"\xa5" * page_size)


async def test_a_damaged_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    await _fill(path, 200)
    _corrupt_a_table_page(path)
    with pytest.raises(ConfigError) as info:
        async with open_database(url_of(path)):
            pass
    assert info.value.setting == "DATABASE_URL"
    assert info.value.problem.startswith(f"{path} is damaged (")
    assert "PRAGMA quick_check" in info.value.problem and "\n" not in str(info.value)


async def test_files_over_the_size_limit_skip_the_integrity_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "bot.db"
    await _fill(path, 200)
    _corrupt_a_table_page(path)
    monkeypatch.setattr(health, "QUICK_CHECK_MAX_BYTES", 64 * 1024)
    caplog.set_level(logging.INFO, logger="storage.health")
    async with open_database(url_of(path)):
        pass  # starts: the damage is found only when that page is read
    assert f"Skipping the integrity check of {path}" in caplog.text


@needs_chattr
async def test_a_file_that_cannot_be_written_stops_start_up_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    await _fill(path, 1)
    for frozen, problem in ((path, f"{path} is read-only"), (tmp_path, f"its directory {tmp_path} is read-only")):
        with immutable(frozen), pytest.raises(ConfigError) as info:
            async with open_database(url_of(path)):
                pass
        assert info.value.setting == "DATABASE_URL"
        assert info.value.problem == f"the database cannot be written: {problem}"


async def test_a_database_opened_read_only_stops_start_up_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    await _fill(path, 1)
    # The file is writable, but this connection is not (like a read-only replica or role).
    with pytest.raises(ConfigError) as info:
        async with open_database(f"sqlite+aiosqlite:///file:{path}?mode=ro&uri=true"):
            pass
    assert info.value.setting == "DATABASE_URL"
    assert info.value.problem == "the database cannot be written: attempt to write a readonly database"


# --------------------------------------------------------------------------- while running


@contextlib.asynccontextmanager
async def repository(path: Path) -> AsyncIterator[SqlRepository]:
    async with open_database(url_of(path)) as engine:
        repo = SqlRepository.from_engine(engine)
        try:
            yield repo
        finally:
            await repo.close()


async def test_a_deleted_directory_fails_every_write_and_read_until_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="storage.health")
    directory = tmp_path / "data"
    async with repository(directory / "bot.db") as repo:
        await repo.add_message(ALICE, "user", "before", 1)
        moved = directory.rename(tmp_path / "elsewhere")  # as good as deleted, but can come back
        caplog.clear()
        for _ in range(3):
            with pytest.raises(StorageError, match="was deleted"):
                await repo.add_message(ALICE, "user", "while gone", 1)
        with pytest.raises(StorageError):
            await repo.recent_messages(ALICE, 10)
        with pytest.raises(StorageError):
            await repo.ping()
        errors = [r for r in caplog.records if r.name == "storage.health" and r.levelno == logging.ERROR]
        assert len(errors) == 1  # once, not once per message
        assert "was deleted while the bot runs" in errors[0].getMessage()

        moved.rename(directory)
        await repo.ping()
        await repo.add_message(ALICE, "user", "after", 1)
        assert [m.content for m in await repo.recent_messages(ALICE, 10)] == ["before", "after"]
        assert "is back; storing again" in caplog.text


async def test_a_commit_after_the_file_went_fails_and_nothing_of_it_lands_later(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    async with open_database(url_of(directory / "bot.db")) as engine:
        async with engine.begin() as connection:
            await connection.execute(text("CREATE TABLE notes (x INTEGER)"))
        with pytest.raises(StorageError, match="was deleted"):
            async with engine.begin() as connection:
                await connection.execute(text("INSERT INTO notes VALUES (1)"))
                moved = directory.rename(tmp_path / "elsewhere")  # between the write and its commit
        moved.rename(directory)
        async with engine.begin() as connection:
            await connection.execute(text("INSERT INTO notes VALUES (2)"))
        async with engine.connect() as connection:
            # The failed transaction was rolled back: it did not ride along with the next commit.
            assert (await connection.execute(text("SELECT x FROM notes"))).all() == [(2,)]


async def test_a_replaced_file_is_not_written_to(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    async with repository(path) as repo:
        await repo.add_message(ALICE, "user", "before", 1)
        shutil.copy(path, tmp_path / "copy.db")
        (tmp_path / "copy.db").replace(path)  # e.g. a backup restored under the running bot
        with pytest.raises(StorageError, match="was replaced by another file"):
            await repo.add_message(ALICE, "user", "into the old inode", 1)


async def test_a_reconnect_never_adopts_the_empty_file_sqlite_makes_in_place_of_a_deleted_one(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    async with open_database(url_of(path)) as engine:
        path.unlink()
        await engine.dispose()  # the next connection creates a new, empty bot.db
        with pytest.raises(StorageError, match="was replaced by another file"):
            async with engine.connect() as connection:
                await connection.execute(text("SELECT count(*) FROM messages"))


# --------------------------------------------------------------------------- real processes


async def test_a_second_bot_process_on_one_file_exits_2_with_one_line(tmp_path: Path) -> None:
    database = tmp_path / "data" / "bot.db"
    async with console_bot(database, tmp_path) as first:
        await first.wait_ready()
        assert await first.ask("hello") == "P echo: hello"
        async with console_bot(database, tmp_path) as second:
            assert await second.exit_code() == 2
        expected = (
            f"Configuration error: DATABASE_URL: another bot instance (pid {first.pid}) is using {database}; "
            "stop it first (a SQLite file serves one process; several need PostgreSQL)"
        )
        assert [line.split(": ", 1)[1] for line in second.errors()] == [expected], second.log
        assert await first.ask("still here?") == "P echo: still here?"  # the first one never noticed
        assert await first.finish() == 0
    # Once the first has ended, the file is free again; after a kill -9 as well (the kernel drops the lock).
    async with console_bot(database, tmp_path) as third:
        await third.wait_ready()
        assert await third.ask("after a clean stop") == "P echo: after a clean stop"
        await third.kill()
    async with console_bot(database, tmp_path) as fourth:
        await fourth.wait_ready()
        assert await fourth.finish() == 0
        assert not fourth.errors()


async def test_concurrent_first_starts_on_a_new_file_leave_exactly_one_running(tmp_path: Path) -> None:
    database = tmp_path / "data" / "bot.db"
    async with contextlib.AsyncExitStack() as stack:
        bots = [await stack.enter_async_context(console_bot(database, tmp_path)) for _ in range(3)]
        exits = [asyncio.create_task(b.exit_code()) for b in bots]
        while sum(task.done() for task in exits) < 2:
            await asyncio.wait(exits, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        for task in exits:
            task.cancel()
        [running] = [b for b in bots if b.returncode is None]  # whoever locked first, not the first started
        await running.wait_ready()
        assert await running.ask("hi") == "P echo: hi"
        for loser in (b for b in bots if b is not running):
            assert await loser.exit_code() == 2
            [error] = loser.errors()
            assert "Configuration error: DATABASE_URL: another bot instance" in error, loser.log
        assert await running.finish() == 0
        assert not running.errors()


async def test_a_bot_whose_database_directory_is_deleted_tells_users_and_says_so_once(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    async with console_bot(directory / "bot.db", tmp_path) as bot:
        await bot.wait_ready()
        assert await bot.ask("hello") == "P echo: hello"
        shutil.rmtree(directory)
        for text in ("is anyone there?", "hello again"):
            assert await bot.ask(text) == STORAGE_TROUBLE  # never an answer it could not store
        gone = [line for line in bot.log if "storage.health" in line and " ERROR " in line]
        assert len(gone) == 1 and "was deleted while the bot runs" in gone[0], bot.log
        assert bot.returncode is None
        await bot.finish()
    assert not directory.exists()  # nothing written anywhere after it went


@needs_chattr
async def test_an_immutable_database_file_is_an_error_not_sigbus(tmp_path: Path) -> None:
    directory = tmp_path / "data"
    async with console_bot(directory / "bot.db", tmp_path) as bot:
        await bot.wait_ready()
        assert await bot.ask("hello") == "P echo: hello"
        files = sorted(directory.iterdir())
        assert not any(p.name.endswith("-shm") for p in files)  # the WAL index is not memory-mapped
        with immutable(*files):
            for i in range(3):
                assert await bot.ask(f"message {i}") == STORAGE_TROUBLE
            assert bot.returncode is None  # alive: no SIGBUS
        assert any("database error" in line or "disk I/O error" in line for line in bot.log), bot.log
        assert await bot.ask("writable again") == "P echo: writable again"  # and it carries on
        await bot.finish()
    assert bot.returncode is not None and bot.returncode >= 0


def test_with_a_memory_mapped_wal_index_the_same_fault_is_sigbus(tmp_path: Path) -> None:
    """Why the bot keeps the WAL index in heap memory: SQLite's default on this very machine."""
    if not _chattr_works(tmp_path):
        pytest.skip("chattr +i needs root and a file system that supports it")
    script = (
        "import sqlite3, subprocess, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA journal_mode=WAL'); db.execute('CREATE TABLE t (x)')\n"
        "db.execute('INSERT INTO t VALUES (1)')\n"
        "subprocess.run(['chattr', '+i', sys.argv[1] + '-shm'], check=True)\n"
        "try:\n"
        "    for i in range(100): db.execute('INSERT INTO t VALUES (?)', ('x' * 1000,))\n"
        "except sqlite3.Error as exc: print('error', exc)\n"
    )
    database = tmp_path / "plain.db"
    try:
        done = subprocess.run([sys.executable, "-c", script, str(database)], capture_output=True, timeout=60)
    finally:
        subprocess.run(["chattr", "-i", f"{database}-shm"], check=False)
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stdout, done.stderr)
