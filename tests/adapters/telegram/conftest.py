"""Fixtures for the Telegram adapter: the fake Bot API server and a running adapter.

The adapter under test is the real one, on the real python-telegram-bot, talking HTTP
to `tests.fakes.telegram.FakeTelegramServer` on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import pytest_asyncio

from adapters.telegram.adapter import TelegramAdapter
from adapters.telegram.rate_limiter import RetryPolicy
from bot.chat.commands import COMMANDS
from bot.config import Settings
from bot.events import ConversationKey
from bot.ports import CommandInfo, IncomingHandler, Repository, StoredMessage
from tests.fakes.echo_handler import EchoHandler as BaseEchoHandler
from tests.fakes.telegram import Chat, FakeTelegramServer, User

# Short waits so failure tests finish fast; the policy's logic is what is tested.
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.02, max_delay=0.1, flood_attempts=3, max_flood_wait=5.0)


def replied(server: FakeTelegramServer, chat: Chat, count: int = 1) -> bool:
    """Whether the bot has sent at least `count` messages in `chat`."""
    return len(server.bot_messages(chat.id)) >= count


async def private_question_is_answered_and_stored(
    server: FakeTelegramServer, repo: Repository, user: User, question: str, *, timeout: float = 120
) -> StoredMessage:
    """`user` asks `question` in their private chat; waits until the reply is stored and
    checks that the chat shows exactly what was stored. Returns the stored reply."""
    key = ConversationKey("telegram", str(user.id), str(user.id))
    server.user_sends(Chat.private(user), user, question)
    deadline = time.monotonic() + timeout
    while len(stored := await repo.recent_messages(key, 10)) < 2:
        assert time.monotonic() < deadline, f"no reply stored; the chat shows {server.bot_texts(user.id)}"
        await asyncio.sleep(0.2)
    reply = stored[-1]
    assert reply.role == "assistant"
    assert server.bot_texts(user.id) == [reply.content]  # the chat shows exactly what was stored
    assert reply.platform_message_id == str(server.bot_messages(user.id)[0].message_id)
    return reply


def free_port() -> int:
    """A local port nothing listens on (once this returns)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def telegram_settings(server: FakeTelegramServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "telegram_token": server.token,
        "telegram_api_base": server.api_base,
        "telegram_edit_interval": 0.0,
        "database_url": "sqlite+aiosqlite:///unused.db",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class EchoHandler(BaseEchoHandler):
    """Telegram tests let target errors escape the handler, to test the adapter's guard."""

    def __init__(self, reply_for: Callable[[str], str] | None = None, piece_delay: float = 0.005) -> None:
        super().__init__(reply_for, piece_delay, reraise=True)


@pytest_asyncio.fixture(loop_scope="function")  # the loop the tests run in
async def server() -> AsyncIterator[FakeTelegramServer]:
    async with FakeTelegramServer() as fake:
        yield fake


RunAdapter = Callable[..., AbstractAsyncContextManager[TelegramAdapter]]


@pytest.fixture
def run_adapter(server: FakeTelegramServer) -> RunAdapter:
    """``async with run_adapter(handler, **settings) as adapter:`` — the adapter serving
    `server` in a task; leaving cancels it and checks it stopped cleanly."""

    @asynccontextmanager
    async def running(
        handler: IncomingHandler,
        *,
        commands: Sequence[CommandInfo] = COMMANDS,
        retry: RetryPolicy = FAST_RETRY,
        settings: Settings | None = None,
        request_timeout: float = 5.0,
        send_timeout: float = 30.0,
        **overrides: Any,
    ) -> AsyncIterator[TelegramAdapter]:
        adapter = TelegramAdapter(
            settings or telegram_settings(server, **overrides),
            commands,
            retry=retry,
            poll_timeout=5.0,
            shutdown_grace=1.0,
            request_timeout=request_timeout,
            send_timeout=send_timeout,
        )
        task = asyncio.create_task(adapter.run(handler), name="test:telegram-adapter")
        started = asyncio.create_task(adapter.started.wait(), name="test:telegram-started")
        await asyncio.wait({task, started}, timeout=10.0, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            if task.done():
                task.result()  # raises what stopped the adapter
            task.cancel()
            raise AssertionError("the Telegram adapter did not start within 10 s")
        try:
            yield adapter
            assert not task.done(), "the adapter stopped serving on its own"
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, timeout=10.0)
        leftovers = [
            t
            for t in asyncio.all_tasks()
            if not t.done()
            and (t.get_name().startswith("telegram:") or "Updater" in t.get_name() or "Application" in t.get_name())
        ]
        assert not leftovers, f"tasks left running after shutdown: {leftovers}"

    return running
