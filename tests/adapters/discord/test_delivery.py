"""Replies on Discord: a message's reply streamed through edits and split at 2000
characters, the ephemeral answer's limits, no pings, the sender's admin rights, and
Discord's refusals turned into `DeliveryError` (the core then drops that reply)."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import aiohttp
import discord
import pytest

from adapters.discord.delivery import MAX_CHARS, delivery_errors
from bot.chat import conversation
from bot.errors import DeliveryError
from bot.events import ConversationKey
from tests.adapters.discord.conftest import EchoHandler, RunAdapter, World, assert_pings_no_one, created_in
from tests.conftest import Harness
from tests.fakes.discord.server import FakeDiscordServer
from tests.fakes.fake_engine import FakeEngine


def _fences_balanced(text: str) -> bool:
    return len(re.findall(r"^[ \t]*```", text, re.MULTILINE)) % 2 == 0


# --------------------------------------------------------------------------- the delivery error mapping


def _refusal(kind: type[discord.HTTPException], status: int) -> discord.HTTPException:
    response = SimpleNamespace(status=status, reason="refused")  # what discord.py reads of an aiohttp response
    return kind(response, {"message": "refused", "code": 0})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("error", "detail", "permanent", "kind"),
    [
        (_refusal(discord.Forbidden, 403), "forbidden to send a message in channel 7", True, "forbidden"),
        (_refusal(discord.NotFound, 404), "send a message: not found in channel 7", True, "not_found"),
        (_refusal(discord.HTTPException, 400), "send a message failed with HTTP 400 in channel 7", True, "bad_request"),
        (
            _refusal(discord.DiscordServerError, 503),
            "send a message failed with HTTP 503 in channel 7",
            False,
            "server_error",
        ),
        (discord.RateLimited(90.0), "send a message: rate limited for 90 s in channel 7", False, "rate_limited"),
        (TimeoutError(), "send a message: timed out", False, "timeout"),
        (aiohttp.ClientConnectionError("reset"), "send a message: ClientConnectionError('reset')", False, "network"),
        (OSError("unreachable"), "send a message: OSError('unreachable')", False, "network"),
    ],
)
def test_discord_refusals_and_network_errors_become_delivery_errors(
    error: Exception, detail: str, permanent: bool, kind: str
) -> None:
    with pytest.raises(DeliveryError) as info, delivery_errors("send a message", 7):
        raise error
    assert str(info.value) == detail
    assert (info.value.permanent, info.value.kind) == (permanent, kind)
    assert info.value.__cause__ is error


def test_other_errors_are_not_delivery_errors() -> None:
    with pytest.raises(ValueError, match="a bug"), delivery_errors("send a message", 7):
        raise ValueError("a bug")


# --------------------------------------------------------------------------- replies to messages


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


async def test_manage_server_makes_a_member_a_chat_admin_but_never_in_dms(
    server: FakeDiscordServer, world: World, echo: EchoHandler
) -> None:
    await server.user_sends(world.general, world.moderator, f"{server.bot.mention} mod")
    await server.wait_for(lambda: len(echo.finished) == 1)
    await server.user_sends(world.general, world.alice, f"{server.bot.mention} member")
    await server.wait_for(lambda: len(echo.finished) == 2)
    await server.user_sends(server.dm_channel(world.moderator), world.moderator, "mod in DM")
    await server.wait_for(lambda: len(echo.finished) == 3)
    assert echo.admin_checks == [True, False, False]
    assert echo.targets[0].max_chars == MAX_CHARS == 2000


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
        harness.core(engine, max_new_tokens=2048) as core,
        run_adapter(core.manager, discord_edit_interval=0.05) as adapter,
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
    server: FakeDiscordServer, world: World, echo: EchoHandler
) -> None:
    echo.gates["vanishing"] = asyncio.Event()
    message = await server.user_sends(world.general, world.alice, f"{server.bot.mention} vanishing")
    await server.wait_for(lambda: "vanishing" in echo.started)
    await server.delete_message(message["id"])
    echo.gates["vanishing"].set()
    await server.wait_for(lambda: len(echo.errors) == 1)
    await server.user_sends(world.general, world.alice, f"{server.bot.mention} next")
    await server.wait_for(lambda: echo.finished == ["next"])
    assert server.bot_texts(world.general) == ["Echo: next"]
