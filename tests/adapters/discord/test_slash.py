"""Slash commands end to end: the synced command tree, and each command answered
ephemerally through the real core."""

from __future__ import annotations

import logging

import pytest

from bot.chat.commands import COMMANDS
from bot.errors import BotError
from bot.events import IncomingMessage
from bot.ports import ReplyTarget
from tests.adapters.discord.conftest import EchoHandler, RunAdapter, World, assert_pings_no_one
from tests.conftest import Harness
from tests.fakes.discord.rest import EPHEMERAL, LOADING
from tests.fakes.discord.server import FakeDiscordServer
from tests.fakes.discord.world import FakeInteraction, FakeUser
from tests.fakes.echo_handler import TestHandler


def _answer(interaction: FakeInteraction) -> str:
    return "\n".join(m["content"] for m in interaction.responses)


async def test_every_core_command_is_synced_as_a_slash_command(server: FakeDiscordServer, echo: EchoHandler) -> None:
    synced = {c["name"]: c for c in server.synced_commands or []}
    assert set(synced) == {c.name for c in COMMANDS}
    config = {o["name"]: o for o in synced["config"]["options"]}
    assert set(config) == {"show", "set", "reset", "chat"}
    key = next(o for o in config["set"]["options"] if o["name"] == "key")
    assert {c["value"] for c in key["choices"]} >= {"temperature", "system_prompt", "max_new_tokens"}
    assert "enabled" not in {c["value"] for c in key["choices"]}  # a chat's setting only
    chat = {o["name"]: o for o in config["chat"]["options"]}
    assert set(chat) == {"show", "set", "reset"}
    chat_key = next(o for o in chat["set"]["options"] if o["name"] == "key")
    assert {c["value"] for c in chat_key["choices"]} >= {"enabled", "temperature"}
    assert {o["name"] for o in synced["reset"]["options"]} == {"user", "whole_channel"}
    assert {o["name"] for o in synced["usage"]["options"]} == {"user", "reset"}
    assert {o["name"] for o in synced["export"]["options"]} == {"user"}
    for name in ("block", "unblock"):
        assert {o["name"] for o in synced[name]["options"]} == {"user", "this_channel", "this_server"}
    assert synced["help"]["options"] == []
    assert all(len(c["description"]) <= 100 for c in synced.values())


async def test_slash_commands_are_answered_ephemerally(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    async with harness.manager() as manager, run_adapter(manager):
        used = await server.user_uses_slash_command(world.general, world.alice, "help")
        await server.wait_for(lambda: "Commands:" in _answer(used))
    assert used.callbacks == [{"type": 5, "data": {"flags": EPHEMERAL}}]
    assert used.original is not None and used.original["flags"] & EPHEMERAL
    assert server.bot_texts(world.general) == []  # nothing public
    assert_pings_no_one(server)


async def test_config_set_is_refused_to_members_and_allowed_to_bot_admins(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    options = {"key": "temperature", "value": "0.5"}
    async with (
        harness.manager(admin_ids=f"discord:{world.bot_admin.id}") as manager,
        run_adapter(manager),
    ):
        refused = await server.user_uses_slash_command(
            world.general, world.alice, "config", subcommand="set", options=options
        )
        await server.wait_for(lambda: bool(_answer(refused)))
        allowed = await server.user_uses_slash_command(
            world.general, world.bot_admin, "config", subcommand="set", options=options
        )
        await server.wait_for(lambda: bool(_answer(allowed)))
        shown = await server.user_uses_slash_command(world.general, world.bot_admin, "config", subcommand="show")
        await server.wait_for(lambda: bool(_answer(shown)))
    assert _answer(refused) == "Only admins can do that."
    assert _answer(allowed) == "temperature is now 0.5 for this session."
    assert "temperature = 0.5 (set for this session)" in _answer(shown)
    for used in (refused, allowed, shown):
        assert used.callbacks[0]["data"]["flags"] & EPHEMERAL


async def test_config_chat_switches_the_bot_off_in_a_channel_for_server_managers_only(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    async def config_chat(by: FakeUser, subcommand: str, **options: str) -> str:
        used = await server.user_uses_slash_command(world.general, by, "config", subcommand=subcommand, options=options)
        await server.wait_for(lambda: bool(_answer(used)))
        return _answer(used)

    off = {"key": "enabled", "value": "false"}
    async with harness.manager() as manager, run_adapter(manager) as adapter:
        assert await config_chat(world.alice, "chat set", **off) == "Only admins can do that."
        assert (await config_chat(world.moderator, "chat set", **off)).startswith("I'm switched off in this chat")
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} hello?")
        # Dispatched after the message, so once it is answered and nothing is in flight,
        # the message has been handled.
        assert "enabled = false" in await config_chat(world.moderator, "chat show")
        await server.wait_for(lambda: adapter.in_flight == 0)
        assert server.bot_texts(world.general) == []  # switched off: alice got no answer
        assert await config_chat(world.moderator, "chat reset") == (
            "This chat's settings are back to the defaults (and I answer here)."
        )
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} hello again")
        await server.wait_for(lambda: server.bot_texts(world.general) == ["Echo: hello again"])


async def test_manage_server_members_may_reset_a_channel_but_not_see_stats(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    async with harness.manager() as manager, run_adapter(manager) as adapter:
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} remember me")
        await server.wait_for(lambda: server.bot_texts(world.general) == ["Echo: remember me"])
        await server.wait_for(lambda: adapter.in_flight == 0)  # both messages stored
        by_member = await server.user_uses_slash_command(
            world.general, world.bob, "reset", options={"whole_channel": True}
        )
        await server.wait_for(lambda: bool(_answer(by_member)))
        by_mod = await server.user_uses_slash_command(
            world.general, world.moderator, "reset", options={"user": world.alice}
        )
        await server.wait_for(lambda: bool(_answer(by_mod)))
        stats = await server.user_uses_slash_command(world.general, world.moderator, "stats")
        await server.wait_for(lambda: bool(_answer(stats)))
        own = await server.user_uses_slash_command(world.general, world.bob, "reset")
        await server.wait_for(lambda: bool(_answer(own)))
    assert _answer(by_member) == "Only admins can do that."
    assert _answer(by_mod) == f"Done: the conversation of user {world.alice.id} in this chat was reset (2 messages)."
    assert _answer(stats) == "Only admins can do that."  # /stats is for bot admins only
    assert _answer(own).startswith("Done: I forgot our conversation")


async def test_block_usage_and_export_take_their_arguments_as_options(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    async def use(by: FakeUser, name: str, **options: str | bool | FakeUser) -> str:
        used = await server.user_uses_slash_command(world.general, by, name, options=options)
        await server.wait_for(lambda: bool(_answer(used)))
        return _answer(used)

    alice, admin = world.alice, world.bot_admin
    async with harness.manager(admin_ids=f"discord:{admin.id}") as manager, run_adapter(manager):
        assert await use(alice, "export", user=world.bob) == "Only admins can do that."
        assert (
            await use(admin, "block", user=alice) == f"Blocked discord:{alice.id}: I ignore their messages from now on."
        )
        await server.user_sends(world.general, alice, f"{server.bot.mention} hello?")
        assert f"discord:{alice.id}'s use today" in await use(admin, "usage", user=alice)
        assert await use(admin, "unblock", user=alice) == f"Unblocked discord:{alice.id}."
        assert await use(admin, "block", this_channel=True) == (
            f"Blocked discord:chat:{world.general.id}: I ignore their messages from now on."
        )
        assert await use(admin, "unblock", this_server=True) == f"discord:guild:{world.guild.id} was not blocked."
        assert (await use(admin, "block")).startswith("Usage: /block <user id>")  # nothing chosen
    assert server.bot_texts(world.general) == []  # blocked alice got no answer


async def test_bot_admin_gets_stats_in_a_direct_message(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    async with (
        harness.manager(admin_ids=f"discord:{world.bot_admin.id}") as manager,
        run_adapter(manager),
    ):
        dm = server.dm_channel(world.bot_admin)
        used = await server.user_uses_slash_command(dm, world.bot_admin, "stats")
        await server.wait_for(lambda: "Messages:" in _answer(used))
    assert used.callbacks[0]["data"]["flags"] & EPHEMERAL


class Broken(TestHandler):
    """A handler with a bug: raises on every message."""

    async def handle(self, event: IncomingMessage, target: ReplyTarget) -> None:
        raise RuntimeError(f"bug while handling {event.text!r}")


async def test_a_failing_handler_never_leaves_a_slash_command_thinking(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, caplog: pytest.LogCaptureFixture
) -> None:
    def logged_failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "adapters.discord.adapter" and r.exc_info]

    async with run_adapter(Broken()):
        used = await server.user_uses_slash_command(world.general, world.alice, "help")
        await server.wait_for(lambda: bool(_answer(used)))
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} still alive?")
        await server.wait_for(lambda: len(logged_failures()) == 2)
    assert _answer(used) == BotError.user_message
    assert used.original is not None and not used.original["flags"] & LOADING
    assert server.bot_texts(world.general) == []
