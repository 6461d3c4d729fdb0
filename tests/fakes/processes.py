"""Real bot processes for tests and benchmarks: `python -m tests.fakes.bot_process` (the
real bot around the fake engine) started, stopped with SIGTERM, or killed with SIGKILL,
with its log kept."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_env(database_url: str) -> dict[str, str]:
    """This environment without platform or model settings, plus the database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TELEGRAM_", "DISCORD_", "MODEL"))}
    env.update(DATABASE_URL=database_url, LOG_LEVEL="INFO", PYTHONPATH=str(ROOT))
    return env


class BotProcess:
    """`python -m tests.fakes.bot_process` with the given environment; its log is kept."""

    _pipes = False  # stdin and stdout piped to the test (the terminal chat), else unused

    def __init__(
        self, name: str, env: dict[str, str], cwd: Path, *, step_delay: float = 0.02, ready_marker: str = " ready: "
    ) -> None:
        self.name = name
        self.env = env
        self.cwd = cwd
        self.step_delay = step_delay
        self.ready_marker = ready_marker
        self.log: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def start(self) -> None:
        self._ready.clear()
        stdio = asyncio.subprocess.PIPE if self._pipes else asyncio.subprocess.DEVNULL
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.fakes.bot_process", "--name", self.name,
            "--step-delay", str(self.step_delay),
            cwd=self.cwd, env=self.env, stdin=stdio, stdout=stdio, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._reader = asyncio.create_task(self._read(), name=f"bot-process:{self.name}:log")

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        async for raw in self._proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            if self.ready_marker in line:
                self._ready.set()

    async def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        assert self._reader is not None
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({ready, self._reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if not self._ready.is_set():
            raise AssertionError(f"bot process {self.name} did not start:\n" + "\n".join(self.log[-30:]))

    async def wait(self, timeout: float = 20.0) -> int:
        """Wait for the process to end by itself; returns its exit code."""
        assert self._proc is not None
        await asyncio.wait_for(self._proc.wait(), timeout)
        if self._reader is not None:
            await self._reader
        assert self._proc.returncode is not None
        return self._proc.returncode

    async def stop(self) -> int:
        """SIGTERM, as an orchestrator stops it; returns its exit code."""
        if self._proc is None:
            return 0
        if self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), 20)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._reader is not None:
            await self._reader
        assert self._proc.returncode is not None
        return self._proc.returncode

    async def kill(self) -> None:
        """SIGKILL (`kill -9`): no clean-up of any kind."""
        assert self._proc is not None
        if self._proc.returncode is None:
            self._proc.kill()
        await self._proc.wait()
        if self._reader is not None:
            await self._reader

    def errors(self) -> list[str]:
        """Log lines at ERROR, and tracebacks."""
        return [line for line in self.log if " ERROR " in line or "Traceback" in line]
