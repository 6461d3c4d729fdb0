"""The durable chat turns in the database: a turn accepted, its history read, its reply
started and finished, and the turns left open (for recovery after a restart).

`TurnsMixin` holds the `bot.ports.Repository` methods for them; `SqlRepository` inherits
it and provides the state they share with the group commit. Each step is an item of the
group commit (`storage.group_commit`), written with the batch it arrives in
(`storage.batch`); `write_accepts` and `write_finishes` are the batch's writers for the
steps that add and end turns. Their statements are built in `storage.queries`.

An accepted chat turn stores the user's message and, right after it, an empty "hidden"
slot for the reply, which `finish_turn` fills: so a conversation's messages stay in turn
order (question, answer, question, ...) even though later questions are accepted while
an earlier answer is still being written.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from bot.errors import StorageError
from bot.events import ConversationKey, IncomingMessage, Platform
from bot.ports import FinishedReply, MessageStatus, OpenTurn, StoredMessage, TurnKind, TurnState
from storage.group_commit import Append, GroupCommit
from storage.models import utcnow
from storage.queries import (
    DELETE_MESSAGES,
    INSERT_TURN_MESSAGES,
    OPEN_TURNS,
    SET_STATUS,
    SET_TURN_STATE,
    STORE_REPLY,
    TURNS_TO_FINISH,
    add_usage,
    insert_turns,
)

# Messages of a turn's history read with its acceptance (HISTORY_TURNS 20 needs 21).
PREFETCH = 64
# Column sizes of `turns` (PostgreSQL enforces them).
_NAME_CHARS = 256
_ID_CHARS = 64


# ----------------------------------------------------------------------------- turn steps
# The group commit's items besides `Append`: each is answered in the batch's transaction.


@dataclass(frozen=True, slots=True)
class Accept:
    """An incoming message to accept as a turn (`accept_turn`)."""

    event: IncomingMessage
    kind: TurnKind
    token_count: int
    at: datetime = field(default_factory=utcnow)

    @property
    def conflict_key(self) -> Hashable | None:
        return None  # several turns of one conversation may be accepted together, in order


@dataclass(frozen=True, slots=True)
class History:
    """A turn's history to read (`turn_history`)."""

    turn_id: int
    limit: int

    @property
    def conflict_key(self) -> Hashable | None:
        return None  # read after the batch's writes


@dataclass(frozen=True, slots=True)
class Started:
    """The messages of a reply shown so far (`reply_started`)."""

    turn_id: int
    platform_message_ids: tuple[str, ...]
    at: datetime = field(default_factory=utcnow)

    @property
    def conflict_key(self) -> Hashable | None:
        return ("turn", self.turn_id)  # two updates of one turn: in order, in two batches


@dataclass(frozen=True, slots=True)
class Finish:
    """A turn's end, and its reply if any (`finish_turn`)."""

    turn_id: int
    state: TurnState
    reply: FinishedReply | None
    at: datetime = field(default_factory=utcnow)

    @property
    def conflict_key(self) -> Hashable | None:
        return ("turn", self.turn_id)


Step = Append | Accept | History | Started | Finish


class _TurnHost(Protocol):
    """What the turn methods need of `SqlRepository`."""

    _group_commit: GroupCommit[Step, object]
    # Histories read with their turn's acceptance (turn id -> conversation id, its
    # version then, the messages), and a counter of changes per conversation.
    _prefetched: dict[int, tuple[int, int, list[StoredMessage]]]
    _versions: dict[int, int]

    def _transaction(self) -> AbstractAsyncContextManager[AsyncSession]: ...


class TurnsMixin:
    """The durable-turn methods of `bot.ports.Repository` (see there for the contract)."""

    # ------------------------------------------------------------------ durable turns

    async def accept_turn(self: _TurnHost, event: IncomingMessage, kind: TurnKind, token_count: int) -> int | None:
        """Accept an incoming message, keyed by (platform, chat_id, message_id): store the
        turn ("pending") and, for kind "message", the user's message (and its reply's
        slot), in one unit of work. Returns the turn id, or None when that key was
        accepted before (a redelivered update: it must not be answered again)."""
        if max(len(event.chat_id), len(event.message_id), len(event.thread_id or "")) > _ID_CHARS:
            raise StorageError("a platform id is longer than the database column")
        return cast(int | None, await self._group_commit.write(Accept(event, kind, token_count)))

    async def turn_history(self: _TurnHost, turn_id: int, limit: int) -> list[StoredMessage]:
        """The newest `limit` messages of the turn's conversation up to and including its
        user message, oldest first, without "hidden" ones (empty when a /reset deleted it)."""
        if limit <= 0:
            return []
        prefetched = self._prefetched.pop(turn_id, None)
        if prefetched is not None:
            conversation_id, version, messages = prefetched
            # Read as the turn was accepted; still its history if nothing in its
            # conversation changed since (no earlier turn finished, no reset).
            if self._versions.get(conversation_id) == version and (len(messages) < PREFETCH or limit <= PREFETCH):
                return messages[-limit:]
        return cast(list[StoredMessage], await self._group_commit.write(History(turn_id, limit)))

    async def reply_started(self: _TurnHost, turn_id: int, platform_message_ids: Sequence[str]) -> None:
        """Record the messages of a reply shown so far, so a restart can edit them."""
        # Urgent: until it is stored, a restart would send the reply again beside the one
        # shown (the platform cannot be asked what was sent), so this window is kept short.
        await self._group_commit.write(Started(turn_id, tuple(platform_message_ids)), urgent=True)

    async def finish_turn(self: _TurnHost, turn_id: int, state: TurnState, reply: FinishedReply | None = None) -> None:
        """End (or park) a turn in one unit of work: store `reply` in the turn's slot
        ("undelivered": hidden; cut off: "cut_off"), count it into the user's usage of the
        UTC day the first time it is stored, and set the state. "missed" hides the user's
        message. A turn ended without a reply loses its empty slot."""
        self._prefetched.pop(turn_id, None)
        await self._group_commit.write(Finish(turn_id, state, reply))

    async def open_turns(self: _TurnHost, platform: Platform) -> list[OpenTurn]:
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


# ----------------------------------------------------------------------------- batch writers


async def write_accepts(
    connection: AsyncConnection, dialect: str, batch: Sequence[Accept], ids: dict[ConversationKey, int]
) -> list[int | None]:
    """Store the accepted turns whose key is new: for a chat message, its text and the
    empty slot for its reply first (turn order in the conversation), then the turn,
    which skips a taken key; the messages of a turn found taken are dropped again."""
    fresh: dict[tuple[str, str, str], Accept] = {}
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


async def write_finishes(connection: AsyncConnection, dialect: str, batch: Sequence[Finish]) -> set[int]:
    """Fill each finished turn's reply slot (or drop it when there is no reply), mark
    a missed turn's message hidden, count usage the first time a reply is stored, and
    set the states. Returns the conversations whose messages changed."""
    found = {row.id: row for row in await connection.execute(TURNS_TO_FINISH, {"b_ids": [f.turn_id for f in batch]})}
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


def _turn_key(event: IncomingMessage) -> tuple[str, str, str]:
    return (event.platform, event.chat_id, event.message_id)
