"""`bot.ports.Repository` on SQLAlchemy: one session, one transaction per unit of work.

The hot path is group-committed (`storage.group_commit`): appends, and a turn's steps
(accepted, its history read, its reply started, finished), that arrive while a write is
in progress are written together in the next unit of work, with one multi-row statement
per kind and one SELECT for all their histories. Shared and hot-path statements are
built in `storage.queries`. Every method returns `bot.ports` dataclasses, never ORM rows.

An accepted chat turn stores the user's message and, right after it, an empty "hidden"
slot for the reply, which `finish_turn` fills: so a conversation's messages stay in turn
order (question, answer, question, ...) even though later questions are accepted while
an earlier answer is still being written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import ColumnElement, delete, distinct, func, select, text, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from bot.errors import StorageError
from bot.events import ConversationKey, IncomingMessage, Platform, Role
from bot.ports import (
    FinishedReply,
    MessageStatus,
    OpenTurn,
    RepoStats,
    SettingValue,
    StoredMessage,
    TurnKind,
    TurnState,
)
from storage.controls import ControlsMixin
from storage.group_commit import Append, Appended, GroupCommit
from storage.locks import AdvisoryLocks
from storage.models import Conversation, Message, utcnow
from storage.queries import (
    DELETE_MESSAGES,
    INSERT_MESSAGES,
    INSERT_TURN_MESSAGES,
    MAX_APPEND_BATCH,
    NOT_HIDDEN,
    OPEN_TURNS,
    RECENT_BY_ID,
    RECENT_BY_KEY,
    SET_REPLY_IDS,
    SET_STATUS,
    SET_TURN_STATE,
    STORE_REPLY,
    TURNS_TO_FINISH,
    add_usage,
    conversation_id_of,
    insert_turns,
    matches_key,
    newest_of_many,
    turn_histories,
    upsert_conversation,
)

# Conversation ids remembered at most (the oldest remembered is forgotten first).
_ID_CACHE_SIZE = 100_000
# Messages of a turn's history read with its acceptance (HISTORY_TURNS 20 needs 21).
_PREFETCH = 64
# Column sizes of `turns` (PostgreSQL enforces them).
_NAME_CHARS = 256
_ID_CHARS = 64


# ----------------------------------------------------------------------------- turn steps
# The group commit's items besides `Append`: each is answered in the batch's transaction.


@dataclass(frozen=True, slots=True)
class _Accept:
    event: IncomingMessage
    kind: TurnKind
    token_count: int
    at: datetime = field(default_factory=utcnow)

    @property
    def conflict_key(self) -> Hashable | None:
        return None  # several turns of one conversation may be accepted together, in order


@dataclass(frozen=True, slots=True)
class _History:
    turn_id: int
    limit: int

    @property
    def conflict_key(self) -> Hashable | None:
        return None  # read after the batch's writes


@dataclass(frozen=True, slots=True)
class _Started:
    turn_id: int
    platform_message_ids: tuple[str, ...]
    at: datetime = field(default_factory=utcnow)

    @property
    def conflict_key(self) -> Hashable | None:
        return ("turn", self.turn_id)  # two updates of one turn: in order, in two batches


@dataclass(frozen=True, slots=True)
class _Finish:
    turn_id: int
    state: TurnState
    reply: FinishedReply | None
    at: datetime = field(default_factory=utcnow)

    @property
    def conflict_key(self) -> Hashable | None:
        return ("turn", self.turn_id)


_Step = Append | _Accept | _History | _Started | _Finish


class SqlRepository(ControlsMixin):
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
        self._group_commit: GroupCommit[_Step, object] = GroupCommit(self._commit_batch, max_batch=MAX_APPEND_BATCH)

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

    async def _commit_batch(self, batch: Sequence[_Step]) -> list[object]:
        """Write the batch in one transaction: appends, accepted turns, replies started,
        finished turns; then the reads (appends' read-backs, turn histories). Answers
        each item in order."""
        results: list[object] = [None] * len(batch)
        appends = [(i, step) for i, step in enumerate(batch) if isinstance(step, Append)]
        accepts = [(i, step) for i, step in enumerate(batch) if isinstance(step, _Accept)]
        started = [step for step in batch if isinstance(step, _Started)]
        finishes = [step for step in batch if isinstance(step, _Finish)]
        histories = [(i, step) for i, step in enumerate(batch) if isinstance(step, _History)]
        async with self._transaction() as session:
            conversation_ids: dict[ConversationKey, int] = {}
            # In one order in every batch: concurrent batches (PostgreSQL) lock rows alike.
            for key in sorted({a.key for _, a in appends} | {a.event.key for _, a in accepts}, key=str):
                if key in conversation_ids:
                    continue
                known = self._conversation_ids.get(key)
                conversation_ids[key] = (
                    known if known is not None else (await self._upsert_conversation(session, key))[0]
                )
            # On the Core connection: the hot path needs no ORM bulk-insert bookkeeping.
            connection = await session.connection()
            if appends:
                for (i, _), appended in zip(
                    appends,
                    await self._write_appends(connection, [a for _, a in appends], conversation_ids),
                    strict=True,
                ):
                    results[i] = appended
            if accepts:
                dialect = session.get_bind().dialect.name
                for (i, _), turn_id in zip(
                    accepts,
                    await self._write_accepts(connection, dialect, [a for _, a in accepts], conversation_ids),
                    strict=True,
                ):
                    results[i] = turn_id
            if started:
                await connection.execute(
                    SET_REPLY_IDS,
                    [{"b_turn": s.turn_id, "b_ids": list(s.platform_message_ids), "b_now": s.at} for s in started],
                )
            touched: set[int] = set()
            if finishes:
                touched = await self._write_finishes(connection, session.get_bind().dialect.name, finishes)
            # A turn accepted here is usually answered at once: its history is read now, in
            # this batch, instead of in another one when the turn starts (see `turn_history`).
            prefetch = [
                (cast(int, results[i]), conversation_ids[a.event.key])
                for i, a in accepts
                if self._locks is None and a.kind == "message" and results[i] is not None
            ]
            reads = [(step.turn_id, max(step.limit, 1)) for _, step in histories]
            reads += [(turn_id, _PREFETCH) for turn_id, _ in prefetch]
            read: list[list[StoredMessage]] = [[] for _ in reads]
            if reads:
                params: dict[str, Any] = {}
                for part, (turn_id, limit) in enumerate(reads):
                    params[f"turn_{part}"] = turn_id
                    params[f"limit_{part}"] = limit
                for row in await connection.execute(turn_histories(len(reads)), params):
                    read[row[0]].append(StoredMessage(*row[1:]))
                for (i, _), messages in zip(histories, read, strict=False):
                    results[i] = sorted(messages, key=_by_id)
        for key, conversation_id in conversation_ids.items():
            self._remember(key, conversation_id)  # only once committed
        # Every conversation whose messages this batch changed: histories read before are stale.
        for conversation_id in {conversation_ids[a.key] for _, a in appends} | touched:
            self._versions[conversation_id] = self._versions.get(conversation_id, 0) + 1
        for (turn_id, conversation_id), messages in zip(prefetch, read[len(histories) :], strict=True):
            self._versions[conversation_id] = self._versions.get(conversation_id, 0) + 1
            self._prefetched[turn_id] = (conversation_id, self._versions[conversation_id], sorted(messages, key=_by_id))
        return results

    async def _write_appends(
        self, connection: AsyncConnection, batch: Sequence[Append], ids: dict[ConversationKey, int]
    ) -> list[Appended]:
        """Store the appends (at most one per conversation) and read back the newest
        messages each asked for."""
        conversation_ids = [ids[append.key] for append in batch]
        rows = (
            await connection.execute(INSERT_MESSAGES, [a.row(c) for a, c in zip(batch, conversation_ids, strict=True)])
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
        return [
            Appended(
                StoredMessage(
                    new_ids[conversation_id], a.role, a.content, a.token_count, a.created_at, a.platform_message_id
                ),
                sorted(newest.get(i, []), key=_by_id),
            )
            for i, (a, conversation_id) in enumerate(zip(batch, conversation_ids, strict=True))
        ]

    @staticmethod
    async def _write_accepts(
        connection: AsyncConnection, dialect: str, batch: Sequence[_Accept], ids: dict[ConversationKey, int]
    ) -> list[int | None]:
        """Store the accepted turns whose key is new: for a chat message, its text and the
        empty slot for its reply first (turn order in the conversation), then the turn,
        which skips a taken key; the messages of a turn found taken are dropped again."""
        fresh: dict[tuple[str, str, str], _Accept] = {}
        for accept in batch:  # the same key twice in one batch: the first is the one
            fresh.setdefault(_turn_key(accept.event), accept)
        message_rows: list[dict[str, Any]] = []
        for accept in fresh.values():
            if accept.kind != "message":
                continue
            event = accept.event
            common = {
                "conversation_id": ids[event.key],
                "platform_message_id": event.message_id,
                "created_at": accept.at,
            }
            message_rows.append(
                {**common, "role": "user", "content": event.text, "token_count": accept.token_count, "status": None}
            )
            message_rows.append({**common, "role": "assistant", "content": "", "token_count": 0, "status": "hidden"})
        stored: dict[tuple[int, str, str | None], int] = {}
        if message_rows:
            for row in await connection.execute(INSERT_TURN_MESSAGES, message_rows):
                stored[(row.conversation_id, row.role, row.platform_message_id)] = row.id
        turn_rows: list[dict[str, Any]] = []
        for accept in fresh.values():
            event = accept.event
            conversation_id = ids[event.key]
            turn_rows.append(
                {
                    "conversation_id": conversation_id,
                    "platform": event.platform,
                    "chat_id": event.chat_id,
                    "platform_message_id": event.message_id,
                    "kind": accept.kind,
                    "state": "pending",
                    "display_name": event.display_name[:_NAME_CHARS],
                    "is_private": event.is_private,
                    "thread_id": event.thread_id,
                    "message_id": stored.get((conversation_id, "user", event.message_id)),
                    "reply_id": stored.get((conversation_id, "assistant", event.message_id)),
                    "reply_message_ids": [],
                    "accepted_at": accept.at,
                    "updated_at": accept.at,
                }
            )
        taken = {
            (row.platform, row.chat_id, row.platform_message_id): row.id
            for row in await connection.execute(insert_turns(dialect), turn_rows)
        }
        duplicates = [
            message_id
            for key, accept in fresh.items()
            if key not in taken
            for message_id in (
                stored.get((ids[accept.event.key], "user", accept.event.message_id)),
                stored.get((ids[accept.event.key], "assistant", accept.event.message_id)),
            )
            if message_id is not None
        ]
        if duplicates:
            await connection.execute(DELETE_MESSAGES, {"b_ids": duplicates})
        results: list[int | None] = []
        for accept in batch:
            key = _turn_key(accept.event)
            results.append(taken.get(key) if fresh.get(key) is accept else None)
        return results

    @staticmethod
    async def _write_finishes(connection: AsyncConnection, dialect: str, batch: Sequence[_Finish]) -> set[int]:
        """Fill each finished turn's reply slot (or drop it when there is no reply), mark
        a missed turn's message hidden, count usage the first time a reply is stored, and
        set the states. Returns the conversations whose messages changed."""
        found = {
            row.id: row for row in await connection.execute(TURNS_TO_FINISH, {"b_ids": [f.turn_id for f in batch]})
        }
        replies: list[dict[str, Any]] = []
        hide: list[dict[str, Any]] = []
        drop: list[int] = []
        usage: dict[tuple[str, str, Any], list[int]] = {}
        states: list[dict[str, Any]] = []
        for finish in batch:
            turn = found.get(finish.turn_id)
            if turn is None:  # its conversation was deleted
                continue
            reply = finish.reply
            ids = list(turn.reply_message_ids or [])
            if reply is not None:
                ids = list(reply.platform_message_ids) or ids
                # No slot: a /reset deleted the conversation's messages meanwhile.
                if turn.reply_id is not None:
                    status: MessageStatus | None = (
                        "hidden" if finish.state == "undelivered" else "cut_off" if reply.cut_off else None
                    )
                    replies.append(
                        {
                            "b_id": turn.reply_id,
                            "b_content": reply.text,
                            "b_tokens": reply.token_count,
                            "b_platform_id": ids[0] if ids else None,
                            "b_status": status,
                            "b_at": finish.at,
                        }
                    )
                if turn.state == "pending":  # the first time this reply is stored
                    day = (turn.platform, turn.user_id, finish.at.date())
                    counts = usage.setdefault(day, [0, 0, 0])
                    counts[0] += reply.prompt_tokens
                    counts[1] += reply.token_count
                    counts[2] += 1
            elif turn.state == "pending" and turn.reply_id is not None and finish.state != "pending":
                drop.append(turn.reply_id)  # never answered: the empty slot goes
            if finish.state == "missed" and turn.message_id is not None:
                hide.append({"b_id": turn.message_id, "b_status": "hidden"})
            states.append({"b_turn": finish.turn_id, "b_state": finish.state, "b_ids": ids, "b_now": finish.at})
        if replies:
            await connection.execute(STORE_REPLY, replies)
        if hide:
            await connection.execute(SET_STATUS, hide)
        if drop:
            await connection.execute(DELETE_MESSAGES, {"b_ids": drop})
        if usage:
            await connection.execute(
                add_usage(dialect),
                [
                    {
                        "platform": platform,
                        "user_id": user_id,
                        "day": day,
                        "prompt_tokens": counts[0],
                        "generated_tokens": counts[1],
                        "messages": counts[2],
                    }
                    for (platform, user_id, day), counts in sorted(usage.items())
                ],
            )
        if states:
            await connection.execute(SET_TURN_STATE, states)
        return {row.conversation_id for row in found.values()}

    # ------------------------------------------------------------------ durable turns

    async def accept_turn(self, event: IncomingMessage, kind: TurnKind, token_count: int) -> int | None:
        """Accept an incoming message, keyed by (platform, chat_id, message_id): store the
        turn ("pending") and, for kind "message", the user's message (and its reply's
        slot), in one unit of work. Returns the turn id, or None when that key was
        accepted before (a redelivered update: it must not be answered again)."""
        if max(len(event.chat_id), len(event.message_id), len(event.thread_id or "")) > _ID_CHARS:
            raise StorageError("a platform id is longer than the database column")
        return cast(int | None, await self._group_commit.write(_Accept(event, kind, token_count)))

    async def turn_history(self, turn_id: int, limit: int) -> list[StoredMessage]:
        """The newest `limit` messages of the turn's conversation up to and including its
        user message, oldest first, without "hidden" ones (empty when a /reset deleted it)."""
        if limit <= 0:
            return []
        prefetched = self._prefetched.pop(turn_id, None)
        if prefetched is not None:
            conversation_id, version, messages = prefetched
            # Read as the turn was accepted; still its history if nothing in its
            # conversation changed since (no earlier turn finished, no reset).
            if self._versions.get(conversation_id) == version and (len(messages) < _PREFETCH or limit <= _PREFETCH):
                return messages[-limit:]
        return cast(list[StoredMessage], await self._group_commit.write(_History(turn_id, limit)))

    async def reply_started(self, turn_id: int, platform_message_ids: Sequence[str]) -> None:
        """Record the messages of a reply shown so far, so a restart can edit them."""
        await self._group_commit.write(_Started(turn_id, tuple(platform_message_ids)))

    async def finish_turn(self, turn_id: int, state: TurnState, reply: FinishedReply | None = None) -> None:
        """End (or park) a turn in one unit of work: store `reply` in the turn's slot
        ("undelivered": hidden; cut off: "cut_off"), count it into the user's usage of the
        UTC day the first time it is stored, and set the state. "missed" hides the user's
        message. A turn ended without a reply loses its empty slot."""
        self._prefetched.pop(turn_id, None)
        await self._group_commit.write(_Finish(turn_id, state, reply))

    async def open_turns(self, platform: Platform) -> list[OpenTurn]:
        """The platform's chat turns in state "pending" or "undelivered", oldest first
        (those whose message a /reset deleted are left out)."""
        async with self._transaction() as session:
            rows = (await (await session.connection()).execute(OPEN_TURNS, {"platform": platform})).all()
        turns = []
        for row in rows:
            event = IncomingMessage(
                platform=row.platform,
                chat_id=row.chat_id,
                user_id=row.user_id,
                display_name=row.display_name,
                message_id=row.platform_message_id,
                text=row[11],
                is_private=row.is_private,
                timestamp=row.accepted_at,
                thread_id=row.thread_id,
            )
            reply = row[12] if row.state == "undelivered" else None
            turns.append(OpenTurn(row.id, event, row.state, row.accepted_at, tuple(row.reply_message_ids or ()), reply))
        return turns

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
        self._prefetched.clear()
        async with self._transaction() as session:
            result = cast(CursorResult[Any], await session.execute(stmt))
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


def _by_id(message: StoredMessage) -> int:
    return message.id


def _turn_key(event: IncomingMessage) -> tuple[str, str, str]:
    return (event.platform, event.chat_id, event.message_id)
