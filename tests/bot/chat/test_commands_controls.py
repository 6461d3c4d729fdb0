"""The public controls through the real manager, worker (fake engine) and SQLite
repository: /block, /unblock, /usage, rate limits and quotas as users meet them,
/config chat (the chat-wide switch and chat defaults) and /export."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from bot.chat.conversation import ConversationManager
from bot.events import ConversationKey, IncomingMessage, Platform
from bot.model.scheduler import Worker
from bot.ports import MessageOutcome
from tests.conftest import Harness
from tests.fakes.events import incoming
from tests.fakes.export import as_exported, read_export
from tests.fakes.targets import RecordingTarget


class Chat:
    """One group chat of the test: people write in it and see what the bot answers."""

    def __init__(self, manager: ConversationManager, chat: str = "g1") -> None:
        self.manager = manager
        self.chat = chat

    async def say(self, user: str, text: str, *, chat_admin: bool = False, private: bool = False) -> RecordingTarget:
        target = RecordingTarget(chat_admin=chat_admin)
        await self.manager.handle(self.event(user, text, private=private), target)
        return target

    async def answer(self, user: str, text: str, **kwargs: Any) -> str:
        return (await self.say(user, text, **kwargs)).text

    def event(self, user: str, text: str, *, private: bool = False) -> IncomingMessage:
        return incoming(text, user=user, chat=self.chat, private=private)


@asynccontextmanager
async def chat(harness: Harness, **overrides: Any) -> AsyncIterator[Chat]:
    async with harness.manager(**overrides) as manager:
        yield Chat(manager)


def key(user: str, chat_id: str = "g1") -> ConversationKey:
    return ConversationKey("telegram", chat_id, user)


async def contents(harness: Harness, user: str, chat_id: str = "g1") -> list[str]:
    return [m.content for m in await harness.repo.recent_messages(key(user, chat_id), 50)]


# --------------------------------------------------------------------------- blocks


async def test_admins_block_and_unblock_users_at_once(harness: Harness) -> None:
    async with chat(harness) as room:
        assert await room.answer("u1", "/block u2") == "Only admins can do that."
        assert await room.answer("admin", "/block u2") == "Blocked telegram:u2: I ignore their messages from now on."
        assert await room.answer("admin", "/block <@u2>") == "telegram:u2 was already blocked."
        assert await room.answer("u2", "hello?") == ""  # no answer...
        assert await room.answer("u2", "/help") == ""
        assert await contents(harness, "u2") == []  # ...and nothing stored
        assert await room.answer("u1", "hello") == "Echo: hello"  # everybody else goes on
        assert await room.answer("admin", "/unblock u2") == "Unblocked telegram:u2."
        assert await room.answer("admin", "/unblock u2") == "telegram:u2 was not blocked."
        assert await room.answer("u2", "back") == "Echo: back"
    assert await harness.repo.blocks() == frozenset()


async def test_block_takes_chats_guilds_and_full_entries_and_refuses_nonsense(harness: Harness) -> None:
    async with chat(harness, blocked_ids="telegram:spam") as room:
        assert "Blocked telegram:chat:g1" in await room.answer("admin", "/block chat:g1")
        assert await room.answer("u1", "anyone?") == ""  # the whole chat is ignored
        assert "Blocked discord:guild:9" in await room.answer("admin", "/block discord:guild:9")
        assert "Bad id" in await room.answer("admin", "/block telegram:guild:9")
        assert "Usage: /block" in await room.answer("admin", "/block")
        reply = await room.answer("admin", "/unblock telegram:spam")
        assert reply == "telegram:spam is blocked by the BLOCKED_IDS setting; only removing it there unblocks it."
    assert await harness.repo.blocks() == {"telegram:chat:g1", "discord:guild:9"}


# --------------------------------------------------------------------------- rate limits and quotas


async def test_over_the_rate_limit_one_notice_and_nothing_stored(harness: Harness) -> None:
    async with chat(harness, rate_limit="2/minute") as room:
        assert await room.answer("u1", "one") == "Echo: one"
        assert await room.answer("u1", "two") == "Echo: two"
        assert await room.answer("u1", "three") == "You're sending messages too fast: slow down, try again in 30 s."
        assert await room.answer("u1", "four") == ""  # one notice per wait, not one per message
        assert await room.answer("u2", "me too") == "Echo: me too"
        for _ in range(5):
            assert await room.answer("admin", "admins are exempt") == "Echo: admins are exempt"
    assert await contents(harness, "u1") == ["one", "Echo: one", "two", "Echo: two"]


async def test_the_daily_quota_stops_chat_but_not_commands(harness: Harness) -> None:
    async with chat(harness, daily_token_quota=10) as room:
        assert await room.answer("u1", "hello") == "Echo: hello"  # 11 tokens: over the quota now
        refused = await room.answer("u1", "more")
        assert refused.startswith("You've used your 10 tokens for today. The quota starts again at 00:00 UTC (in ")
        assert await room.answer("u1", "still more") == ""
        usage = await room.answer("u1", "/usage")
        assert usage.startswith("Your use today (") and "Daily quota: 10 tokens, 0 left" in usage
        assert await room.answer("u2", "hi") == "Echo: hi"  # a quota per user
    assert await contents(harness, "u1") == ["hello", "Echo: hello"]


async def test_usage_of_others_is_for_bot_admins(harness: Harness) -> None:
    async with chat(harness) as room:
        assert await room.answer("u1", "/usage u2") == "Only admins can do that."
        assert await room.answer("u1", "/usage reset u2") == "Only admins can do that."
        assert (await room.answer("u1", "/usage", chat_admin=True)).startswith("Your use today")
        assert "There is no daily quota." in await room.answer("u1", "/usage")
        shown = await room.answer("admin", "/usage telegram:u2")
        assert shown.startswith("telegram:u2's use today (") and "0 tokens generated for 0 messages" in shown
        assert await room.answer("admin", "/usage reset u2") == (
            "Done: the use of telegram:u2 today is reset; their quota starts again."
        )
        assert "a chat, not a user" in await room.answer("admin", "/usage telegram:chat:5")
        assert "Usage: /usage" in await room.answer("admin", "/usage a b c")
        assert "Usage: /usage" in await room.answer("admin", "/usage reset")  # whose?
        assert "Usage: /usage" in await room.answer("admin", "/usage u2 u3")


# --------------------------------------------------------------------------- chat-wide settings


async def test_a_chat_admin_switches_the_bot_off_and_on_in_their_chat(harness: Harness) -> None:
    async with chat(harness) as room:
        assert await room.answer("u1", "/config chat set enabled false") == "Only admins can do that."
        switched_off = await room.answer("mod", "/config set enabled false", chat_admin=True)
        assert switched_off.startswith("I'm switched off in this chat")
        assert await room.answer("u1", "hello?") == ""
        assert await room.answer("u1", "/help") == ""
        assert await room.answer("mod", "plain messages of admins too") == ""
        assert await contents(harness, "u1") == []
        assert "enabled = false" in await room.answer("mod", "/config chat", chat_admin=True)
        other = Chat(room.manager, "g2")
        assert await other.answer("u1", "other chats still answer") == "Echo: other chats still answer"
        on = await room.answer("mod", "/config chat set enabled yes", chat_admin=True)
        assert on == "I'm switched on in this chat again."
        assert await room.answer("u1", "hello!") == "Echo: hello!"
        assert "must be true or false" in await room.answer("mod", "/config chat set enabled maybe", chat_admin=True)
    assert await harness.repo.get_chat_settings("telegram", "g1") == {"enabled": 1}


async def test_chat_defaults_apply_to_everybody_under_their_own_settings(harness: Harness) -> None:
    async with chat(harness) as room:
        reply = await room.answer("mod", "/config chat set system_prompt Speak like a pirate.", chat_admin=True)
        assert reply.startswith("system_prompt is now 'Speak like a pirate.' for everybody in this chat")
        await room.answer("u1", "ahoy")
        assert "Speak like a pirate." in harness.engine.added[-1]
        assert "You are a test bot." not in harness.engine.added[-1]
        shown = await room.answer("u1", "/config")
        assert "system_prompt = 'Speak like a pirate.' (set for this chat)" in shown
        await room.answer("mod", "/config set system_prompt Be a parrot.", chat_admin=True)  # mod's own session
        await room.answer("mod", "squawk")
        assert "Be a parrot." in harness.engine.added[-1]
        await Chat(room.manager, "g2").answer("u1", "elsewhere")
        assert "You are a test bot." in harness.engine.added[-1]  # only that chat
        assert await room.answer("mod", "/config chat reset", chat_admin=True) == (
            "This chat's settings are back to the defaults (and I answer here)."
        )
        await room.answer("u1", "ahoy again")
        assert "You are a test bot." in harness.engine.added[-1]
        assert "Unknown setting 'colour'" in await room.answer("admin", "/config chat set colour red")


# --------------------------------------------------------------------------- export


async def test_export_sends_the_stored_conversation_as_a_markdown_file(harness: Harness) -> None:
    async with chat(harness) as room:
        assert (
            await room.answer("u1", "/export") == "There is nothing to export: our conversation in this chat is empty."
        )
        await room.answer("u1", "first question")
        await room.answer("u1", "a second one\nwith **Markdown** and two lines")
        await room.answer("u2", "someone else's")
        target = await room.say("u1", "/export")
    ((filename, data, caption),) = target.files
    assert target.messages == [caption]  # the file is the whole answer
    assert filename == "conversation-telegram-g1-u1.md" and caption.endswith(": 4 messages.")
    stored = await harness.repo.conversation_messages(key("u1"))
    assert len(stored) == 4
    assert read_export(data.decode("utf-8")) == as_exported(stored)


async def test_admins_export_another_users_conversation(harness: Harness) -> None:
    async with chat(harness) as room:
        await room.answer("u2", "my own words")
        assert await room.answer("u1", "/export u2") == "Only admins can do that."
        target = await room.say("mod", "/export u2", chat_admin=True)
        assert "nothing to export: user nobody's" in await room.answer("admin", "/export nobody")
    ((filename, data, _caption),) = target.files
    assert filename == "conversation-telegram-g1-u2.md"
    assert read_export(data.decode("utf-8")) == as_exported(await harness.repo.conversation_messages(key("u2")))


class Outcomes:
    """An `Observer` that keeps every message's outcome."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def message(self, platform: Platform, outcome: MessageOutcome) -> None:
        self.seen.append(outcome)

    def platform_error(self, platform: Platform, kind: str) -> None:
        pass


async def test_every_refused_message_is_reported_once_with_its_outcome(harness: Harness) -> None:
    outcomes = Outcomes()
    settings = harness.settings(rate_limit="2/minute", daily_token_quota=5, blocked_ids="telegram:troll")
    async with (
        Worker(harness.engine, model_name="fake") as worker,
        ConversationManager(settings, harness.repo, worker, observer=outcomes) as manager,
    ):
        room = Chat(manager)
        assert await room.answer("troll", "hi") == ""
        assert await room.answer("u1", "hello") == "Echo: hello"  # over the quota from now on
        assert (await room.answer("u1", "more")).startswith("You've used your 5 tokens")
        assert (await room.answer("u1", "again")).startswith("You're sending messages too fast")
        assert await room.answer("u1", "and again") == ""
    assert outcomes.seen == ["blocked", "answered", "refused_quota", "refused_rate", "refused_rate"]
