"""`bot.ports.Repository` on SQLAlchemy: one session, one transaction per unit of work.

Appending messages is the hot path (two per chat turn), and SQLite takes one writer at
a time, so appends are group-committed: the appends that arrive while a write is in
progress are written together in the next unit of work, with one multi-row INSERT and
one SELECT for all their histories. Under load that turns dozens of round trips
through the database thread into a handful; alone, an append is written at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Unpack, cast

from sqlalchemy import (
    ColumnElement,
    CompoundSelect,
    ScalarSelect,
    Select,
    bindparam,
    delete,
    distinct,
    func,
    insert,
    literal_column,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.errors import StorageError
from bot.events import ConversationKey, Platform, Role
from bot.ports import RepoStats, SettingValue, StoredMessage
from storage.models import Conversation, Message, utcnow

logger = logging.getLogger(__name__)

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
# Appends written in one unit of work at most (SQLite allows 500 terms in a UNION).
MAX_APPEND_BATCH = 64
# Built once: SQLAlchemy then reuses the compiled form without re-deriving cache keys.
# Run with a list of parameter sets it is one multi-row INSERT ... RETURNING.
_INSERT_MESSAGES = insert(Message).returning(Message.id, Message.conversation_id)


def _newest_messages(
    conversation_id: Any, limit: Any = None, *, part: int | None = None
) -> Select[*tuple[Any, ...]]:
    """The newest `limit` (default `:limit`) messages of a conversation, newest first,
    by one walk backwards along the (conversation_id, id) index. With `part`, each row
    starts with that number."""
    columns: tuple[Any, ...] = _MESSAGE_COLUMNS
    if part is not None:
        columns = (literal_column(str(part)).label("part"), *columns)
    return (
        select(*columns)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.id.desc())
        .limit(bindparam("limit") if limit is None else limit)
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


@functools.lru_cache(maxsize=MAX_APPEND_BATCH)
def _newest_of_many(count: int) -> CompoundSelect[*tuple[Any, ...]]:
    """`_newest_messages` of conversations `:conversation_i` (`:limit_i` each) for
    i < count, as one statement; each row starts with its i."""
    return union_all(
        *(
            select(_newest_messages(bindparam(f"conversation_{i}"), bindparam(f"limit_{i}"), part=i).subquery())
            for i in range(count)
        )
    )


@dataclass(eq=False, slots=True)
class _Append:
    """One message waiting to be written, and what its caller wants back."""

    key: ConversationKey
    role: Role
    content: str
    token_count: int
    platform_message_id: str | None
    limit: int  # newest messages to read back once it is stored (0: none)
    done: asyncio.Future[tuple[StoredMessage, list[StoredMessage]]]
    created_at: datetime = field(default_factory=utcnow)

    def params(self, conversation_id: int) -> dict[str, Any]:
        return {
            "conversation_id": conversation_id,
            "role": self.role,
            "content": self.content,
            "token_count": self.token_count,
            "platform_message_id": self.platform_message_id,
            "created_at": self.created_at,
        }


class SqlRepository:
    """Conversation history and per-session settings in a SQL database.

    Every method runs in its own session and transaction, except that appends arriving
    together share one (group commit); each still fails alone. Failures raise
    `bot.errors.StorageError`. `close()` waits for appends in progress.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._conversation_ids: dict[ConversationKey, int] = {}
        self._appends: deque[_Append] = deque()
        self._writer: asyncio.Task[None] | None = None

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
    async def _upsert_conversation(session: AsyncSession, key: ConversationKey) -> tuple[int, dict[str, SettingValue]]:
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
        message, _ = await self._append(key, role, content, token_count, platform_message_id, 0)
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
        _, newest = await self._append(key, role, content, token_count, platform_message_id, limit)
        return newest

    async def close(self) -> None:
        """Wait until every append made so far is written."""
        while self._writer is not None:
            await asyncio.wait({self._writer})

    # ------------------------------------------------------------------ group commit

    async def _append(
        self,
        key: ConversationKey,
        role: Role,
        content: str,
        token_count: int,
        platform_message_id: str | None,
        limit: int,
    ) -> tuple[StoredMessage, list[StoredMessage]]:
        request = _Append(
            key,
            role,
            content,
            token_count,
            platform_message_id,
            max(0, limit),
            asyncio.get_running_loop().create_future(),
        )
        self._appends.append(request)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_appends(), name="storage:appends")
        try:
            return await asyncio.shield(request.done)
        except asyncio.CancelledError:
            if request in self._appends:  # not started: it never happens
                self._appends.remove(request)
            elif not request.done.done():
                # Started: see it through, so what the caller does next (a /reset
                # after a cancelled turn) finds it committed, not still in flight.
                await asyncio.wait({request.done})
            raise

    async def _write_appends(self) -> None:
        """The writer: drains the queue one unit of work at a time, then ends."""
        batch: list[_Append] = []
        try:
            while self._appends:
                batch = self._next_batch()
                await self._write_batch(batch)
        finally:
            self._writer = None
            # Anything left unanswered means this task was cancelled (the loop is closing).
            for request in [*batch, *self._appends]:
                _settle(request, error=StorageError("storage is shutting down"))
            self._appends.clear()

    def _next_batch(self) -> list[_Append]:
        """The oldest appends, at most one per conversation (so each read-back sees its
        own append as the newest message); later ones of a conversation keep their place."""
        batch: list[_Append] = []
        keys: set[ConversationKey] = set()
        skipped: list[_Append] = []
        while self._appends and len(batch) < MAX_APPEND_BATCH:
            request = self._appends.popleft()
            if request.key in keys:
                skipped.append(request)
            else:
                keys.add(request.key)
                batch.append(request)
        self._appends.extendleft(reversed(skipped))
        return batch

    async def _write_batch(self, batch: list[_Append]) -> None:
        try:
            results = await self._commit_appends(batch)
        except StorageError as exc:
            if len(batch) == 1:
                _settle(batch[0], error=exc)
                return
            # One bad message must not fail the others: write each on its own.
            logger.warning("group commit of %d messages failed (%s); writing them one by one", len(batch), exc)
            for request in batch:
                await self._write_batch([request])
            return
        except Exception as exc:
            logger.exception("unexpected error while storing messages")
            for request in batch:
                _settle(request, error=StorageError(f"database error: {type(exc).__name__}"))
            return
        for request, result in zip(batch, results, strict=True):
            _settle(request, result=result)

    async def _commit_appends(self, batch: Sequence[_Append]) -> list[tuple[StoredMessage, list[StoredMessage]]]:
        """Store the batch (conversations at most once each) and read back the newest
        messages each asked for, in one transaction."""
        async with self._transaction() as session:
            conversation_ids: list[int] = []
            for request in batch:
                conversation_id = self._conversation_ids.get(request.key)
                if conversation_id is None:
                    conversation_id, _ = await self._upsert_conversation(session, request.key)
                conversation_ids.append(conversation_id)
            rows = (
                await session.execute(
                    _INSERT_MESSAGES, [r.params(c) for r, c in zip(batch, conversation_ids, strict=True)]
                )
            ).all()
            new_ids = {row.conversation_id: row.id for row in rows}
            readers = [i for i, request in enumerate(batch) if request.limit > 0]
            newest: dict[int, list[StoredMessage]] = {i: [] for i in readers}
            if readers:
                params: dict[str, Any] = {}
                for part, i in enumerate(readers):
                    params[f"conversation_{part}"] = conversation_ids[i]
                    params[f"limit_{part}"] = batch[i].limit
                for row in await session.execute(_newest_of_many(len(readers)), params):
                    newest[readers[row[0]]].append(StoredMessage(*row[1:]))
        for request, conversation_id in zip(batch, conversation_ids, strict=True):
            self._remember(request.key, conversation_id)  # only once committed
        return [
            (
                StoredMessage(
                    new_ids[conversation_id], r.role, r.content, r.token_count, r.created_at, r.platform_message_id
                ),
                sorted(newest.get(i, []), key=_by_id),
            )
            for i, (r, conversation_id) in enumerate(zip(batch, conversation_ids, strict=True))
        ]

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
        async with self._transaction() as session:
            settings = await session.scalar(select(Conversation.settings).where(_is_key(key)))
            return dict(settings or {})

    async def set_setting(self, key: ConversationKey, name: str, value: SettingValue) -> None:
        """Store one override, creating the conversation if needed."""
        async with self._transaction() as session:
            conversation_id, settings = await self._upsert_conversation(session, key)
            settings[name] = value
            await session.execute(
                update(Conversation).where(Conversation.id == conversation_id).values(settings=settings)
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


def _by_id(message: StoredMessage) -> int:
    return message.id


def _settle(
    request: _Append,
    *,
    result: tuple[StoredMessage, list[StoredMessage]] | None = None,
    error: BaseException | None = None,
) -> None:
    if request.done.done():
        return
    if error is not None:
        request.done.set_exception(error)
    else:
        assert result is not None
        request.done.set_result(result)
