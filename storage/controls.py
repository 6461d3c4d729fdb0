"""The operator's controls in the database: daily usage (quotas), blocks, chat-wide
settings, and a whole conversation for `/export`.

`ControlsMixin` holds the `bot.ports.Repository` methods for them; `SqlRepository`
inherits it and provides the one thing they need, `_transaction()` (one session and
transaction per unit of work, database errors raised as `StorageError`). None of them is
on the hot path of a chat turn: the quota check reads usage through a cache
(`bot.chat.policy`), blocks are read once, chat settings are cached by the session store.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from datetime import date
from typing import Any, Protocol, cast

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncSession

from bot.errors import StorageError
from bot.events import ConversationKey, Platform
from bot.ports import SettingValue, StoredMessage, Usage
from storage.models import Block, ChatSettings, DailyUsage, Message, utcnow
from storage.queries import MESSAGE_COLUMNS, UPSERT_INSERTS, conversation_id_of


class _Transactional(Protocol):
    def _transaction(self) -> AbstractAsyncContextManager[AsyncSession]: ...


def _insert(session: AsyncSession, table: Any) -> sqlite.Insert | postgresql.Insert:
    dialect = session.get_bind().dialect.name
    if dialect not in UPSERT_INSERTS:
        raise StorageError(f"unsupported database dialect {dialect!r}")
    return UPSERT_INSERTS[dialect](table)


class ControlsMixin:
    """The operator-control methods of `bot.ports.Repository` (see there for the contract)."""

    # ------------------------------------------------------------------ daily usage

    async def usage(self: _Transactional, platform: Platform, user_id: str, day: date) -> Usage:
        """One user's use on one UTC day (zeros when none is recorded)."""
        stmt = select(DailyUsage.prompt_tokens, DailyUsage.generated_tokens, DailyUsage.messages).where(
            DailyUsage.platform == platform, DailyUsage.user_id == user_id, DailyUsage.day == day
        )
        async with self._transaction() as session:
            row = (await session.execute(stmt)).one_or_none()
        if row is None:
            return Usage(day, 0, 0, 0)
        return Usage(day, row.prompt_tokens, row.generated_tokens, row.messages)

    async def reset_usage(self: _Transactional, platform: Platform, user_id: str, day: date) -> None:
        """Forget one user's use on one UTC day (`/usage reset`)."""
        stmt = delete(DailyUsage).where(
            DailyUsage.platform == platform, DailyUsage.user_id == user_id, DailyUsage.day == day
        )
        async with self._transaction() as session:
            await session.execute(stmt)

    # ------------------------------------------------------------------ blocks

    async def add_block(self: _Transactional, entry: str, created_by: str) -> bool:
        """Block `entry`; False if it already was."""
        async with self._transaction() as session:
            stmt = (
                _insert(session, Block)
                .values(entry=entry, created_by=created_by, created_at=utcnow())
                .on_conflict_do_nothing(index_elements=[Block.entry])
            )
            result = cast(CursorResult[Any], await session.execute(stmt))
            return result.rowcount == 1

    async def remove_block(self: _Transactional, entry: str) -> bool:
        """Unblock `entry`; False if it was not blocked."""
        async with self._transaction() as session:
            result = cast(CursorResult[Any], await session.execute(delete(Block).where(Block.entry == entry)))
            return result.rowcount > 0

    async def blocks(self: _Transactional) -> frozenset[str]:
        """Every entry blocked with `add_block`."""
        async with self._transaction() as session:
            return frozenset((await session.scalars(select(Block.entry))).all())

    # ------------------------------------------------------------------ chat-wide settings

    async def get_chat_settings(self: _Transactional, platform: Platform, chat_id: str) -> dict[str, SettingValue]:
        """The chat's stored settings (empty when none)."""
        stmt = select(ChatSettings.settings).where(ChatSettings.platform == platform, ChatSettings.chat_id == chat_id)
        async with self._transaction() as session:
            settings = await session.scalar(stmt)
        return dict(settings or {})

    async def set_chat_setting(
        self: _Transactional, platform: Platform, chat_id: str, name: str, value: SettingValue
    ) -> None:
        """Store one chat-wide setting, creating the chat's row if needed."""
        where = (ChatSettings.platform == platform) & (ChatSettings.chat_id == chat_id)
        async with self._transaction() as session:
            now = utcnow()
            create = (
                _insert(session, ChatSettings)
                .values(platform=platform, chat_id=chat_id, settings={}, updated_at=now)
                .on_conflict_do_nothing(index_elements=[ChatSettings.platform, ChatSettings.chat_id])
            )
            await session.execute(create)
            # The row is locked until commit (PostgreSQL: FOR UPDATE; SQLite: the write
            # above already holds the database), so a concurrent set cannot be lost.
            current = await session.scalar(select(ChatSettings.settings).where(where).with_for_update())
            settings = dict(current or {})
            settings[name] = value
            await session.execute(update(ChatSettings).where(where).values(settings=settings, updated_at=now))

    async def clear_chat_settings(self: _Transactional, platform: Platform, chat_id: str) -> None:
        """Drop every chat-wide setting of the chat."""
        async with self._transaction() as session:
            await session.execute(
                delete(ChatSettings).where(ChatSettings.platform == platform, ChatSettings.chat_id == chat_id)
            )

    # ------------------------------------------------------------------ export

    async def conversation_messages(self: _Transactional, key: ConversationKey) -> list[StoredMessage]:
        """Every stored message of the conversation, oldest first, "hidden" ones included
        (the caller decides what to show)."""
        stmt = select(*MESSAGE_COLUMNS).where(Message.conversation_id == conversation_id_of(key)).order_by(Message.id)
        async with self._transaction() as session:
            rows = (await session.execute(stmt)).all()
        return [StoredMessage(*row) for row in rows]
