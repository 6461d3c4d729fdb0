"""The pure edge: real `discord.Message` objects (built by discord.py from the fake's
payloads, no connection) converted by `to_event`, and the mention stripped."""

from __future__ import annotations

from typing import Any

import discord
import pytest
from discord.state import ConnectionState
from discord.user import ClientUser

from adapters.discord.adapter import make_intents
from adapters.discord.events import strip_mention, to_event
from tests.fakes.discord.world import FakeAttachment, FakeChannel, FakeUser, FakeWorld, Json


class Offline:
    """discord.py's own state and model classes, fed payloads by hand."""

    def __init__(self) -> None:
        self.fake = FakeWorld()  # no server: only its payload builders are used
        self.guild = self.fake.add_guild("Wonderland")
        self.general = self.fake.add_text_channel(self.guild, "general")
        self.thread = self.fake.add_thread(self.general, "ideas")
        self.alice = self.fake.add_user("alice")
        self.other_bot = self.fake.add_user("otherbot", bot=True)
        for user in (self.alice, self.other_bot):
            self.fake.add_member(self.guild, user)
        self.bot_id = self.fake.bot.id
        self.state: ConnectionState[Any] = discord.Client(intents=make_intents())._connection
        self.state.user = ClientUser(state=self.state, data=self.fake.bot.payload())  # type: ignore[arg-type]
        self.state._add_guild_from_data(self.guild.payload())  # type: ignore[arg-type]

    def payload(self, channel: FakeChannel, author: FakeUser, content: str, **kwargs: Any) -> Json:
        data = self.fake.message_payload(channel, author, content, gateway=True, **kwargs)
        self.fake.messages[int(data["id"])] = data
        return data

    def message(self, channel: FakeChannel, author: FakeUser, content: str, **kwargs: Any) -> discord.Message:
        return self.to_message(self.payload(channel, author, content, **kwargs))

    def to_message(self, data: Json) -> discord.Message:
        channel, _ = self.state._get_guild_channel(data)  # type: ignore[arg-type]
        return discord.Message(state=self.state, channel=channel, data=data)  # type: ignore[arg-type]


@pytest.fixture
def offline() -> Offline:
    return Offline()


def test_direct_message_is_a_private_event_for_the_dm_channel(offline: Offline) -> None:
    dm = offline.fake.dm_channel(offline.alice)
    message = offline.message(dm, offline.alice, "  what is a monad?  ")
    event = to_event(message, offline.bot_id)
    assert event is not None
    assert (event.platform, event.chat_id, event.user_id, event.message_id) == (
        "discord",
        str(dm.id),
        str(offline.alice.id),
        str(message.id),
    )
    assert event.text == "what is a monad?"
    assert event.is_private
    assert event.display_name == "Alice"
    assert event.timestamp == message.created_at


def test_server_message_without_mention_or_reply_is_dropped(offline: Offline) -> None:
    assert to_event(offline.message(offline.general, offline.alice, "hello everyone"), offline.bot_id) is None


@pytest.mark.parametrize("form", ["<@{id}>", "<@!{id}>"])
def test_mention_makes_the_bot_answer_and_is_stripped(offline: Offline, form: str) -> None:
    mention = form.format(id=offline.bot_id)
    event = to_event(offline.message(offline.general, offline.alice, f"{mention} tell me a joke"), offline.bot_id)
    assert event is not None and not event.is_private
    assert event.text == "tell me a joke"
    assert event.chat_id == str(offline.general.id)


def test_mention_in_the_middle_is_stripped_and_other_mentions_are_kept(offline: Offline) -> None:
    text = f"hey <@{offline.bot_id}>, what does <@{offline.alice.id}> mean?"
    event = to_event(offline.message(offline.general, offline.alice, text), offline.bot_id)
    assert event is not None
    assert event.text == f"hey , what does <@{offline.alice.id}> mean?"


def test_mentioning_someone_else_is_not_addressing_the_bot(offline: Offline) -> None:
    text = f"<@{offline.alice.id}> look"
    assert to_event(offline.message(offline.general, offline.alice, text), offline.bot_id) is None


def test_reply_to_a_bot_message_is_answered_without_a_mention(offline: Offline) -> None:
    bot_message = offline.payload(offline.general, offline.fake.bot, "Echo: hi")
    reply = offline.message(offline.general, offline.alice, "and then?", reference=bot_message, ping_reply=False)
    event = to_event(reply, offline.bot_id)
    assert event is not None and event.text == "and then?"


def test_reply_to_someone_else_is_dropped(offline: Offline) -> None:
    other = offline.payload(offline.general, offline.alice, "my own message")
    reply = offline.message(offline.general, offline.alice, "adding to that", reference=other)
    assert to_event(reply, offline.bot_id) is None


def test_reply_to_a_deleted_message_is_dropped(offline: Offline) -> None:
    bot_message = offline.payload(offline.general, offline.fake.bot, "Echo: hi")
    offline.fake.deleted.add(int(bot_message["id"]))
    reply = offline.message(offline.general, offline.alice, "where did it go?", reference=bot_message)
    assert to_event(reply, offline.bot_id) is None


def test_other_bots_are_ignored_even_when_they_mention_the_bot(offline: Offline) -> None:
    mention = f"<@{offline.bot_id}> ping"
    assert to_event(offline.message(offline.general, offline.other_bot, mention), offline.bot_id) is None
    dm = offline.fake.dm_channel(offline.other_bot)
    assert to_event(offline.message(dm, offline.other_bot, "hello"), offline.bot_id) is None


def test_the_bot_ignores_its_own_messages(offline: Offline) -> None:
    dm = offline.fake.dm_channel(offline.alice)
    assert to_event(offline.message(dm, offline.fake.bot, "Echo: hello"), offline.bot_id) is None


def test_webhook_and_system_messages_are_ignored(offline: Offline) -> None:
    data = offline.payload(offline.general, offline.alice, f"<@{offline.bot_id}> from a webhook")
    data["webhook_id"] = str(offline.fake.application_id)
    assert to_event(offline.to_message(data), offline.bot_id) is None
    data = offline.payload(offline.general, offline.alice, f"<@{offline.bot_id}>")
    data["type"] = 7  # "Alice joined the server"
    assert to_event(offline.to_message(data), offline.bot_id) is None


def test_a_thread_is_its_own_chat(offline: Offline) -> None:
    event = to_event(offline.message(offline.thread, offline.alice, f"<@{offline.bot_id}> in a thread"), offline.bot_id)
    assert event is not None
    assert event.chat_id == str(offline.thread.id) != str(offline.general.id)
    assert event.text == "in a thread"


def test_empty_direct_message_is_dropped_but_one_with_an_attachment_is_kept(offline: Offline) -> None:
    dm = offline.fake.dm_channel(offline.alice)
    assert to_event(offline.message(dm, offline.alice, ""), offline.bot_id) is None
    with_file = offline.message(dm, offline.alice, "", attachments=[FakeAttachment("a.txt", b"x")])
    event = to_event(with_file, offline.bot_id)
    assert event is not None and event.text == ""


def test_a_bare_mention_reaches_the_core_with_empty_text(offline: Offline) -> None:
    event = to_event(offline.message(offline.general, offline.alice, f"<@{offline.bot_id}>"), offline.bot_id)
    assert event is not None and event.text == ""


def test_strip_mention_handles_both_forms_and_keeps_other_text() -> None:
    bot = 123456789012345678
    assert strip_mention(f"<@{bot}> /reset", bot) == "/reset"
    assert strip_mention(f"hi<@!{bot}>there", bot) == "hi there"
    assert strip_mention(f"a <@{bot}> b <@{bot}>", bot) == "a b"
    assert strip_mention("line one\n\n  indented code", bot) == "line one\n\n  indented code"
    assert strip_mention(f"<@{bot + 1}> not me", bot) == f"<@{bot + 1}> not me"
