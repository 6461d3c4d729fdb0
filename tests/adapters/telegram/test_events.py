"""`to_event` alone: Telegram messages (as the Bot API sends them) to the common event."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from telegram import Message

from adapters.telegram.events import is_unreadable_media, to_event
from tests.fakes.telegram import auto_entities

BOT_ID = 7_000_001
BOT = {"id": BOT_ID, "is_bot": True, "first_name": "LLM Test Bot", "username": "LlmTestBot"}
ALICE = {"id": 1001, "is_bot": False, "first_name": "Alice", "last_name": "Liddell", "username": "alice"}
BOB = {"id": 1002, "is_bot": False, "first_name": "Bob"}
PRIVATE = {"id": 1001, "type": "private", "first_name": "Alice"}
GROUP = {"id": -4001, "type": "group", "title": "Tea party"}
SUPERGROUP = {"id": -1_000_000_000_001, "type": "supergroup", "title": "Wonderland", "is_forum": True}
DATE = 1_767_225_600  # 2026-01-01 00:00 UTC


def message(
    text: str | None = "hello",
    *,
    chat: dict[str, Any] = PRIVATE,
    sender: dict[str, Any] = ALICE,
    entities: list[dict[str, Any]] | None = None,
    message_id: int = 42,
    **extra: Any,
) -> Message:
    data: dict[str, Any] = {"message_id": message_id, "date": DATE, "chat": chat, "from": sender, **extra}
    if text is not None:
        data["text"] = text
        found = auto_entities(text) if entities is None else entities
        if found:
            data["entities"] = found
    return Message.de_json(data, None)


def text_of(msg: Message) -> str | None:
    event = to_event(msg, "LlmTestBot", BOT_ID)
    return None if event is None else event.text


def test_a_private_text_message_becomes_an_event() -> None:
    event = to_event(message("How are you?"), "LlmTestBot", BOT_ID)
    assert event is not None
    assert (event.platform, event.chat_id, event.user_id, event.message_id) == ("telegram", "1001", "1001", "42")
    assert event.text == "How are you?"
    assert event.display_name == "Alice Liddell"
    assert event.is_private
    assert event.timestamp == datetime(2026, 1, 1, tzinfo=UTC)
    assert event.key.chat_id == "1001" and event.sender == "telegram:1001"


def test_private_text_keeps_its_spacing_and_empty_text_is_kept() -> None:
    assert text_of(message("  indented\n\tcode  ")) == "  indented\n\tcode  "
    assert text_of(message(" ")) == " "


@pytest.mark.parametrize("chat", [GROUP, SUPERGROUP])
def test_group_messages_not_addressed_to_the_bot_are_dropped(chat: dict[str, Any]) -> None:
    assert to_event(message("hello everyone", chat=chat), "LlmTestBot", BOT_ID) is None
    assert to_event(message("hi @alice and @LlmTestBot2", chat=chat), "LlmTestBot", BOT_ID) is None
    # "@LlmTestBot" inside a word is not a mention entity
    assert to_event(message("mail me at me@LlmTestBot.org", chat=chat), "LlmTestBot", BOT_ID) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("@LlmTestBot what is 2+2?", "what is 2+2?"),
        ("@llmtestbot, what is 2+2?", "what is 2+2?"),  # case-insensitive, leading comma dropped
        ("what is 2+2, @LLMTESTBOT?", "what is 2+2,?"),
        ("hey @LlmTestBot how are you", "hey how are you"),
        ("thanks @LlmTestBot!", "thanks!"),
        ("@LlmTestBot\nline one\nline two", "line one\nline two"),
        ("😀🎉 @LlmTestBot hi 👋", "😀🎉 hi 👋"),  # entity offsets count UTF-16 units
        ("@LlmTestBot", ""),
    ],
)
def test_a_mention_in_a_group_addresses_the_bot_and_is_stripped(text: str, expected: str) -> None:
    event = to_event(message(text, chat=GROUP), "LlmTestBot", BOT_ID)
    assert event is not None and not event.is_private
    assert event.text == expected
    assert event.chat_id == "-4001" and event.user_id == "1001"


def test_the_bot_username_may_be_given_with_its_at_sign() -> None:
    assert to_event(message("@LlmTestBot hi", chat=GROUP), "@LlmTestBot", BOT_ID) is not None


def test_a_text_mention_of_the_bot_addresses_it() -> None:
    entities = [{"type": "text_mention", "offset": 4, "length": 3, "user": BOT}]
    assert text_of(message("hey bot, ready?", chat=GROUP, entities=entities)) == "hey, ready?"
    other = [{"type": "text_mention", "offset": 4, "length": 3, "user": BOB}]
    assert text_of(message("hey Bob, ready?", chat=GROUP, entities=other)) is None


def test_a_reply_to_the_bot_addresses_it_and_a_reply_to_others_does_not() -> None:
    bots = {"message_id": 7, "date": DATE, "chat": GROUP, "from": BOT, "text": "Earlier answer"}
    bobs = {"message_id": 8, "date": DATE, "chat": GROUP, "from": BOB, "text": "Bob's line"}
    assert text_of(message("and then?", chat=GROUP, reply_to_message=bots)) == "and then?"
    assert text_of(message("and then?", chat=GROUP, reply_to_message=bobs)) is None


def test_a_forum_topic_message_is_not_a_reply_to_the_topic_starter() -> None:
    # Inside a topic every message "replies" to the topic's creation, even one the bot made.
    created = {
        "message_id": 5,
        "date": DATE,
        "chat": SUPERGROUP,
        "from": BOT,
        "forum_topic_created": {"name": "Help", "icon_color": 7322096},
    }
    msg = message(
        "just chatting", chat=SUPERGROUP, reply_to_message=created, message_thread_id=5, is_topic_message=True
    )
    assert text_of(msg) is None


def test_each_forum_topic_is_a_chat_of_its_own() -> None:
    def chat_of(**extra: Any) -> str:
        event = to_event(message("@LlmTestBot hi", chat=SUPERGROUP, **extra), "LlmTestBot", BOT_ID)
        assert event is not None
        return event.chat_id

    assert chat_of(message_thread_id=5, is_topic_message=True) == "-1000000000001/5"
    assert chat_of(message_thread_id=9, is_topic_message=True) == "-1000000000001/9"
    assert chat_of() == "-1000000000001"  # the General topic
    # A reply thread outside forums has a thread id too, but is not a topic.
    assert chat_of(message_thread_id=3) == "-1000000000001"


def test_a_forum_topic_message_names_its_topic_so_a_later_reply_finds_it() -> None:
    def thread_of(**extra: Any) -> str | None:
        event = to_event(message("@LlmTestBot hi", chat=SUPERGROUP, **extra), "LlmTestBot", BOT_ID)
        assert event is not None
        return event.thread_id

    assert thread_of(message_thread_id=5, is_topic_message=True) == "5"
    assert thread_of() is None
    assert thread_of(message_thread_id=3) is None  # a reply thread, not a topic


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/help", "/help"),
        ("/help@LlmTestBot", "/help"),
        ("/config@llmtestbot set temperature 0.5", "/config set temperature 0.5"),
        ("/config@LlmTestBot set system_prompt Hi @LlmTestBot friend", "/config set system_prompt Hi friend"),
    ],
)
def test_commands_for_this_bot_address_it_in_groups(text: str, expected: str) -> None:
    assert text_of(message(text, chat=GROUP)) == expected


@pytest.mark.parametrize("chat", [GROUP, PRIVATE])
def test_commands_for_another_bot_are_ignored(chat: dict[str, Any]) -> None:
    assert text_of(message("/help@OtherBot", chat=chat)) is None
    assert text_of(message("/help@OtherBot @LlmTestBot", chat=chat)) is None


def test_a_command_later_in_the_text_is_not_a_command() -> None:
    assert text_of(message("try /help", chat=GROUP)) is None


@pytest.mark.parametrize(
    "extra",
    [
        {"photo": [{"file_id": "f", "file_unique_id": "u", "width": 9, "height": 9}]},
        {
            "sticker": {
                "file_id": "f",
                "file_unique_id": "u",
                "type": "regular",
                "width": 9,
                "height": 9,
                "is_animated": False,
                "is_video": False,
            }
        },
        {"voice": {"file_id": "f", "file_unique_id": "u", "duration": 1}},
        {"document": {"file_id": "f", "file_unique_id": "u"}, "caption": "@LlmTestBot read this"},
    ],
    ids=["photo", "sticker", "voice", "document"],
)
def test_messages_without_text_give_no_event_and_count_as_media(extra: dict[str, Any]) -> None:
    for chat in (PRIVATE, GROUP):
        msg = message(None, chat=chat, **extra)
        assert to_event(msg, "LlmTestBot", BOT_ID) is None
        assert is_unreadable_media(msg)


def test_service_messages_are_not_media() -> None:
    joined = message(None, chat=GROUP, new_chat_members=[BOB])
    assert to_event(joined, "LlmTestBot", BOT_ID) is None
    assert not is_unreadable_media(joined)
    assert not is_unreadable_media(message("plain text"))


def test_channel_posts_give_no_event() -> None:
    channel = {"id": -1_000_000_000_777, "type": "channel", "title": "News"}
    post = Message.de_json(
        {"message_id": 1, "date": DATE, "chat": channel, "sender_chat": channel, "text": "@LlmTestBot news"}, None
    )
    assert to_event(post, "LlmTestBot", BOT_ID) is None


def test_a_user_without_a_last_name_is_shown_by_first_name() -> None:
    event = to_event(
        message("hi", sender=BOB, chat={"id": 1002, "type": "private", "first_name": "Bob"}), "LlmTestBot", BOT_ID
    )
    assert event is not None and event.display_name == "Bob"
