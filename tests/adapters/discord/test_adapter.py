"""The Discord adapter end to end: the real discord.py client against the fake Discord
on 127.0.0.1, with a test-local handler (adapter mechanics) or the real
`ConversationManager` + `Worker(FakeEngine)` + SQLite (the whole pipeline): start-up,
which messages reach the core, concurrency, the gateway, and shutdown."""

from __future__ import annotations

import asyncio
import logging

import pytest

from adapters.discord.adapter import DiscordAdapter
from bot.chat.commands import COMMANDS
from bot.errors import ConfigError
from tests.adapters.discord.conftest import EchoHandler, RunAdapter, World, assert_pings_no_one, discord_settings
from tests.conftest import Harness
from tests.fakes.discord.server import FakeDiscordServer

INTENTS = (1 << 0) | (1 << 9) | (1 << 12) | (1 << 15)  # guilds, guild messages, DMs, message content


# --------------------------------------------------------------------------- start-up


async def test_connects_with_the_needed_intents(server: FakeDiscordServer, echo: EchoHandler) -> None:
    assert server.gateway_queries == [{"v": "10", "encoding": "json", "compress": "zlib-stream"}]
    assert len(server.identifies) == 1
    identify = server.identifies[0]
    assert identify["token_ok"] and identify["intents"] == INTENTS
    assert server.unknown_routes == []


async def test_a_rejected_token_is_a_config_error(server: FakeDiscordServer) -> None:
    adapter = DiscordAdapter(discord_settings(server, discord_token="wrong-token"), COMMANDS)
    with pytest.raises(ConfigError) as info:
        await asyncio.wait_for(adapter.run(EchoHandler()), 5)
    assert info.value.setting == "DISCORD_TOKEN"
    assert "wrong-token" not in str(info.value)


async def test_message_content_intent_not_enabled_is_a_config_error_naming_the_fix(
    server: FakeDiscordServer,
) -> None:
    server.message_content_enabled = False
    adapter = DiscordAdapter(discord_settings(server), COMMANDS)
    with pytest.raises(ConfigError) as info:
        await asyncio.wait_for(adapter.run(EchoHandler()), 5)
    assert "Message Content intent" in str(info.value)


async def test_shard_count_starts_an_auto_sharded_client(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    # discord.py waits 5 s before identifying the second shard. Both must be up before
    # the test stops the client: a shard still launching is not closed by discord.py,
    # and its heartbeat thread would outlive the event loop.
    async with run_adapter(handler, discord_shard_count=2):
        await server.wait_identified(2, timeout=15)
        assert sorted(i["shard"] for i in server.identifies) == [[0, 2], [1, 2]]
        dm = server.dm_channel(world.alice)
        await server.user_sends(dm, world.alice, "sharded hello")
        await server.wait_for(lambda: server.bot_texts(dm) == ["Echo: sharded hello"])


async def test_the_token_never_appears_in_the_logs(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    handler = EchoHandler()
    async with run_adapter(handler):
        dm = server.dm_channel(world.alice)
        await server.user_sends(dm, world.alice, "hello")
        await server.wait_for(lambda: handler.finished == ["hello"])
    assert caplog.records
    assert all(server.token not in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- when the bot answers


async def test_server_messages_need_a_mention_which_is_stripped(
    server: FakeDiscordServer, world: World, echo: EchoHandler
) -> None:
    bot = server.bot
    await server.user_sends(world.general, world.alice, "just chatting, not for the bot")
    await server.user_sends(world.general, world.alice, f"{bot.mention} first question")
    await server.user_sends(world.general, world.bob, f"<@!{bot.id}>   second question")
    await server.wait_for(lambda: len(echo.finished) == 2)
    assert [e.text for e in echo.events] == ["first question", "second question"]
    assert server.bot_texts(world.general) == ["Echo: first question", "Echo: second question"]
    assert all(not e.is_private for e in echo.events)


async def test_a_reply_to_the_bot_is_answered_without_a_mention(
    server: FakeDiscordServer, world: World, echo: EchoHandler
) -> None:
    await server.user_sends(world.general, world.alice, f"{server.bot.mention} hi")
    await server.wait_for(lambda: echo.finished == ["hi"])
    bot_message = server.bot_messages(world.general)[0]
    not_bot = await server.user_sends(world.general, world.bob, "some other message")
    await server.user_sends(world.general, world.alice, "replying to bob", reply_to=not_bot)
    await server.user_sends(world.general, world.alice, "tell me more", reply_to=bot_message, ping_reply=False)
    await server.wait_for(lambda: len(echo.finished) == 2)
    assert [e.text for e in echo.events] == ["hi", "tell me more"]


async def test_bots_and_the_bots_own_messages_are_ignored(
    server: FakeDiscordServer, world: World, echo: EchoHandler
) -> None:
    await server.user_sends(world.general, world.other_bot, f"{server.bot.mention} bots talking")
    await server.user_sends(server.dm_channel(world.other_bot), world.other_bot, "bot DM")
    dm = server.dm_channel(world.alice)
    await server.user_sends(dm, world.alice, f"say {server.bot.mention}")
    await server.wait_for(lambda: len(echo.finished) == 1)
    # The bot's own reply came back over the gateway into the DM (as on Discord);
    # answering it would loop forever. A later message shows it was not taken up.
    await server.user_sends(dm, world.alice, "done")
    await server.wait_for(lambda: len(echo.finished) == 2)
    assert [e.user_id for e in echo.events] == [str(world.alice.id)] * 2
    assert [e.text for e in echo.events] == ["say", "done"]


async def test_a_thread_is_its_own_conversation(server: FakeDiscordServer, world: World, echo: EchoHandler) -> None:
    await server.user_sends(world.thread, world.alice, f"{server.bot.mention} in the thread")
    await server.wait_for(lambda: echo.finished == ["in the thread"])
    assert echo.events[0].chat_id == str(world.thread.id)
    assert server.bot_texts(world.thread) == ["Echo: in the thread"]
    assert server.bot_texts(world.general) == []


async def test_text_commands_in_a_mention_reach_the_core(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    async with harness.manager() as manager, run_adapter(manager):
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} /config")
        await server.wait_for(lambda: bool(server.bot_texts(world.general)))
    assert server.bot_texts(world.general)[0].startswith("Settings for this session")


# --------------------------------------------------------------------------- concurrency and the gateway


async def test_two_channels_are_served_concurrently(server: FakeDiscordServer, world: World, echo: EchoHandler) -> None:
    echo.gates["slow one"] = asyncio.Event()
    await server.user_sends(world.general, world.alice, f"{server.bot.mention} slow one")
    await server.wait_for(lambda: "slow one" in echo.started)
    await server.user_sends(world.random, world.bob, f"{server.bot.mention} fast one")
    await server.wait_for(lambda: echo.finished == ["fast one"])
    assert server.bot_texts(world.general) == []  # still held while #random was answered
    echo.gates["slow one"].set()
    await server.wait_for(lambda: len(echo.finished) == 2)
    assert server.bot_texts(world.general) == ["Echo: slow one"]
    assert server.bot_texts(world.random) == ["Echo: fast one"]


async def test_many_channels_at_once_with_the_real_manager(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    channels = [server.add_text_channel(world.guild, f"room-{i}") for i in range(8)]
    async with harness.manager() as manager, run_adapter(manager, discord_edit_interval=0.02):
        for i, channel in enumerate(channels):
            await server.user_sends(channel, world.alice, f"{server.bot.mention} question {i}")
        await server.wait_for(
            lambda: all(server.bot_texts(c) == [f"Echo: question {i}"] for i, c in enumerate(channels)), timeout=10
        )
    assert_pings_no_one(server)


@pytest.mark.parametrize("how", ["connection dropped", "reconnect requested"])
async def test_gateway_disconnect_resumes_and_delivers_missed_messages(
    server: FakeDiscordServer, world: World, echo: EchoHandler, how: str
) -> None:
    dm = server.dm_channel(world.alice)
    await server.user_sends(dm, world.alice, "before")
    await server.wait_for(lambda: echo.finished == ["before"])
    if how == "connection dropped":
        await server.drop_gateway(4000)
    else:
        await server.send_reconnect()
    await server.user_sends(dm, world.alice, "during")  # buffered, replayed on RESUME
    await server.wait_for(lambda: len(server.resumes) == 1)
    await server.user_sends(dm, world.alice, "after")
    await server.wait_for(lambda: len(echo.finished) == 3)
    assert len(server.identifies) == 1  # resumed, not re-identified
    assert server.resumes[0]["seq"] is not None
    assert echo.finished == ["before", "during", "after"]


# --------------------------------------------------------------------------- shutdown


async def test_cancelling_while_a_reply_is_pending_shuts_down_promptly(server: FakeDiscordServer, world: World) -> None:
    handler = EchoHandler()
    handler.gates["held"] = asyncio.Event()
    adapter = DiscordAdapter(discord_settings(server), COMMANDS)
    task = asyncio.create_task(adapter.run(handler))
    await server.wait_identified()
    await server.user_sends(server.dm_channel(world.alice), world.alice, "held")
    await server.wait_for(lambda: "held" in handler.started)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=3)
    assert done == {task} and task.cancelled()
    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("discord:")]
    assert leftovers == []
    await server.wait_for(lambda: server.open_connections == 0)  # the gateway socket is closed
