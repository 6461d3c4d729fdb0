"""The terminal chat: the same pipeline as the platforms, reading standard input.

Interactive on a terminal (Ctrl-D or Ctrl-C to leave); on piped input it answers one
message per line and exits at the end of input, so it can be scripted. Files the bot
sends (``/export``) are written to ``exports/`` in the current directory.
"""

from __future__ import annotations

import asyncio
import getpass
import io
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from bot.events import IncomingMessage
from bot.ports import IncomingHandler, ReplyTarget

logger = logging.getLogger(__name__)

CHAT_ID = "local"
USER_ID = "local"
EXPORT_DIR = "exports"


def to_event(line: str, message_id: int | str, display_name: str) -> IncomingMessage:
    """One line typed in the terminal, as the common event. The local user is an admin."""
    return IncomingMessage(
        platform="console",
        chat_id=CHAT_ID,
        user_id=USER_ID,
        display_name=display_name,
        message_id=str(message_id),
        text=line.rstrip("\r\n"),
        is_private=True,
        timestamp=datetime.now(UTC),
    )


class ConsoleReplyTarget:
    """Writes a streamed reply to the terminal: each edit prints only what is new."""

    max_chars = 1_000_000
    edit_interval = 0.0

    def __init__(self, out: TextIO, prefix: str) -> None:
        self._out = out
        self._prefix = prefix
        self._shown: dict[str, str] = {}

    async def send(self, text: str) -> str:
        message_id = str(len(self._shown) + 1)
        self._write(("\n" if self._shown else self._prefix) + text)
        self._shown[message_id] = text
        return message_id

    async def edit(self, message_id: str, text: str) -> None:
        shown = self._shown.get(message_id, "")
        # Streaming only ever appends; anything else is reprinted whole.
        self._write(text[len(shown) :] if text.startswith(shown) else "\n" + text)
        self._shown[message_id] = text

    async def typing(self) -> None:
        return None

    async def send_file(self, filename: str, data: bytes, caption: str) -> str:
        """Write the file into ``exports/`` (never over an existing one) and print where."""
        folder = Path.cwd() / EXPORT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        name = Path(filename).name or "file"  # no directories from the caller
        path = folder / name
        stem, suffix = path.stem, path.suffix
        number = 1
        while path.exists():
            path = folder / f"{stem}-{number}{suffix}"
            number += 1
        path.write_bytes(data)
        return await self.send(f"{caption}: {path}" if caption else str(path))

    async def sender_is_chat_admin(self) -> bool:
        return True

    def end(self) -> None:
        if self._shown:
            self._write("\n")

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


class ConsoleAdapter:
    """Chat in the terminal. `run` returns at the end of input.

    Message ids are unique across runs (the start time and a count), so a line typed
    after a restart is never taken for one accepted before it."""

    name = "console"

    def __init__(self, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
        self._in = stdin or sys.stdin
        self._out = stdout or sys.stdout
        self._interactive = self._in.isatty() and self._out.isatty()
        self._running = False
        if isinstance(self._in, io.TextIOWrapper):  # undecodable bytes must not end the chat
            self._in.reconfigure(errors="replace")

    @property
    def connected(self) -> bool:
        """Whether it is reading the terminal."""
        return self._running

    def target_for(self, event: IncomingMessage) -> ReplyTarget:
        """Where the answer to a line typed before a restart goes: this terminal."""
        return ConsoleReplyTarget(self._out, "bot> " if self._interactive else "")

    async def run(self, handler: IncomingHandler) -> None:
        self._running = True
        try:
            await self._run(handler)
        finally:
            self._running = False

    async def _run(self, handler: IncomingHandler) -> None:
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def read() -> None:  # a daemon thread: a blocked read never holds up exit
            try:
                for line in self._in:
                    loop.call_soon_threadsafe(lines.put_nowait, line)
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                logger.warning("reading standard input failed: %s", exc)
            finally:
                loop.call_soon_threadsafe(lines.put_nowait, None)

        threading.Thread(target=read, name="console-stdin", daemon=True).start()
        name = _user_name()
        if self._interactive:
            self._print("Chat with the bot. /help lists the commands; Ctrl-D or Ctrl-C leaves.\n")
        await handler.recover("console", self.target_for)  # lines a restart left unanswered
        run_id = time.time_ns()
        count = 0
        while True:
            if self._interactive:
                self._print("you> ")
            line = await lines.get()
            if line is None:
                if self._interactive:
                    self._print("\n")
                return
            if not line.strip() and not self._interactive:
                continue
            count += 1
            target = ConsoleReplyTarget(self._out, "bot> " if self._interactive else "")
            await handler.handle(to_event(line, f"{run_id}.{count}", name), target)
            target.end()

    def _print(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "you"
