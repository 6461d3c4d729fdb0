"""Fixtures for the Discord adapter: the fake Discord and the real adapter on the real
discord.py client, connected to it over 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from adapters.discord.adapter import DiscordAdapter
from bot.chat.commands import COMMANDS
from bot.config import Settings
from bot.ports import IncomingHandler
from tests.fakes.discord.server import FakeDiscordServer
from tests.fakes.discord.world import MANAGE_GUILD, FakeChannel, FakeGuild, FakeUser, Json
from tests.fakes.echo_handler import EchoHandler as BaseEchoHandler


@dataclass
class World:
    """A server with two channels and a thread, some people and another bot."""

    guild: FakeGuild
    general: FakeChannel
    random: FakeChannel
    thread: FakeChannel
    alice: FakeUser
    bob: FakeUser
    moderator: FakeUser  # has Manage Server
    bot_admin: FakeUser  # in ADMIN_IDS, no server permissions
    other_bot: FakeUser


# The server belongs to the loop of the test that uses it (fixtures default to the session loop).
@pytest_asyncio.fixture(loop_scope="function")
async def server() -> AsyncIterator[FakeDiscordServer]:
    async with FakeDiscordServer() as fake:
        yield fake


@pytest.fixture
def world(server: FakeDiscordServer) -> World:
    guild = server.add_guild("Wonderland")
    general = server.add_text_channel(guild, "general")
    random = server.add_text_channel(guild, "random")
    thread = server.add_thread(general, "a thread")
    alice, bob = server.add_user("alice"), server.add_user("bob")
    moderator, bot_admin = server.add_user("moderator"), server.add_user("botadmin")
    other_bot = server.add_user("otherbot", bot=True)
    mods = server.add_role(guild, "mods", MANAGE_GUILD)
    for user in (alice, bob, bot_admin, other_bot):
        server.add_member(guild, user)
    server.add_member(guild, moderator, [mods])
    return World(guild, general, random, thread, alice, bob, moderator, bot_admin, other_bot)


def discord_settings(server: FakeDiscordServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "discord_token": server.token,
        "discord_api_base": server.base_url,
        "discord_gateway_url": server.gateway_url,
        "discord_edit_interval": 0.0,
        "database_url": "sqlite+aiosqlite:///unused.db",
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@asynccontextmanager
async def running_adapter(
    server: FakeDiscordServer, handler: IncomingHandler, *, shards: int = 1, **overrides: Any
) -> AsyncIterator[DiscordAdapter]:
    """The adapter serving `handler`, connected (READY and guilds received) on exit of
    the `async with` header; cancelled and awaited on exit of the block."""
    adapter = DiscordAdapter(discord_settings(server, **overrides), COMMANDS)
    task = asyncio.create_task(adapter.run(handler), name="test:discord-adapter")
    identified = asyncio.create_task(server.wait_identified(shards), name="test:wait-identified")
    try:
        await asyncio.wait({task, identified}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            identified.cancel()
            task.result()  # raises the adapter's error
            raise AssertionError("the adapter stopped before connecting")
        identified.result()
        yield adapter
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        client = adapter._client  # run() let go of the client
        assert client is None


RunAdapter = Callable[..., "contextlib.AbstractAsyncContextManager[DiscordAdapter]"]


@pytest.fixture
def run_adapter(server: FakeDiscordServer) -> RunAdapter:
    def run(handler: IncomingHandler, **overrides: Any) -> contextlib.AbstractAsyncContextManager[DiscordAdapter]:
        return running_adapter(server, handler, **overrides)

    return run


class EchoHandler(BaseEchoHandler):
    """Discord tests also check the admin lookup and the typing indicator."""

    def __init__(self, reply_for: Callable[[str], str] | None = None, piece_delay: float = 0.002) -> None:
        super().__init__(reply_for, piece_delay, check_admin=True, typing=True)


@pytest_asyncio.fixture(loop_scope="function")
async def echo(server: FakeDiscordServer, world: World) -> AsyncIterator[EchoHandler]:
    """An `EchoHandler` that the adapter serves, connected, until the test ends."""
    handler = EchoHandler()
    async with running_adapter(server, handler):
        yield handler


def created_in(server: FakeDiscordServer, channel: FakeChannel) -> list[Json]:
    """The bodies of the bot's create-message calls in `channel`."""
    return [c.json for c in server.calls if c.method == "POST" and c.path == f"/channels/{channel.id}/messages"]


def assert_pings_no_one(server: FakeDiscordServer) -> None:
    """Every message, edit and interaction response the bot made disallows all pings."""
    calls = server.message_calls()
    assert calls, "the bot sent nothing"
    for call in calls:
        body = call.json or {}
        if call.path.endswith("/callback"):
            if body.get("type") == 5:  # a deferral carries no content
                continue
            body = body.get("data") or {}
        mentions = body.get("allowed_mentions")
        assert mentions is not None, f"{call.method} {call.path} has no allowed_mentions: {body}"
        assert mentions.get("parse") == [], (call.path, mentions)
        assert not mentions.get("users") and not mentions.get("roles"), (call.path, mentions)
        assert not mentions.get("replied_user"), (call.path, mentions)
