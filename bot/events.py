"""The common event types every adapter converts to, and the keys of conversations."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

Platform = Literal["console", "telegram", "discord"]
Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """One conversation per user per chat (a Discord thread is its own chat)."""

    platform: Platform
    chat_id: str
    user_id: str

    def __str__(self) -> str:
        return f"{self.platform}:{self.chat_id}:{self.user_id}"


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """A text message as every platform delivers it to the core.

    ``text`` has the bot's mention already stripped. Adapters build one only for
    messages the platform's rules address to the bot (private chat, mention, reply
    to the bot, or a command); the rest never reach the core.
    """

    platform: Platform
    chat_id: str
    user_id: str
    display_name: str
    message_id: str
    text: str
    is_private: bool
    timestamp: datetime
    thread_id: str | None = None  # a Telegram forum topic: replies go there
    guild_id: str | None = None  # the Discord server (for ALLOWED_IDS / BLOCKED_IDS guild entries)

    @property
    def key(self) -> ConversationKey:
        return ConversationKey(self.platform, self.chat_id, self.user_id)

    @property
    def sender(self) -> str:
        """The sender as written in ``ADMIN_IDS``: ``platform:user_id``."""
        return f"{self.platform}:{self.user_id}"


@dataclass(frozen=True, slots=True)
class ChatTurn:
    """One turn of a conversation as the prompt builder sees it."""

    role: Role
    content: str
