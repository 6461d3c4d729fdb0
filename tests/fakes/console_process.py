"""The real bot in the terminal chat mode, in a process of its own, around the fake
engine (`python -m tests.fakes.bot_process`): messages go in on stdin, each reply comes
out as one line on stdout (``"P echo: <text>"``), the log is kept from stderr."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from tests.fakes.processes import BotProcess, base_env


class ConsoleBot(BotProcess):
    """`python -m tests.fakes.bot_process` in the terminal chat mode: messages go in on
    stdin, replies come out one per line on stdout, the log on stderr."""

    _pipes = True

    def __init__(self, database: Path, cwd: Path, env: dict[str, str] | None = None) -> None:
        # No step delay: the fake engine answers at once, as the bot process does by default.
        super().__init__("P", base_env(f"sqlite+aiosqlite:///{database}") | (env or {}), cwd, step_delay=0.0)
        self.database = database

    async def ask(self, message: str, timeout: float = 30) -> str:
        assert self._proc is not None and self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(message.encode() + b"\n")
        await self._proc.stdin.drain()
        line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        return line.decode().rstrip("\n")

    async def exit_code(self, timeout: float = 60) -> int:
        """Wait for the process to end by itself."""
        return await self.wait(timeout)

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
