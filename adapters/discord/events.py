"""Discord messages and slash commands as the core's `IncomingMessage`: which messages
are addressed to the bot, and the bot's mention stripped from their text."""

from __future__ import annotations

import re
from typing import Any

import discord

from bot.events import IncomingMessage

# Joins, pins, boosts and the like are system messages: nobody wrote them to the bot.
_REPLIABLE_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})


def strip_mention(text: str, bot_user_id: int) -> str:
    """Remove every `<@id>` / `<@!id>` of the bot (and the blanks around it)."""
    return re.sub(rf"[ \t]*<@!?{bot_user_id}>[ \t]*", " ", text).strip()


def _is_reply_to_bot(message: discord.Message, bot_user_id: int) -> bool:
    ref = message.reference
    return ref is not None and isinstance(ref.resolved, discord.Message) and ref.resolved.author.id == bot_user_id


def to_event(message: discord.Message, bot_user_id: int) -> IncomingMessage | None:
    """A Discord message as the common event, or None when the bot should not answer.

    DMs are always answered; in servers and threads only a mention of the bot or a
    reply to one of its messages. Bots (the bot itself included), webhooks and system
    messages are ignored. A thread is its own chat."""
    author = message.author
    if author.bot or author.id == bot_user_id or message.webhook_id is not None:
        return None
    if message.type not in _REPLIABLE_TYPES:
        return None
    is_private = message.guild is None
    mentioned = bot_user_id in message.raw_mentions
    if not is_private and not mentioned and not _is_reply_to_bot(message, bot_user_id):
        return None
    text = strip_mention(message.content, bot_user_id) if mentioned else message.content.strip()
    if is_private and not text and not message.attachments:
        return None  # a sticker or an embed: nothing to answer
    return IncomingMessage(
        platform="discord",
        chat_id=str(message.channel.id),
        user_id=str(author.id),
        display_name=author.display_name,
        message_id=str(message.id),
        text=text,
        is_private=is_private,
        timestamp=message.created_at,
        guild_id=str(message.guild.id) if message.guild is not None else None,
    )


def interaction_to_event(interaction: discord.Interaction[Any], text: str) -> IncomingMessage:
    """A slash command as the common event; `text` is the equivalent text command."""
    return IncomingMessage(
        platform="discord",
        chat_id=str(interaction.channel_id),
        user_id=str(interaction.user.id),
        display_name=interaction.user.display_name,
        message_id=str(interaction.id),
        text=text,
        is_private=interaction.guild_id is None,
        timestamp=interaction.created_at,
        guild_id=str(interaction.guild_id) if interaction.guild_id is not None else None,
    )
