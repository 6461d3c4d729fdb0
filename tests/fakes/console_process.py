"""The real bot in the terminal chat mode, in a process of its own, around the fake
engine (`python -m tests.fakes.bot_process`): messages go in on stdin, each reply comes
out as one line on stdout (``"P echo: <text>"``), the log is kept from stderr."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from tests.fakes.processes import ROOT, base_env


class ConsoleBot:
    """`python -m tests.fakes.bot_process` in the terminal chat mode: messages go in on
    stdin, replies come out one per line on stdout, the log on stderr."""

    def __init__(self, database: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.database = database
        self.cwd = cwd
        self.env = env or {}
        self.log: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._log_reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        env = base_env(f"sqlite+aiosqlite:///{self.database}") | {"PYTHONPATH": str(ROOT)} | self.env
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.fakes.bot_process", "--name", "P",
            cwd=self.cwd, env=env, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._log_reader = asyncio.create_task(self._read_log(), name="console-bot:log")

    async def _read_log(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        async for raw in self._proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.log.append(line)
            if " ready: " in line:
                self._ready.set()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    async def wait_ready(self, timeout: float = 60) -> None:
        assert self._log_reader is not None
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({ready, self._log_reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        assert self._ready.is_set(), "\n".join(self.log[-30:])

    async def ask(self, message: str, timeout: float = 30) -> str:
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(message.encode() + b"\n")
        await self._proc.stdin.drain()
        line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        return line.decode().rstrip("\n")

    async def exit_code(self, timeout: float = 60) -> int:
        """Wait for the process to end by itself."""
        assert self._proc is not None
        code = await asyncio.wait_for(self._proc.wait(), timeout)
        if self._log_reader is not None:
            await self._log_reader
        return code

    async def finish(self) -> int:
        """End of input: the terminal chat ends and the bot shuts down."""
        assert self._proc is not None
        if self._proc.returncode is None and self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            return await self.exit_code(30)
        except TimeoutError:
            self._proc.send_signal(signal.SIGKILL)
            await self._proc.wait()
            raise

    async def kill(self) -> None:
        """SIGKILL (`kill -9`): no clean-up of any kind."""
        assert self._proc is not None
        if self._proc.returncode is None:
            self._proc.kill()
        await self._proc.wait()
        if self._log_reader is not None:
            await self._log_reader

    def errors(self) -> list[str]:
        return [line for line in self.log if " ERROR " in line or "Traceback" in line]


@contextlib.asynccontextmanager
async def console_bot(database: Path, cwd: Path, env: dict[str, str] | None = None) -> AsyncIterator[ConsoleBot]:
    """A `ConsoleBot`, started; its input is closed (and the process awaited) on exit."""
    bot = ConsoleBot(database, cwd, env)
    await bot.start()
    try:
        yield bot
    finally:
        if bot.returncode is None:
            with contextlib.suppress(TimeoutError):
                await bot.finish()
