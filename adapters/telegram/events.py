"""Telegram messages to the common event: the pure edge of the adapter.

Telegram counts entity offsets and lengths in UTF-16 code units, so mentions and
``@botname`` suffixes are cut out of the text in those units.
"""

from __future__ import annotations

from collections.abc import Sequence

from telegram import Message, MessageEntity
from telegram.constants import ChatType

from bot.events import IncomingMessage


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _join_around_gap(left: str, right: str) -> str:
    """Glue the text on both sides of a removed mention without leaving a double space."""
    if not left.strip():  # the mention opened the message: "@bot, hi" -> "hi"
        return left + right.lstrip(" \t,:;")
    if left[-1] in " \t" and right[:1] in (" ", "\t"):
        return left + right.lstrip(" \t")
    if left[-1] in " \t" and right[:1] in (",", ".", "!", "?", ";", ":"):
        return left.rstrip(" \t") + right
    return left + right


def _remove_spans(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """Remove `(offset, length)` spans given in UTF-16 code units, as Telegram counts."""
    data = text.encode("utf-16-le")
    out = ""
    position = 0
    for offset, length in sorted(spans):
        out = _join_around_gap(out, data[position * 2 : offset * 2].decode("utf-16-le"))
        position = max(position, offset + length)
    return _join_around_gap(out, data[position * 2 :].decode("utf-16-le"))


def to_event(message: Message, bot_username: str, bot_id: int) -> IncomingMessage | None:
    """The common event for a Telegram message, or None when the bot should not answer.

    Private chats: every text message. Groups: only a mention of the bot (stripped from
    the text), a reply to one of the bot's messages, or a command at the start of the
    message (``/cmd@thisbot`` becomes ``/cmd``; ``/cmd@otherbot`` is not for us).
    Messages without text (photos, stickers, ...) give None. In a forum, each topic is
    its own chat (``"<chat id>/<topic id>"``), so its conversations are separate, and
    ``thread_id`` names the topic the reply goes to.
    """
    text = message.text
    user = message.from_user
    if text is None or user is None or message.chat.type == ChatType.CHANNEL:
        return None
    username = bot_username.lstrip("@").lower()
    is_private = message.chat.type == ChatType.PRIVATE
    mentioned = is_command = False
    mention_spans: list[tuple[int, int]] = []
    suffix_spans: list[tuple[int, int]] = []
    for entity in message.entities:
        if entity.type == MessageEntity.MENTION:
            if message.parse_entity(entity)[1:].lower() == username:
                mentioned = True
                mention_spans.append((entity.offset, entity.length))
        elif entity.type == MessageEntity.TEXT_MENTION:
            if entity.user is not None and entity.user.id == bot_id:
                mentioned = True
                mention_spans.append((entity.offset, entity.length))
        elif entity.type == MessageEntity.BOT_COMMAND and entity.offset == 0:
            name, at, addressee = message.parse_entity(entity).partition("@")
            if at and addressee.lower() != username:
                return None  # a command for another bot in the same chat
            is_command = True
            if at:
                suffix_spans.append((_utf16_len(name), _utf16_len(at + addressee)))
    replied = message.reply_to_message
    # In forum topics every message "replies" to the topic's creation message.
    replies_to_bot = (
        replied is not None
        and replied.forum_topic_created is None
        and replied.from_user is not None
        and replied.from_user.id == bot_id
    )
    if not (is_private or mentioned or replies_to_bot or is_command):
        return None
    if mention_spans:
        text = _remove_spans(text, mention_spans + suffix_spans).strip()
    elif suffix_spans:
        text = _remove_spans(text, suffix_spans)
    chat_id = str(message.chat.id)
    thread_id: str | None = None
    if message.is_topic_message and message.message_thread_id is not None:
        thread_id = str(message.message_thread_id)
        chat_id += f"/{thread_id}"  # a forum topic is a chat of its own
    return IncomingMessage(
        platform="telegram",
        chat_id=chat_id,
        user_id=str(user.id),
        display_name=user.full_name or user.username or str(user.id),
        message_id=str(message.message_id),
        text=text,
        is_private=is_private,
        timestamp=message.date,
        thread_id=thread_id,
    )


def is_unreadable_media(message: Message) -> bool:
    """A photo, sticker, voice note, document, ... rather than text or a service message."""
    return message.text is None and (message.effective_attachment is not None or message.caption is not None)
