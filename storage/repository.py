"""`bot.ports.Repository` on SQLAlchemy: one session, one transaction per unit of work.

Appends are group-committed (`storage.group_commit`): those that arrive while a write is
in progress are written together in the next unit of work, with one multi-row INSERT and
one SELECT for all their histories. Shared and hot-path statements are built in
`storage.queries`. Every method returns `bot.ports` dataclasses, never ORM rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

from sqlalchemy import ColumnElement, delete, distinct, func, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.errors import StorageError
from bot.events import ConversationKey, Platform, Role
from bot.ports import RepoStats, SettingValue, StoredMessage
from storage.group_commit import Append, Appended, GroupCommit
from storage.locks import AdvisoryLocks
from storage.models import Conversation, Message
from storage.queries import (
    INSERT_MESSAGES,
    MAX_APPEND_BATCH,
    RECENT_BY_ID,
    RECENT_BY_KEY,
    conversation_id_of,
    matches_key,
    newest_of_many,
    upsert_conversation,
)

# Conversation ids remembered at most (the oldest remembered is forgotten first).
_ID_CACHE_SIZE = 100_000


class SqlRepository:
    """Conversation history and per-session settings in a SQL database.

    Every method runs in its own session and transaction, except that appends arriving
    together share one (group commit); each still fails alone. Failures raise
    `bot.errors.StorageError`. `close()` waits for appends in progress.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, locks: AdvisoryLocks | None = None) -> None:
        self._sessions = sessions
        self._locks = locks
        # The stored settings of conversations whose turn holds its lock, as read with it.
        self._turn_settings: dict[ConversationKey, dict[str, SettingValue]] = {}
        self._conversation_ids: dict[ConversationKey, int] = {}
        self._group_commit = GroupCommit(self._commit_appends, max_batch=MAX_APPEND_BATCH)

    @classmethod
    def from_engine(cls, engine: AsyncEngine) -> SqlRepository:
        """A repository on the database that SQLAlchemy's `engine` connects to. On
        PostgreSQL, which several processes may share, turns take advisory locks."""
        locks = AdvisoryLocks(engine) if engine.dialect.name == "postgresql" else None
        return cls(async_sessionmaker(engine, expire_on_commit=False), locks=locks)

    @property
    def shared(self) -> bool:
        """Whether other processes may use the same database (PostgreSQL): then nothing
        read may be cached from one turn to the next. SQLite serves one process."""
        return self._locks is not None

    @asynccontextmanager
    async def conversation_turn(self, key: ConversationKey) -> AsyncIterator[None]:
        """Held for one chat turn of `key`: on PostgreSQL an advisory lock, so that no
        other process runs a turn of the same conversation meanwhile; on SQLite (one
        process, whose manager already orders each conversation's turns) nothing."""
        if self._locks is None:
            yield
            return
        async with self._locks.hold(key) as settings:
            # Read with the lock, in the same round trip: the turn's `get_settings`.
            self._turn_settings[key] = settings
            try:
                yield
            finally:
                self._turn_settings.pop(key, None)

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
    async def _upsert_conversation(session: AsyncSession, key: ConversationKey) -> tuple[int, dict[str, SettingValue]]:
        """Create the conversation if missing (race-safe), touch `updated_at`, and return
        its id and settings. Being a write, it also locks the row (PostgreSQL) or the
        database (SQLite) until commit, so a read-modify-write after it cannot race."""
        stmt = upsert_conversation(session.get_bind().dialect.name, key)
        row = (await session.execute(stmt)).one()
        return row.id, dict(row.settings)

    async def add_message(
        self, key: ConversationKey, role: Role, content: str, token_count: int, platform_message_id: str | None = None
    ) -> StoredMessage:
        """Append a message, creating the conversation on first use."""
        appended = await self._group_commit.write(Append(key, role, content, token_count, platform_message_id, limit=0))
        return appended.message

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
        appended = await self._group_commit.write(Append(key, role, content, token_count, platform_message_id, limit))
        return appended.newest

    async def close(self) -> None:
        """Wait until every append made so far is written; close the lock connections."""
        await self._group_commit.close()
        if self._locks is not None:
            await self._locks.close()

    async def _commit_appends(self, batch: Sequence[Append]) -> list[Appended]:
        """Store the batch (conversations at most once each) and read back the newest
        messages each asked for, in one transaction."""
        async with self._transaction() as session:
            conversation_ids: list[int] = []
            for append in batch:
                conversation_id = self._conversation_ids.get(append.key)
                if conversation_id is None:
                    conversation_id, _ = await self._upsert_conversation(session, append.key)
                conversation_ids.append(conversation_id)
            # On the Core connection: the hot path needs no ORM bulk-insert bookkeeping.
            connection = await session.connection()
            rows = (
                await connection.execute(
                    INSERT_MESSAGES, [a.row(c) for a, c in zip(batch, conversation_ids, strict=True)]
                )
            ).all()
            new_ids = {row.conversation_id: row.id for row in rows}
            readers = [i for i, append in enumerate(batch) if append.limit > 0]
            newest: dict[int, list[StoredMessage]] = {i: [] for i in readers}
            if readers:
                params: dict[str, Any] = {}
                for part, i in enumerate(readers):
                    params[f"conversation_{part}"] = conversation_ids[i]
                    params[f"limit_{part}"] = batch[i].limit
                for row in await connection.execute(newest_of_many(len(readers)), params):
                    newest[readers[row[0]]].append(StoredMessage(*row[1:]))
        for append, conversation_id in zip(batch, conversation_ids, strict=True):
            self._remember(append.key, conversation_id)  # only once committed
        return [
            Appended(
                StoredMessage(
                    new_ids[conversation_id], a.role, a.content, a.token_count, a.created_at, a.platform_message_id
                ),
                sorted(newest.get(i, []), key=_by_id),
            )
            for i, (a, conversation_id) in enumerate(zip(batch, conversation_ids, strict=True))
        ]

    async def recent_messages(self, key: ConversationKey, limit: int) -> list[StoredMessage]:
        """The newest `limit` messages, oldest first: one walk backwards along the
        (conversation_id, id) index, so the cost does not grow with history size."""
        if limit <= 0:
            return []
        conversation_id = self._conversation_ids.get(key)
        params: dict[str, Any]
        if conversation_id is not None:
            stmt, params = RECENT_BY_ID, {"conversation_id": conversation_id, "limit": limit}
        else:
            stmt = RECENT_BY_KEY
            params = {"platform": key.platform, "chat_id": key.chat_id, "user_id": key.user_id, "limit": limit}
        async with self._transaction() as session:
            newest_first = (await (await session.connection()).execute(stmt, params)).all()
        return [StoredMessage(*row) for row in reversed(newest_first)]

    def _remember(self, key: ConversationKey, conversation_id: int) -> None:
        # Conversations are never deleted (a reset deletes messages), so ids stay valid.
        self._conversation_ids[key] = conversation_id
        if len(self._conversation_ids) > _ID_CACHE_SIZE:
            self._conversation_ids.pop(next(iter(self._conversation_ids)))

    async def clear_conversation(self, key: ConversationKey) -> int:
        """Delete one conversation's messages (its settings stay). Returns how many."""
        return await self._delete_messages(Message.conversation_id == conversation_id_of(key))

    async def clear_chat(self, platform: Platform, chat_id: str) -> int:
        """Delete the messages of every conversation in a chat. Returns how many."""
        in_chat = select(Conversation.id).where(Conversation.platform == platform, Conversation.chat_id == chat_id)
        return await self._delete_messages(Message.conversation_id.in_(in_chat))

    async def move_chat(self, platform: Platform, old_chat_id: str, new_chat_id: str) -> int:
        """Give a chat's conversations (history and settings) a new chat id, except those
        of users who already have one under the new id. Returns how many moved."""
        already_there = select(Conversation.user_id).where(
            Conversation.platform == platform, Conversation.chat_id == new_chat_id
        )
        stmt = (
            update(Conversation)
            .where(
                Conversation.platform == platform,
                Conversation.chat_id == old_chat_id,
                Conversation.user_id.not_in(already_there),
            )
            .values(chat_id=new_chat_id)
            .execution_options(synchronize_session=False)
        )
        async with self._transaction() as session:
            result = cast(CursorResult[Any], await session.execute(stmt))
            # Cached ids of the old keys stay right: a conversation keeps its id, so a
            # reply still being stored under the old key lands in the moved history.
            return result.rowcount

    async def _delete_messages(self, where: ColumnElement[bool]) -> int:
        stmt = delete(Message).where(where).execution_options(synchronize_session=False)
        async with self._transaction() as session:
            result = cast(CursorResult[Any], await session.execute(stmt))
            return result.rowcount

    async def get_settings(self, key: ConversationKey) -> dict[str, SettingValue]:
        """The session's stored overrides (empty when none)."""
        held = self._turn_settings.get(key)
        if held is not None:  # read as its turn began
            return dict(held)
        async with self._transaction() as session:
            settings = await session.scalar(select(Conversation.settings).where(matches_key(key)))
            return dict(settings or {})

    async def set_setting(self, key: ConversationKey, name: str, value: SettingValue) -> None:
        """Store one override, creating the conversation if needed."""
        self._turn_settings.pop(key, None)
        async with self._transaction() as session:
            conversation_id, settings = await self._upsert_conversation(session, key)
            settings[name] = value
            await session.execute(
                update(Conversation).where(Conversation.id == conversation_id).values(settings=settings)
            )

    async def clear_settings(self, key: ConversationKey) -> None:
        """Drop every override of the session (its messages stay)."""
        self._turn_settings.pop(key, None)
        async with self._transaction() as session:
            await session.execute(update(Conversation).where(matches_key(key)).values(settings={}))

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


def _by_id(message: StoredMessage) -> int:
    return message.id
