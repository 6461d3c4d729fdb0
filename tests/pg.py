"""A throwaway PostgreSQL cluster for the tests and the benchmarks.

`initdb` into a fresh temporary directory, then `pg_ctl start` listening on 127.0.0.1 on
a free port, with its own socket directory; `stop()` stops it and removes the directory.
initdb refuses to run as root, so when we are root (CI) the server runs as the
unprivileged `nobody` user, which then owns the directory. About a second to start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import asyncpg

logger = logging.getLogger(__name__)

DbBackend = Literal["sqlite", "postgresql"]
"""The database engines the storage, manager and migration suites run on."""

SUPERUSER = "postgres"
_UNPRIVILEGED = "nobody"
# Durability is not what the tests measure: fsync off makes start-up and CREATE DATABASE fast.
_SERVER_OPTIONS = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
    "-c max_connections=300 -c shared_buffers=64MB -c listen_addresses=127.0.0.1"
)


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL binaries are missing or the cluster would not start."""


def find_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: the PATH first, then Debian's layout."""
    initdb = shutil.which("initdb")
    if initdb is not None:
        return Path(initdb).parent
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin/initdb") if p.parts[4].isdigit()]
    found = sorted(versions, key=lambda p: int(p.parts[4]))
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class PostgresCluster:
    """A running throwaway cluster. `url(name)` is a `DATABASE_URL` for database `name`."""

    root: Path
    bindir: Path
    port: int
    run_as: int | None  # uid, when we are root
    databases: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    async def create_database(self) -> str:
        """A new empty database; returns its `DATABASE_URL`."""
        name = f"test_{uuid.uuid4().hex[:12]}"
        connection = await asyncpg.connect(self.dsn())
        try:
            await connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY file_copy')
        finally:
            await connection.close()
        return self.url(name)

    async def drop_database(self, url: str) -> None:
        """Drop a database made by `create_database` (its connections are closed first)."""
        name = url.rsplit("/", 1)[1]
        connection = await asyncpg.connect(self.dsn())
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()

    def stop(self) -> None:
        """Stop the server (fast shutdown) and remove its directory."""
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", check=False)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run_tool(self.bindir / tool, args, self.run_as, check=check)


def _run_tool(
    path: Path, args: tuple[str, ...], run_as: int | None, *, check: bool
) -> subprocess.CompletedProcess[str]:
    options: dict[str, Any] = {}
    if run_as is not None:
        options = {"user": run_as, "group": pwd.getpwuid(run_as).pw_gid, "extra_groups": []}
    env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
    result = subprocess.run(
        [str(path), *args], capture_output=True, text=True, env=env, timeout=60, check=False, **options
    )
    if check and result.returncode != 0:
        raise PostgresUnavailable(f"{path.name} failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return result


def start_cluster() -> PostgresCluster:
    """initdb + start a cluster in a new temporary directory. Raises `PostgresUnavailable`."""
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable("initdb not found (install the Debian package `postgresql`)")
    run_as = pwd.getpwnam(_UNPRIVILEGED).pw_uid if os.geteuid() == 0 else None
    # Not under pytest's tmp_path: its parents are private to root, and `nobody` must reach it.
    root = Path(tempfile.mkdtemp(prefix="llm-bot-pg-"))
    if run_as is not None:
        os.chown(root, run_as, pwd.getpwuid(run_as).pw_gid)
    cluster = PostgresCluster(root, bindir, 0, run_as)
    try:
        cluster._run(
            "initdb", "-D", str(cluster.data_dir), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--locale=C", "-N"
        )
        for _attempt in range(3):  # the free port may be taken before the server binds it
            cluster.port = _free_port()
            options = f"-p {cluster.port} -k {root} {_SERVER_OPTIONS}"
            started = cluster._run(
                "pg_ctl", "-D", str(cluster.data_dir), "-l", str(root / "server.log"), "-o", options, "-w", "start",
                check=False,
            )  # fmt: skip
            if started.returncode == 0:
                logger.info("throwaway PostgreSQL on 127.0.0.1:%d in %s", cluster.port, root)
                return cluster
        log = (root / "server.log").read_text(errors="replace")[-800:] if (root / "server.log").exists() else ""
        raise PostgresUnavailable(f"pg_ctl start failed: {started.stderr.strip()} {log}")
    except BaseException:
        cluster.stop()
        raise


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[PostgresCluster]:
    """`start_cluster()`, stopped and removed on exit whatever happened."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
