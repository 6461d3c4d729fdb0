"""`bot.ports.Repository` on SQLAlchemy: one session, one transaction per method."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Unpack, cast

from sqlalchemy import ColumnElement, ScalarSelect, Select, bindparam, delete, distinct, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.errors import StorageError
from bot.events import ConversationKey, Platform, Role
from bot.ports import RepoStats, SettingValue, StoredMessage
from storage.models import Conversation, Message, utcnow

# The dialects whose INSERT has ON CONFLICT (the race-safe way to create a conversation).
_UPSERT_INSERTS: dict[str, Callable[[Any], sqlite.Insert | postgresql.Insert]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}


def _is_key(key: ConversationKey) -> ColumnElement[bool]:
    return (
        (Conversation.platform == key.platform)
        & (Conversation.chat_id == key.chat_id)
        & (Conversation.user_id == key.user_id)
    )


def _conversation_id(key: ConversationKey) -> ScalarSelect[int]:
    """The conversation's id as a scalar subquery (NULL when it does not exist)."""
    return select(Conversation.id).where(_is_key(key)).scalar_subquery()


# In the order of `StoredMessage`'s fields.
_MESSAGE_COLUMNS = (
    Message.id,
    Message.role,
    Message.content,
    Message.token_count,
    Message.created_at,
    Message.platform_message_id,
)
_ID_CACHE_SIZE = 100_000
# The two statements of every chat turn, built once: SQLAlchemy then reuses their
# compiled form without re-deriving cache keys.
_INSERT_MESSAGE = insert(Message).returning(Message.id)


def _newest_messages(conversation_id: Any) -> Select[Unpack[tuple[Any, ...]]]:
    """The newest `:limit` messages of a conversation, newest first."""
    return (
        select(*_MESSAGE_COLUMNS)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.id.desc())
        .limit(bindparam("limit"))
    )


_RECENT_BY_ID = _newest_messages(bindparam("conversation_id"))
_RECENT_BY_KEY = _newest_messages(
    select(Conversation.id)
    .where(
        Conversation.platform == bindparam("platform"),
        Conversation.chat_id == bindparam("chat_id"),
        Conversation.user_id == bindparam("user_id"),
    )
    .scalar_subquery()
)


class SqlRepository:
    """Conversation history and per-session settings in a SQL database.

    Every method runs in its own session and transaction, and raises
    `bot.errors.StorageError` when the database fails.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._conversation_ids: dict[ConversationKey, int] = {}

    @classmethod
    def from_engine(cls, engine: AsyncEngine) -> SqlRepository:
        return cls(async_sessionmaker(engine, expire_on_commit=False))

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self._sessions.begin() as session:
                yield session
        except (SQLAlchemyError, OSError) as exc:
            inner = exc.orig if isinstance(exc, DBAPIError) else exc
            raise StorageError(f"database error: {type(inner).__name__}: {inner}") from exc
        except UnicodeEncodeError as exc:  # a lone surrogate has no UTF-8 form
            raise StorageError(f"text cannot be stored: {exc.reason}") from exc

    @staticmethod
    async def _upsert_conversation(
        session: AsyncSession, key: ConversationKey
    ) -> tuple[int, dict[str, SettingValue]]:
        """Create the conversation if missing (race-safe), touch `updated_at`, and return
        its id and settings. Being a write, it also locks the row (PostgreSQL) or the
        database (SQLite) until commit, so a read-modify-write after it cannot race."""
        dialect = session.get_bind().dialect.name
        if dialect not in _UPSERT_INSERTS:
            raise StorageError(f"unsupported database dialect {dialect!r}")
        now = utcnow()
        stmt = _UPSERT_INSERTS[dialect](Conversation).values(
            platform=key.platform,
            chat_id=key.chat_id,
            user_id=key.user_id,
            settings={},
            created_at=now,
            updated_at=now,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[Conversation.platform, Conversation.chat_id, Conversation.user_id],
            set_={"updated_at": stmt.excluded.updated_at},
        )
        row = (await session.execute(stmt.returning(Conversation.id, Conversation.settings))).one()
        return row.id, dict(row.settings)

    async def add_message(
        self,
        key: ConversationKey,
        role: Role,
        content: str,
        token_count: int,
        platform_message_id: str | None = None,
    ) -> StoredMessage:
        """Append a message, creating the conversation on first use."""
        async with self._transaction() as session:
            message, conversation_id = await self._insert(
                session, key, role, content, token_count, platform_message_id
            )
        self._remember(key, conversation_id)  # only once committed
        return message

    async def add_and_recent(
        self,
        key: ConversationKey,
        role: Role,
        content: str,
        token_count: int,
        platform_message_id: str | None,
        limit: int,
    ) -> list[StoredMessage]:
        """Append a message and read the newest `limit` messages (it included), oldest
        first, in one unit of work: a chat turn's first step."""
        async with self._transaction() as session:
            _, conversation_id = await self._insert(
                session, key, role, content, token_count, platform_message_id
            )
            newest_first = (
                await session.execute(_RECENT_BY_ID, {"conversation_id": conversation_id, "limit": limit})
            ).all() if limit > 0 else []
        self._remember(key, conversation_id)  # only once committed
        return [StoredMessage(*row) for row in reversed(newest_first)]

    async def _insert(
        self,
        session: AsyncSession,
        key: ConversationKey,
        role: Role,
        content: str,
        token_count: int,
        platform_message_id: str | None,
    ) -> tuple[StoredMessage, int]:
        conversation_id = self._conversation_ids.get(key)
        if conversation_id is None:
            conversation_id, _ = await self._upsert_conversation(session, key)
        created_at = utcnow()
        row = (
            await session.execute(
                _INSERT_MESSAGE,
                {
                    "conversation_id": conversation_id,
                    "role": role,
                    "content": content,
                    "token_count": token_count,
                    "platform_message_id": platform_message_id,
                    "created_at": created_at,
                },
            )
        ).one()
        return StoredMessage(row.id, role, content, token_count, created_at, platform_message_id), conversation_id

    async def recent_messages(self, key: ConversationKey, limit: int) -> list[StoredMessage]:
        """The newest `limit` messages, oldest first: one walk backwards along the
        (conversation_id, id) index, so the cost does not grow with history size."""
        if limit <= 0:
            return []
        conversation = self._conversation_ids.get(key)
        params: dict[str, Any]
        if conversation is not None:
            stmt, params = _RECENT_BY_ID, {"conversation_id": conversation, "limit": limit}
        else:
            stmt = _RECENT_BY_KEY
            params = {"platform": key.platform, "chat_id": key.chat_id, "user_id": key.user_id, "limit": limit}
        async with self._transaction() as session:
            newest_first = (await session.execute(stmt, params)).all()
        return [StoredMessage(*row) for row in reversed(newest_first)]

    def _remember(self, key: ConversationKey, conversation_id: int) -> None:
        # Conversations are never deleted (a reset deletes messages), so ids stay valid.
        self._conversation_ids[key] = conversation_id
        if len(self._conversation_ids) > _ID_CACHE_SIZE:
            self._conversation_ids.pop(next(iter(self._conversation_ids)))

    async def clear_conversation(self, key: ConversationKey) -> int:
        """Delete one conversation's messages (its settings stay). Returns how many."""
        return await self._delete_messages(Message.conversation_id == _conversation_id(key))

    async def clear_chat(self, platform: Platform, chat_id: str) -> int:
        """Delete the messages of every conversation in a chat. Returns how many."""
        in_chat = select(Conversation.id).where(
            Conversation.platform == platform, Conversation.chat_id == chat_id
        )
        return await self._delete_messages(Message.conversation_id.in_(in_chat))

    async def _delete_messages(self, where: ColumnElement[bool]) -> int:
        stmt = delete(Message).where(where).execution_options(synchronize_session=False)
        async with self._transaction() as session:
            result = cast(CursorResult[Any], await session.execute(stmt))
            return result.rowcount

    async def get_settings(self, key: ConversationKey) -> dict[str, SettingValue]:
        """The session's stored overrides (empty when none)."""
        async with self._transaction() as session:
            settings = await session.scalar(select(Conversation.settings).where(_is_key(key)))
            return dict(settings or {})

    async def set_setting(self, key: ConversationKey, name: str, value: SettingValue) -> None:
        """Store one override, creating the conversation if needed."""
        async with self._transaction() as session:
            conversation_id, settings = await self._upsert_conversation(session, key)
            settings[name] = value
            await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id)
                .values(settings=settings)
            )

    async def clear_settings(self, key: ConversationKey) -> None:
        """Drop every override of the session (its messages stay)."""
        async with self._transaction() as session:
            await session.execute(update(Conversation).where(_is_key(key)).values(settings={}))

    async def stats(self) -> RepoStats:
        """`users`: distinct platform users who ever reached the bot (any conversation
        row); `conversations`: conversations that currently hold messages; `messages`:
        all stored messages."""
        users = select(Conversation.platform, Conversation.user_id).distinct().subquery()
        stmt = select(
            select(func.count()).select_from(users).scalar_subquery(),
            select(func.count(distinct(Message.conversation_id))).scalar_subquery(),
            select(func.count(Message.id)).scalar_subquery(),
        )
        async with self._transaction() as session:
            row = (await session.execute(stmt)).one()
            return RepoStats(users=row[0], conversations=row[1], messages=row[2])
