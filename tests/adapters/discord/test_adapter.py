"""The Discord adapter end to end: the real discord.py client against the fake Discord
on 127.0.0.1, with a test-local handler (adapter mechanics) or the real
`ConversationManager` + `Worker(FakeEngine)` + SQLite (the whole pipeline)."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from adapters.discord.adapter import ATTACHMENT_NOTE, MAX_CHARS, DiscordAdapter
from bot.chat import conversation
from bot.chat.commands import COMMANDS
from bot.chat.conversation import ConversationManager
from bot.errors import BotError, ConfigError
from bot.events import ConversationKey, IncomingMessage
from bot.model.scheduler import Worker
from bot.ports import ReplyTarget
from tests.adapters.discord.conftest import (
    EchoHandler,
    RunAdapter,
    World,
    assert_pings_no_one,
    created_in,
    discord_settings,
)
from tests.conftest import Harness
from tests.fakes.discord.server import (
    EPHEMERAL,
    LOADING,
    FakeAttachment,
    FakeDiscordServer,
    FakeInteraction,
)
from tests.fakes.fake_engine import FakeEngine

INTENTS = (1 << 0) | (1 << 9) | (1 << 12) | (1 << 15)  # guilds, guild messages, DMs, message content


def _fences_balanced(text: str) -> bool:
    return len(re.findall(r"^[ \t]*```", text, re.MULTILINE)) % 2 == 0


# --------------------------------------------------------------------------- start-up


async def test_connects_with_the_needed_intents_and_syncs_slash_commands(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    async with run_adapter(EchoHandler()):
        pass
    assert server.gateway_queries == [{"v": "10", "encoding": "json", "compress": "zlib-stream"}]
    assert len(server.identifies) == 1
    identify = server.identifies[0]
    assert identify["token_ok"] and identify["intents"] == INTENTS
    assert server.unknown_routes == []
    synced = {c["name"]: c for c in server.synced_commands or []}
    assert set(synced) == {c.name for c in COMMANDS}
    config = {o["name"]: o for o in synced["config"]["options"]}
    assert set(config) == {"show", "set", "reset"}
    key = next(o for o in config["set"]["options"] if o["name"] == "key")
    assert {c["value"] for c in key["choices"]} >= {"temperature", "system_prompt", "max_new_tokens"}
    assert {o["name"] for o in synced["reset"]["options"]} == {"user", "whole_channel"}
    assert all(len(c["description"]) <= 100 for c in synced.values())


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


async def test_direct_message_is_answered_by_a_reply_streamed_through_edits(
    server: FakeDiscordServer,
    world: World,
    run_adapter: RunAdapter,
    harness: Harness,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(conversation, "TYPING_DELAY_S", 0.05)
    harness.engine.step_delay = 0.01  # a reply that takes a while: typing, then edits
    async with harness.manager() as manager, run_adapter(manager, discord_edit_interval=0.01) as adapter:
        dm = server.dm_channel(world.alice)
        user_message = await server.user_sends(dm, world.alice, "hello there, how are you today?")
        await server.wait_for(lambda: server.bot_texts(dm) == ["Echo: hello there, how are you today?"])
        await server.wait_for(lambda: adapter.in_flight == 0)  # the reply is stored too

    first = created_in(server, dm)
    assert len(first) == 1  # one message, grown by edits
    assert first[0]["message_reference"]["message_id"] == int(user_message["id"])
    assert first[0]["allowed_mentions"]["replied_user"] is False
    edits = [c for c in server.calls if c.method == "PATCH" and c.path.startswith(f"/channels/{dm.id}/messages/")]
    assert len(edits) >= 1
    assert [c for c in server.calls if c.path == f"/channels/{dm.id}/typing"]
    assert_pings_no_one(server)
    stored = await harness.repo.recent_messages(ConversationKey("discord", str(dm.id), str(world.alice.id)), 10)
    assert [(m.role, m.content) for m in stored] == [
        ("user", "hello there, how are you today?"),
        ("assistant", "Echo: hello there, how are you today?"),
    ]
    assert stored[1].platform_message_id == server.bot_messages(dm)[0]["id"]


async def test_server_messages_need_a_mention_which_is_stripped(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    bot = server.bot
    async with run_adapter(handler):
        await server.user_sends(world.general, world.alice, "just chatting, not for the bot")
        await server.user_sends(world.general, world.alice, f"{bot.mention} first question")
        await server.user_sends(world.general, world.bob, f"<@!{bot.id}>   second question")
        await server.wait_for(lambda: len(handler.finished) == 2)
    assert [e.text for e in handler.events] == ["first question", "second question"]
    assert server.bot_texts(world.general) == ["Echo: first question", "Echo: second question"]
    assert all(not e.is_private for e in handler.events)


async def test_a_reply_to_the_bot_is_answered_without_a_mention(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler):
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} hi")
        await server.wait_for(lambda: handler.finished == ["hi"])
        bot_message = server.bot_messages(world.general)[0]
        not_bot = await server.user_sends(world.general, world.bob, "some other message")
        await server.user_sends(world.general, world.alice, "replying to bob", reply_to=not_bot)
        await server.user_sends(world.general, world.alice, "tell me more", reply_to=bot_message, ping_reply=False)
        await server.wait_for(lambda: len(handler.finished) == 2)
    assert [e.text for e in handler.events] == ["hi", "tell me more"]


async def test_bots_and_the_bots_own_messages_are_ignored(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler):
        await server.user_sends(world.general, world.other_bot, f"{server.bot.mention} bots talking")
        await server.user_sends(server.dm_channel(world.other_bot), world.other_bot, "bot DM")
        dm = server.dm_channel(world.alice)
        await server.user_sends(dm, world.alice, f"say {server.bot.mention}")
        await server.wait_for(lambda: len(handler.finished) == 1)
        # The bot's own reply came back over the gateway into the DM (as on Discord);
        # answering it would loop forever. A later message shows it was not taken up.
        await server.user_sends(dm, world.alice, "done")
        await server.wait_for(lambda: len(handler.finished) == 2)
    assert [e.user_id for e in handler.events] == [str(world.alice.id)] * 2
    assert [e.text for e in handler.events] == ["say", "done"]


async def test_a_thread_is_its_own_conversation(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler):
        await server.user_sends(world.thread, world.alice, f"{server.bot.mention} in the thread")
        await server.wait_for(lambda: handler.finished == ["in the thread"])
    assert handler.events[0].chat_id == str(world.thread.id)
    assert server.bot_texts(world.thread) == ["Echo: in the thread"]
    assert server.bot_texts(world.general) == []


async def test_manage_server_makes_a_member_a_chat_admin_but_never_in_dms(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler):
        await server.user_sends(world.general, world.moderator, f"{server.bot.mention} mod")
        await server.wait_for(lambda: len(handler.finished) == 1)
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} member")
        await server.wait_for(lambda: len(handler.finished) == 2)
        await server.user_sends(server.dm_channel(world.moderator), world.moderator, "mod in DM")
        await server.wait_for(lambda: len(handler.finished) == 3)
    assert handler.admin_checks == [True, False, False]
    assert handler.targets[0].max_chars == MAX_CHARS == 2000


async def test_text_commands_in_a_mention_reach_the_core(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    async with harness.manager() as manager, run_adapter(manager):
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} /config")
        await server.wait_for(lambda: bool(server.bot_texts(world.general)))
    assert server.bot_texts(world.general)[0].startswith("Settings for this session")


# --------------------------------------------------------------------------- streaming


async def test_long_reply_is_split_at_2000_chars_with_code_fences_reopened(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    code = "\n".join(f"    print('line {i:04d} of a long program')" for i in range(150))
    reply = f"Here is the program:\n\n```python\n{code}\n```\n\nThat is all."
    handler = EchoHandler(reply_for=lambda _text: reply, piece_delay=0.0)
    async with run_adapter(handler):
        dm = server.dm_channel(world.alice)
        await server.user_sends(dm, world.alice, "write a long program")
        await server.wait_for(lambda: handler.finished == ["write a long program"])
    texts = server.bot_texts(dm)
    assert len(texts) >= 3
    assert all(len(t) <= MAX_CHARS for t in texts)
    assert all(_fences_balanced(t) for t in texts)
    assert all(t.lstrip().startswith("```python") for t in texts[1:-1])
    assert texts[-1].endswith("That is all.")
    assert sum(t.count("of a long program") for t in texts) == 150
    assert_pings_no_one(server)


async def test_long_reply_from_the_model_is_split_and_stored_whole(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    body = "\n".join(f"x = {i:05d}  # filler line" for i in range(80))  # 2018 characters
    # A context big enough for a 2048-token reply (one token per character).
    engine = FakeEngine(reply=lambda _text: f"```python\n{body}\n```\ndone", context_length=8192)
    async with (
        Worker(engine) as worker,
        ConversationManager(harness.settings(max_new_tokens=2048), harness.repo, worker) as manager,
        run_adapter(manager, discord_edit_interval=0.05) as adapter,
    ):
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} code please")
        await server.wait_for(lambda: any(t.endswith("done") for t in server.bot_texts(world.general)), timeout=20)
        await server.wait_for(lambda: adapter.in_flight == 0)
    texts = server.bot_texts(world.general)
    assert len(texts) == 2
    assert all(len(t) <= MAX_CHARS and _fences_balanced(t) for t in texts)
    assert texts[1].startswith("```python\n")
    assert_pings_no_one(server)
    key = ConversationKey("discord", str(world.general.id), str(world.alice.id))
    stored = await harness.repo.recent_messages(key, 10)
    assert stored[-1].content == f"```python\n{body}\n```\ndone"


async def test_nothing_the_bot_sends_or_edits_can_ping_anyone(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    role = server.add_role(world.guild, "everyone-role", 0)
    nasty = f"@everyone @here <@{world.bob.id}> <@&{role.id}> hello"
    handler = EchoHandler(reply_for=lambda _text: nasty * 3)
    async with run_adapter(handler):
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} ping them all")
        dm = server.dm_channel(world.alice)
        await server.user_sends(dm, world.alice, "and here")
        await server.user_uses_slash_command(dm, world.alice, "help")
        await server.wait_for(lambda: len(handler.finished) == 3)
    assert nasty in server.bot_texts(world.general)[0]
    assert_pings_no_one(server)


async def test_two_channels_are_served_concurrently(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    handler.gates["slow one"] = asyncio.Event()
    async with run_adapter(handler):
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} slow one")
        await server.wait_for(lambda: "slow one" in handler.started)
        await server.user_sends(world.random, world.bob, f"{server.bot.mention} fast one")
        await server.wait_for(lambda: handler.finished == ["fast one"])
        assert server.bot_texts(world.general) == []  # still held while #random was answered
        handler.gates["slow one"].set()
        await server.wait_for(lambda: len(handler.finished) == 2)
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


# --------------------------------------------------------------------------- platform errors


async def test_forbidden_channel_is_dropped_and_other_channels_are_still_served(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    server.fail_next_message(world.general, 403)
    async with harness.manager() as manager, run_adapter(manager):
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} into the void")
        await server.wait_for(lambda: any(c.status == 403 for c in server.calls))
        await server.user_sends(world.random, world.bob, f"{server.bot.mention} over here")
        await server.wait_for(lambda: server.bot_texts(world.random) == ["Echo: over here"])
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} try again")
        await server.wait_for(lambda: server.bot_texts(world.general) == ["Echo: try again"])
    forbidden = [c for c in server.calls if c.status == 403]
    assert len(forbidden) == 1  # not retried: the core drops that reply


async def test_reply_deleted_mid_stream_stops_the_stream(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, harness: Harness
) -> None:
    long_reply = "Echo: " + "a fairly long answer " * 10
    harness.engine.step_delay = 0.01
    harness.engine.reply = lambda text: long_reply if text == "talk a lot" else "Echo: " + text
    async with harness.manager() as manager, run_adapter(manager, discord_edit_interval=0.02) as adapter:
        dm = server.dm_channel(world.alice)
        await server.user_sends(dm, world.alice, "talk a lot")
        await server.wait_for(lambda: bool(server.bot_messages(dm)))
        deleted = server.bot_messages(dm)[0]["id"]
        await server.delete_message(deleted)
        await server.wait_for(lambda: any(c.status == 404 for c in server.calls))
        await server.wait_for(lambda: bool(harness.engine.removed), timeout=5)
        assert harness.engine.steps < len(long_reply)  # the generation was stopped
        await server.user_sends(dm, world.alice, "still there?")
        await server.wait_for(lambda: "Echo: still there?" in server.bot_texts(dm))
        await server.wait_for(lambda: adapter.in_flight == 0)
    failed_at = next(i for i, c in enumerate(server.calls) if c.status == 404)
    assert server.calls[failed_at].path == f"/channels/{dm.id}/messages/{deleted}"
    assert not any(c.path.endswith(deleted) for c in server.calls[failed_at + 1 :])  # no retries, no "[stopped]"
    assert server.bot_texts(dm) == ["Echo: still there?"]
    key = ConversationKey("discord", str(dm.id), str(world.alice.id))
    stored = [m.content for m in await harness.repo.recent_messages(key, 10)]
    assert stored[0] == "talk a lot"
    assert stored[1] and long_reply.startswith(stored[1]) and stored[1] != long_reply  # the part generated


async def test_user_message_deleted_before_the_reply_is_dropped(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    handler.gates["vanishing"] = asyncio.Event()
    async with run_adapter(handler):
        message = await server.user_sends(world.general, world.alice, f"{server.bot.mention} vanishing")
        await server.wait_for(lambda: "vanishing" in handler.started)
        await server.delete_message(message["id"])
        handler.gates["vanishing"].set()
        await server.wait_for(lambda: len(handler.errors) == 1)
        await server.user_sends(world.general, world.alice, f"{server.bot.mention} next")
        await server.wait_for(lambda: handler.finished == ["next"])
    assert server.bot_texts(world.general) == ["Echo: next"]


@pytest.mark.parametrize("how", ["connection dropped", "reconnect requested"])
async def test_gateway_disconnect_resumes_and_delivers_missed_messages(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter, how: str
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler):
        dm = server.dm_channel(world.alice)
        await server.user_sends(dm, world.alice, "before")
        await server.wait_for(lambda: handler.finished == ["before"])
        if how == "connection dropped":
            await server.drop_gateway(4000)
        else:
            await server.send_reconnect()
        await server.user_sends(dm, world.alice, "during")  # buffered, replayed on RESUME
        await server.wait_for(lambda: len(server.resumes) == 1)
        await server.user_sends(dm, world.alice, "after")
        await server.wait_for(lambda: len(handler.finished) == 3)
    assert len(server.identifies) == 1  # resumed, not re-identified
    assert server.resumes[0]["seq"] is not None
    assert handler.finished == ["before", "during", "after"]


# --------------------------------------------------------------------------- attachments


async def test_text_attachments_are_read_into_the_message(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    files = [
        FakeAttachment("notes.md", "# Notes\nbuy milk ✓".encode()),
        FakeAttachment("log", b"bad byte \xff here", content_type="text/plain; charset=utf-8"),
        FakeAttachment("cat.png", b"\x89PNG\r\n", content_type="image/png"),
    ]
    async with run_adapter(handler):
        dm = server.dm_channel(world.alice)
        await server.user_sends(dm, world.alice, "summarise these", attachments=files)
        await server.wait_for(lambda: len(handler.finished) == 1)
    assert handler.events[0].text == "summarise these\n\n[notes.md]\n# Notes\nbuy milk ✓\n\n[log]\nbad byte \ufffd here"


async def test_attachments_without_text_get_a_short_note(
    server: FakeDiscordServer, world: World, run_adapter: RunAdapter
) -> None:
    handler = EchoHandler()
    async with run_adapter(handler, discord_attachment_max_bytes=10):
        dm = server.dm_channel(world.alice)
        await server.user_sends(dm, world.alice, "", attachments=[FakeAttachment("cat.png", b"\x89PNG", "image/png")])
        await server.wait_for(lambda: len(server.bot_texts(dm)) == 1)
        await server.user_sends(dm, world.alice, "", attachments=[FakeAttachment("big.txt", b"x" * 11)])
        await server.wait_for(lambda: len(server.bot_texts(dm)) == 2)
    assert handler.events == []  # the core was never asked
    first, second = server.bot_texts(dm)
    assert first == ATTACHMENT_NOTE
    assert second.startswith(ATTACHMENT_NOTE) and "big.txt" in second and "10 bytes" in second
    assert not any(c.path.startswith("/attachments/") for c in server.calls)  # nothing downloaded
    assert_pings_no_one(server)


# --------------------------------------------------------------------------- slash commands


def _answer(interaction: FakeInteraction) -> str:
    return "\n".join(m["content"] for m in interaction.responses)


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


class Broken:
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
