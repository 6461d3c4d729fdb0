"""The public controls on Discord end to end: the fake Discord, the real discord.py
adapter, the real manager with `Worker(FakeEngine)` and SQLite. Blocks and allow lists
for users, channels and servers, `/block`, the rate limit's one notice, the chat-wide
switch for members with Manage Server, and `/export` arriving as an attachment whose
text is the stored history."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from bot.events import ConversationKey
from tests.adapters.discord.conftest import RunAdapter, World
from tests.conftest import Harness
from tests.fakes.discord.server import FakeDiscordServer
from tests.fakes.discord.world import FakeChannel, FakeUser
from tests.fakes.export import as_exported, read_export


def key(channel: FakeChannel, user: FakeUser) -> ConversationKey:
    return ConversationKey("discord", str(channel.id), str(user.id))


@asynccontextmanager
async def bot(run_adapter: RunAdapter, harness: Harness, world: World, **extra: Any) -> AsyncIterator[None]:
    """The whole bot on the fake Discord; `world.bot_admin` is a bot admin."""
    values: dict[str, Any] = {"admin_ids": f"discord:{world.bot_admin.id}", **extra}
    async with harness.manager(**values) as manager, run_adapter(manager, **values):
        yield


async def ask(
    server: FakeDiscordServer, channel: FakeChannel, user: FakeUser, text: str, expect: str | Callable[[str], bool]
) -> str:
    """`user` writes `text` in `channel` (mentioning the bot outside DMs) and waits until
    the bot's answer (the first message after it, as streamed edits leave it) says
    `expect` (or satisfies it). Returns the answer."""
    before = len(server.bot_texts(channel))
    content = text if channel.guild is None else f"{server.bot.mention} {text}"
    await server.user_sends(channel, user, content)
    check = expect if callable(expect) else expect.__eq__

    def answered() -> bool:
        new = server.bot_texts(channel)[before:]
        return bool(new) and check(new[0])

    try:
        await server.wait_for(answered)
    except AssertionError:
        raise AssertionError(f"answer to {text!r}: {server.bot_texts(channel)[before:]}, not {expect!r}") from None
    return server.bot_texts(channel)[before]


async def say(server: FakeDiscordServer, channel: FakeChannel, user: FakeUser, text: str) -> None:
    """`user` writes `text` and expects no answer (checked by the caller later)."""
    await server.user_sends(channel, user, text if channel.guild is None else f"{server.bot.mention} {text}")


async def test_blocked_users_channels_and_servers_get_no_answer_and_nothing_is_stored(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    blocked = f"discord:{world.bob.id},discord:chat:{world.random.id}"
    other_guild = server.add_guild("Elsewhere")
    lobby = server.add_text_channel(other_guild, "lobby")
    server.add_member(other_guild, world.alice)
    async with bot(run_adapter, harness, world, blocked_ids=f"{blocked},discord:guild:{other_guild.id}"):
        await say(server, server.dm_channel(world.bob), world.bob, "hello?")
        await say(server, world.general, world.bob, "in general")
        await say(server, world.random, world.alice, "in random")
        await say(server, lobby, world.alice, "in the other server")
        await ask(server, world.general, world.alice, "hi", "Echo: hi")
        await ask(server, server.dm_channel(world.alice), world.alice, "dm", "Echo: dm")
    assert server.bot_texts(server.dm_channel(world.bob)) == []
    assert server.bot_texts(world.random) == [] and server.bot_texts(lobby) == []
    assert server.bot_texts(world.general) == ["Echo: hi"]
    for channel, user in ((world.general, world.bob), (world.random, world.alice), (lobby, world.alice)):
        assert await harness.repo.recent_messages(key(channel, user), 10) == []


async def test_an_allow_list_of_one_server_leaves_direct_messages_unanswered(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    async with bot(run_adapter, harness, world, allowed_ids=f"discord:guild:{world.guild.id}"):
        await say(server, server.dm_channel(world.alice), world.alice, "let me in")
        await ask(server, world.thread, world.alice, "in a thread", "Echo: in a thread")
        await ask(server, world.general, world.bob, "in the server", "Echo: in the server")
        dm_of_admin = server.dm_channel(world.bot_admin)
        await ask(server, dm_of_admin, world.bot_admin, "admin", "Echo: admin")
    assert server.bot_texts(server.dm_channel(world.alice)) == []
    assert await harness.repo.recent_messages(key(server.dm_channel(world.alice), world.alice), 10) == []


async def test_an_admin_blocks_a_user_by_mention_and_unblocks_them(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    admin_dm = server.dm_channel(world.bot_admin)
    async with bot(run_adapter, harness, world):
        await ask(server, world.general, world.alice, f"/block <@{world.bob.id}>", "Only admins can do that.")
        blocked = f"Blocked discord:{world.bob.id}: I ignore their messages from now on."
        await ask(server, admin_dm, world.bot_admin, f"/block <@{world.bob.id}>", blocked)
        await say(server, world.general, world.bob, "ignored")
        await ask(server, world.general, world.alice, "and me?", "Echo: and me?")
        await ask(server, admin_dm, world.bot_admin, f"/unblock {world.bob.id}", f"Unblocked discord:{world.bob.id}.")
        await ask(server, world.general, world.bob, "back", "Echo: back")
        assert await harness.stored_texts(key(world.general, world.bob), 2) == ["back", "Echo: back"]


async def test_over_the_rate_limit_the_user_is_told_once(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    dm = server.dm_channel(world.alice)
    async with bot(run_adapter, harness, world, rate_limit="2/minute"):
        await ask(server, dm, world.alice, "one", "Echo: one")
        await ask(server, dm, world.alice, "two", "Echo: two")
        notice = "You're sending messages too fast: slow down, try again in 30 s."
        await ask(server, dm, world.alice, "three", notice)
        await say(server, dm, world.alice, "four")
        await ask(server, world.general, world.bob, "someone else", "Echo: someone else")
        assert await harness.stored_texts(key(dm, world.alice), 4) == ["one", "Echo: one", "two", "Echo: two"]
    assert server.bot_texts(dm) == ["Echo: one", "Echo: two", notice]


async def test_a_moderator_switches_the_bot_off_and_on_in_a_channel(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    async with bot(run_adapter, harness, world):
        await ask(server, world.general, world.alice, "/config chat set enabled false", "Only admins can do that.")
        await ask(
            server,
            world.general,
            world.moderator,
            "/config chat set enabled false",
            lambda text: text.startswith("I'm switched off in this chat"),
        )
        await say(server, world.general, world.alice, "hello?")
        await ask(server, world.general, world.moderator, "/config chat", lambda text: "enabled = false" in text)
        await ask(server, world.random, world.alice, "other channel", "Echo: other channel")
        on = "I'm switched on in this chat again."
        await ask(server, world.general, world.moderator, "/config chat set enabled true", on)
        await ask(server, world.general, world.alice, "now?", "Echo: now?")
        assert await harness.stored_texts(key(world.general, world.alice), 2) == ["now?", "Echo: now?"]
    assert [t for t in server.bot_texts(world.general) if t.startswith("Echo")] == ["Echo: now?"]


async def test_export_arrives_as_an_attachment_equal_to_the_stored_history(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    conversation = key(world.general, world.alice)
    async with bot(run_adapter, harness, world):
        await ask(server, world.general, world.alice, "hello model", "Echo: hello model")
        await ask(server, world.general, world.alice, "and `code`", "Echo: and `code`")
        await harness.stored_texts(conversation, 4)
        await say(server, world.general, world.alice, "/export")
        await server.wait_for(lambda: len(server.uploads) == 1)
        # The slash command answers with the file privately.
        await server.user_uses_slash_command(world.general, world.alice, "export")
        await server.wait_for(lambda: len(server.uploads) == 2)
    stored = await harness.repo.conversation_messages(conversation)
    assert [m.content for m in stored] == ["hello model", "Echo: hello model", "and `code`", "Echo: and `code`"]
    public, private = server.uploads
    assert public.channel_id == world.general.id and not public.ephemeral
    assert public.filename == f"conversation-discord-{world.general.id}-{world.alice.id}.md"
    assert public.content.endswith(": 4 messages.")
    assert read_export(public.text) == as_exported(stored)
    assert private.ephemeral and read_export(private.text) == as_exported(stored)
