"""`bot.ports.Repository` on SQLAlchemy: one session, one transaction per unit of work.

The hot path is group-committed (`storage.group_commit`): appends, and a turn's steps
(accepted, its history read, its reply started, finished), that arrive while a write is
in progress are written together in the next unit of work, with one multi-row statement
per kind and one SELECT for all their histories. Shared and hot-path statements are
built in `storage.queries`. Every method returns `bot.ports` dataclasses, never ORM rows.

`SqlRepository` holds the shared state (sessions, locks, caches) and the history and
settings methods; it inherits the durable-turn methods (`storage.turns`), the writer of
the group commit's batches (`storage.batch`), and the operator controls
(`storage.controls`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ColumnElement, delete, distinct, func, select, text, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.errors import StorageError
from bot.events import ConversationKey, Platform, Role
from bot.ports import RepoStats, SettingValue, StoredMessage
from storage.batch import BatchWriterMixin
from storage.controls import ControlsMixin
from storage.group_commit import Append, Appended, GroupCommit
from storage.locks import AdvisoryLocks
from storage.models import ChatSettings, Conversation, Message
from storage.queries import (
    MAX_APPEND_BATCH,
    NOT_HIDDEN,
    RECENT_BY_ID,
    RECENT_BY_KEY,
    conversation_id_of,
    matches_key,
    upsert_conversation,
)
from storage.turns import Step, TurnsMixin

# Conversation ids remembered at most (the oldest remembered is forgotten first).
_ID_CACHE_SIZE = 100_000


class SqlRepository(TurnsMixin, BatchWriterMixin, ControlsMixin):
    """Conversation history and per-session settings in a SQL database.

    Every method runs in its own session and transaction, except that appends arriving
    together share one (group commit); each still fails alone. Failures raise
    `bot.errors.StorageError`. `close()` waits for appends in progress.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        locks: AdvisoryLocks | None = None,
        sqlite_file: Path | None = None,
    ) -> None:
        self._sessions = sessions
        self._locks = locks
        self._sqlite_file = sqlite_file
        # The stored settings of conversations whose turn holds its lock, as read with it.
        self._turn_settings: dict[ConversationKey, dict[str, SettingValue]] = {}
        self._conversation_ids: dict[ConversationKey, int] = {}
        # Histories read with their turn's acceptance (turn id -> conversation id, its
        # version then, the messages), and a counter of changes per conversation.
        self._prefetched: dict[int, tuple[int, int, list[StoredMessage]]] = {}
        self._versions: dict[int, int] = {}
        self._group_commit: GroupCommit[Step, object] = GroupCommit(self._commit_batch, max_batch=MAX_APPEND_BATCH)

    @classmethod
    def from_engine(cls, engine: AsyncEngine) -> SqlRepository:
        """A repository on the database that SQLAlchemy's `engine` connects to. On
        PostgreSQL, which several processes may share, turns take advisory locks."""
        locks = AdvisoryLocks(engine) if engine.dialect.name == "postgresql" else None
        database = engine.url.database or ""
        sqlite_file = (
            Path(database)
            if engine.dialect.name == "sqlite" and database not in ("", ":memory:") and not database.startswith("file:")
            else None
        )
        return cls(async_sessionmaker(engine, expire_on_commit=False), locks=locks, sqlite_file=sqlite_file)

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
        return cast(Appended, appended).message

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
        return cast(Appended, appended).newest

    async def close(self) -> None:
        """Wait until every append made so far is written; close the lock connections."""
        await self._group_commit.close()
        if self._locks is not None:
            await self._locks.close()

    async def ping(self) -> None:
        """Check the database answers and, for SQLite, that its file is still there.
        Raises `StorageError` when it does not."""
        if self._sqlite_file is not None and not self._sqlite_file.exists():
            raise StorageError(f"the database file {self._sqlite_file} is gone")
        async with self._transaction() as session:
            await session.execute(text("SELECT 1"))

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
        # The chat-wide settings (e.g. the bot switched off there) go along, unless the
        # new chat has its own already.
        chat_settings = (
            update(ChatSettings)
            .where(
                ChatSettings.platform == platform,
                ChatSettings.chat_id == old_chat_id,
                ~select(ChatSettings.chat_id)
                .where(ChatSettings.platform == platform, ChatSettings.chat_id == new_chat_id)
                .exists(),
            )
            .values(chat_id=new_chat_id)
            .execution_options(synchronize_session=False)
        )
        self._prefetched.clear()
        async with self._transaction() as session:
            result = cast(CursorResult[Any], await session.execute(stmt))
            await session.execute(chat_settings)
            # Cached ids of the old keys stay right: a conversation keeps its id, so a
            # reply still being stored under the old key lands in the moved history.
            return result.rowcount

    async def _delete_messages(self, where: ColumnElement[bool]) -> int:
        self._prefetched.clear()  # a reset: histories read before are stale
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
        the stored messages, not counting hidden ones (replies' empty slots too)."""
        users = select(Conversation.platform, Conversation.user_id).distinct().subquery()
        stmt = select(
            select(func.count()).select_from(users).scalar_subquery(),
            select(func.count(distinct(Message.conversation_id))).where(NOT_HIDDEN).scalar_subquery(),
            select(func.count(Message.id)).where(NOT_HIDDEN).scalar_subquery(),
        )
        async with self._transaction() as session:
            row = (await session.execute(stmt)).one()
            return RepoStats(users=row[0], conversations=row[1], messages=row[2])
