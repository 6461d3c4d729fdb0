"""The group commit's unit of work: one batch of hot-path writes in one transaction.

`BatchWriterMixin._commit_batch` is the commit function of `SqlRepository`'s group
commit (`storage.group_commit`): the appends and a turn's steps (`storage.turns`) that
arrive while a write is in progress are written together, with one multi-row statement
per kind and one SELECT for all their histories (statements from `storage.queries`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, cast

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from bot.events import ConversationKey
from bot.ports import SettingValue, StoredMessage
from storage.group_commit import Append, Appended
from storage.locks import AdvisoryLocks
from storage.queries import INSERT_MESSAGES, SET_REPLY_IDS, newest_of_many, turn_histories
from storage.turns import PREFETCH, Accept, Finish, History, Started, Step, write_accepts, write_finishes


class _BatchHost(Protocol):
    """What the batch writer needs of `SqlRepository`."""

    _locks: AdvisoryLocks | None
    _conversation_ids: dict[ConversationKey, int]
    _prefetched: dict[int, tuple[int, int, list[StoredMessage]]]
    _versions: dict[int, int]

    def _transaction(self) -> AbstractAsyncContextManager[AsyncSession]: ...

    async def _upsert_conversation(
        self, session: AsyncSession, key: ConversationKey
    ) -> tuple[int, dict[str, SettingValue]]: ...

    def _remember(self, key: ConversationKey, conversation_id: int) -> None: ...


class BatchWriterMixin:
    """Writes the group commit's batches for `SqlRepository`."""

    async def _commit_batch(self: _BatchHost, batch: Sequence[Step]) -> list[object]:
        """Write the batch in one transaction: appends, accepted turns, replies started,
        finished turns; then the reads (appends' read-backs, turn histories). Answers
        each item in order."""
        results: list[object] = [None] * len(batch)
        appends = [(i, step) for i, step in enumerate(batch) if isinstance(step, Append)]
        accepts = [(i, step) for i, step in enumerate(batch) if isinstance(step, Accept)]
        started = [step for step in batch if isinstance(step, Started)]
        finishes = [step for step in batch if isinstance(step, Finish)]
        histories = [(i, step) for i, step in enumerate(batch) if isinstance(step, History)]
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
                    await _write_appends(connection, [a for _, a in appends], conversation_ids),
                    strict=True,
                ):
                    results[i] = appended
            if accepts:
                dialect = session.get_bind().dialect.name
                for (i, _), turn_id in zip(
                    accepts,
                    await write_accepts(connection, dialect, [a for _, a in accepts], conversation_ids),
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
                touched = await write_finishes(connection, session.get_bind().dialect.name, finishes)
            # A turn accepted here is usually answered at once: its history is read now, in
            # this batch, instead of in another one when the turn starts (see `turn_history`).
            prefetch = [
                (cast(int, results[i]), conversation_ids[a.event.key])
                for i, a in accepts
                if self._locks is None and a.kind == "message" and results[i] is not None
            ]
            reads = [(step.turn_id, max(step.limit, 1)) for _, step in histories]
            reads += [(turn_id, PREFETCH) for turn_id, _ in prefetch]
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
    connection: AsyncConnection, batch: Sequence[Append], ids: dict[ConversationKey, int]
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


def _by_id(message: StoredMessage) -> int:
    return message.id
