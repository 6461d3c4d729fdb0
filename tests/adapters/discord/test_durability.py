"""Discord staying up and losing nothing: an unreachable API at start-up, a command sync
answered oddly, an event discord.py cannot read, a failed gateway handshake, sends
that must not show twice, recovery targets, and files (`/export`).

The real adapter on discord.py against the fake Discord; test-local handlers."""

from __future__ import annotations

import asyncio
import datetime as dtm
import logging
from collections.abc import Callable

import pytest

from adapters.discord.adapter import DiscordAdapter
from adapters.discord.delivery import ORIGINAL_RESPONSE
from bot.app import Backoff, supervise
from bot.chat.commands import COMMANDS
from bot.errors import ConfigError
from bot.events import ConversationKey, IncomingMessage, Platform
from bot.ports import ReplyTarget
from tests.adapters.discord.conftest import EchoHandler, RunAdapter, World, created_in, discord_settings
from tests.adapters.telegram.conftest import free_port
from tests.conftest import Harness
from tests.fakes.discord.server import FakeDiscordServer
from tests.fakes.echo_handler import TestHandler

# --------------------------------------------------------------------------- start-up


async def test_an_unreachable_api_is_retried_then_a_config_error_naming_discord_api_base(
    server: FakeDiscordServer, caplog: pytest.LogCaptureFixture
) -> None:
    base = f"http://127.0.0.1:{free_port()}/api/v10"
    adapter = DiscordAdapter(
        discord_settings(server, discord_api_base=base), COMMANDS, login_attempts=3, login_backoff=0.05
    )
    with pytest.raises(ConfigError) as info:
        await asyncio.wait_for(adapter.run(EchoHandler()), 10)
    assert info.value.setting == "DISCORD_API_BASE"
    assert base in str(info.value) and "\n" not in str(info.value)
    retries = [r for r in caplog.records if "cannot reach the Discord API" in r.getMessage()]
    assert [r.levelno for r in retries] == [logging.WARNING] * 2 and not any(r.exc_info for r in retries)
    assert adapter._client is None and not adapter.connected


async def test_a_command_sync_answered_without_ids_is_logged_once_and_text_commands_still_work(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    server.sync_without_ids = True
    handler = EchoHandler()
    async with run_adapter(handler):
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} /help")
        await server.wait_for(lambda: handler.finished == ["/help"])
    (logged,) = [r for r in caplog.records if "slash commands" in r.getMessage()]
    assert logged.levelno == logging.WARNING and logged.exc_info is None
    assert "could not sync the slash commands (KeyError" in logged.getMessage()
    assert "text commands still work" in logged.getMessage()


# --------------------------------------------------------------------------- the gateway


async def test_an_event_discord_py_cannot_read_is_skipped_and_the_connection_stays(
    server: FakeDiscordServer, world: World, echo: EchoHandler, caplog: pytest.LogCaptureFixture
) -> None:
    await server.send_malformed_event(world.general)
    await server.user_sends(world.general, world.alice, f"{server.bot.mention} still here?")
    await server.wait_for(lambda: echo.finished == ["still here?"])
    (logged,) = [r for r in caplog.records if "could not read a MESSAGE_CREATE" in r.getMessage()]
    assert logged.exc_info is not None  # the traceback, for whoever fixes the server
    assert len(server.identifies) == 1 and server.resumes == []  # same session, no reconnect


async def test_a_failed_gateway_handshake_is_survived_and_the_bot_serves(
    server: FakeDiscordServer, world: World
) -> None:
    server.gateway.refuse_handshakes = 1
    adapter = DiscordAdapter(discord_settings(server), COMMANDS)
    handler = EchoHandler()
    supervised = asyncio.create_task(supervise(adapter, handler, Backoff(first=0.05, most=0.1)), name="test:sup")
    try:
        await server.wait_for(lambda: adapter.connected, timeout=15)
        dm = server.dm_channel(world.alice)
        await server.user_sends(dm, world.alice, "after the handshake failed")
        await server.wait_for(lambda: handler.finished == ["after the handshake failed"])
    finally:
        supervised.cancel()
        with pytest.raises(asyncio.CancelledError):
            await supervised
    assert len(server.gateway_queries) == 2  # refused once, then connected
    assert not adapter.connected


# --------------------------------------------------------------------------- nothing twice


async def test_a_send_carried_out_but_answered_with_a_5xx_shows_once(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    server.rest.fail_after_next_message(world.general, 500)  # discord.py retries it itself
    handler = EchoHandler()
    async with run_adapter(handler):
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} only once please")
        await server.wait_for(lambda: handler.finished == ["only once please"], timeout=10)
    assert server.bot_texts(world.general) == ["Echo: only once please"]
    first, again = created_in(server, world.general)
    assert first["nonce"] == again["nonce"] and first["enforce_nonce"] is True


# --------------------------------------------------------------------------- recovery


def _old_event(world: World, message_id: str, user_id: int) -> IncomingMessage:
    return IncomingMessage(
        platform="discord",
        chat_id=str(world.general.id),
        user_id=str(user_id),
        display_name="someone",
        message_id=message_id,
        text="an old question",
        is_private=False,
        timestamp=dtm.datetime.now(dtm.UTC),
    )


async def test_recovery_is_asked_for_on_every_new_session_with_targets_that_reply_in_the_channel(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    asked = await server.user_sends(world.general, world.moderator, "an old question")  # before the bot runs
    handler = EchoHandler()
    async with run_adapter(handler) as adapter:
        await server.wait_for(lambda: len(handler.recoveries) == 1 and adapter.connected)
        ((platform, make_target),) = handler.recoveries
        assert platform == "discord"
        target = make_target(_old_event(world, asked["id"], world.moderator.id))
        message_id = await target.send("a late answer")
        await target.edit(message_id, "a late answer, edited")
        assert not await target.sender_is_chat_admin()  # not known without their message: fail closed
        # A session Discord no longer knows: a new IDENTIFY, a new READY, asked again.
        server.gateway._sessions.clear()
        await server.drop_gateway()
        await server.wait_for(lambda: len(handler.recoveries) == 2 and adapter.connected, timeout=15)
    assert not adapter.connected
    (reply,) = server.bot_messages(world.general)
    assert reply["content"] == "a late answer, edited" and reply["id"] == message_id
    assert reply["message_reference"]["message_id"] == asked["id"]


# --------------------------------------------------------------------------- files


class Exporter(TestHandler):
    """Answers every message with a Markdown file."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
        data = f"# Conversation\n\n**{event.display_name}:** héllo\n".encode()
        self.sent.append(await target.send_file("conversation.md", data, "Your conversation"))


async def test_a_file_is_sent_as_an_attachment_replying_to_the_message(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    handler = Exporter()
    async with run_adapter(handler):
        asked = await server.user_sends(world.general, world.alice, f"{server.bot.mention} /export")
        await server.wait_for(lambda: bool(handler.sent))
    (upload,) = server.uploads
    assert (upload.filename, upload.content, upload.ephemeral) == ("conversation.md", "Your conversation", False)
    assert upload.text == "# Conversation\n\n**Alice:** héllo\n"
    assert handler.sent == [str(upload.message_id)]
    (message,) = server.bot_messages(world.general)
    assert message["message_reference"]["message_id"] == asked["id"]
    assert [a["filename"] for a in message["attachments"]] == ["conversation.md"]


async def test_a_slash_command_gets_its_file_privately(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    handler = Exporter()
    async with run_adapter(handler):
        used = await server.user_uses_slash_command(world.general, world.alice, "help")
        await server.wait_for(lambda: bool(handler.sent))
    (upload,) = server.uploads
    assert upload.ephemeral and upload.text.startswith("# Conversation")
    assert handler.sent == [ORIGINAL_RESPONSE]
    assert used.original is not None and used.original["content"] == "Your conversation"


# --------------------------------------------------------------------------- with the manager


async def test_the_same_message_arriving_twice_is_answered_once(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    async with harness.manager() as manager, run_adapter(manager) as adapter:
        dm = server.dm_channel(world.alice)
        sent = await server.user_sends(dm, world.alice, "once, please")
        await server.wait_for(lambda: server.bot_texts(dm) == ["Echo: once, please"])
        # A RESUME replays what the gateway thinks the bot missed: here, that message.
        await server.gateway.dispatch_message_event("MESSAGE_CREATE", dm, sent)
        await server.user_sends(dm, world.alice, "next")
        await server.wait_for(lambda: server.bot_texts(dm) == ["Echo: once, please", "Echo: next"])
        await server.wait_for(lambda: adapter.in_flight == 0)
    key = ConversationKey("discord", str(dm.id), str(world.alice.id))
    stored = await harness.repo.recent_messages(key, 10)
    assert [m.content for m in stored] == ["once, please", "Echo: once, please", "next", "Echo: next"]


async def test_a_turn_accepted_before_a_restart_is_answered_once_connected(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    asked = await server.user_sends(world.general, world.alice, f"{server.bot.mention} did you get this?")
    event = _old_event(world, asked["id"], world.alice.id)
    assert await harness.repo.accept_turn(event, "message", 5) is not None  # then the process died
    async with harness.manager() as manager, run_adapter(manager):
        await server.wait_for(lambda: server.bot_texts(world.general) == ["Echo: an old question"], timeout=10)
    (reply,) = server.bot_messages(world.general)
    assert reply["message_reference"]["message_id"] == asked["id"]
    assert await harness.repo.open_turns("discord") == []


async def test_messages_wait_until_the_turns_left_by_a_restart_are_queued(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    recovered = asyncio.Event()

    class SlowRecovery(EchoHandler):
        async def recover(self, platform: Platform, make_target: Callable[[IncomingMessage], ReplyTarget]) -> None:
            await super().recover(platform, make_target)
            await recovered.wait()

    handler = SlowRecovery()
    async with run_adapter(handler):
        await server.wait_for(lambda: len(handler.recoveries) == 1)
        dm = server.dm_channel(world.alice)
        await server.user_sends(dm, world.alice, "newer than what the restart left")
        await asyncio.sleep(0.2)
        assert handler.events == []  # it would be answered before older turns of its chat
        recovered.set()
        await server.wait_for(lambda: handler.finished == ["newer than what the restart left"])
