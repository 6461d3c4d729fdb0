"""Declarative models: one row per conversation (user x chat), one per message, one per
accepted turn; and the operator's controls: daily usage, blocks, chat-wide settings."""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import JSON, Boolean, Date, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from bot.events import Platform, Role
from bot.ports import MessageStatus, SettingValue, TurnKind, TurnState


def utcnow() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """Stores UTC and always gives back an aware datetime (SQLite keeps no zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime; pass an aware one")
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """The declarative base: `Base.metadata` holds every table (`init_db` creates them)."""


class Conversation(Base):
    """One user's conversation in one chat, with that session's setting overrides."""

    __tablename__ = "conversations"
    # The unique index's (platform, chat_id) prefix also serves chat-wide resets,
    # so a separate (platform, chat_id) index would only slow writes down.
    __table_args__ = (UniqueConstraint("platform", "chat_id", "user_id", name="uq_conversations_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    platform: Mapped[Platform] = mapped_column(String(16))
    chat_id: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(64))
    settings: Mapped[dict[str, SettingValue]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class Message(Base):
    """One message, stored verbatim."""

    __tablename__ = "messages"
    # (conversation_id, id) answers "newest N of a conversation" by walking the index
    # backwards; AUTOINCREMENT keeps ids from being reused after a clear.
    __table_args__ = (
        Index("ix_messages_conversation_id_id", "conversation_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    role: Mapped[Role] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int]
    platform_message_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    # None: an ordinary message; "cut_off": a reply stored as the user saw it when it
    # broke off; "hidden": kept, but prompts skip it (a missed turn, an undelivered reply).
    status: Mapped[MessageStatus | None] = mapped_column(String(16), default=None)


# The states in which a turn still needs work after a restart.
OPEN_TURN_STATES = ("pending", "undelivered")


class Turn(Base):
    """One accepted incoming message (a chat message or a command), keyed by the platform's
    own message id, so that a redelivered update is recognised. It records how far the
    answer got, and what is needed to answer it after a restart."""

    __tablename__ = "turns"
    __table_args__ = (
        UniqueConstraint("platform", "chat_id", "platform_message_id", name="uq_turns_platform_message"),
        # Start-up recovery reads the open turns only: a small partial index.
        Index(
            "ix_turns_open",
            "platform",
            "id",
            sqlite_where=text("state IN ('pending', 'undelivered')"),
            postgresql_where=text("state IN ('pending', 'undelivered')"),
        ),
        # Deleting messages (a /reset) sets these to NULL: without an index, every delete
        # would scan the whole table.
        Index("ix_turns_message_id", "message_id"),
        Index("ix_turns_reply_id", "reply_id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    platform: Mapped[Platform] = mapped_column(String(16))
    chat_id: Mapped[str] = mapped_column(String(64))
    platform_message_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[TurnKind] = mapped_column(String(16))
    state: Mapped[TurnState] = mapped_column(String(16))
    display_name: Mapped[str] = mapped_column(String(256))
    is_private: Mapped[bool] = mapped_column(Boolean)
    thread_id: Mapped[str | None] = mapped_column(String(64))
    # The user's stored message and the stored reply (NULL once a /reset deleted them).
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    reply_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    # Platform ids of the reply's messages already shown, so a restart edits them.
    reply_message_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    accepted_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)


class DailyUsage(Base):
    """Tokens one user used on one UTC day, over every chat (for `DAILY_TOKEN_QUOTA`)."""

    __tablename__ = "daily_usage"

    platform: Mapped[Platform] = mapped_column(String(16), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    generated_tokens: Mapped[int] = mapped_column(Integer, default=0)
    messages: Mapped[int] = mapped_column(Integer, default=0)


class Block(Base):
    """A user or a chat the bot ignores (`/block`), besides `BLOCKED_IDS`."""

    __tablename__ = "blocks"

    # As written in BLOCKED_IDS: "telegram:123", "telegram:chat:-100...", "discord:guild:..."
    entry: Mapped[str] = mapped_column(String(160), primary_key=True)
    created_by: Mapped[str] = mapped_column(String(160))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class ChatSettings(Base):
    """Settings a chat's admins set for everybody in it (`/config chat set`), under each
    user's own."""

    __tablename__ = "chat_settings"

    platform: Mapped[Platform] = mapped_column(String(16), primary_key=True)
    chat_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    settings: Mapped[dict[str, SettingValue]] = mapped_column(JSON, default=dict)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)
