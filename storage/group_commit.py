"""Group commit of the hot path's writes (appended messages, and a turn's steps).

Every chat turn writes several times (accepted, reply started, finished), and SQLite
takes one writer at a time. So writes queue up, and one writer task drains the queue a
batch at a time: the writes that arrive while a batch is being written go together into
the next, which the commit function writes in one transaction. Under load that turns
dozens of round trips through the database thread into a handful; alone, a write is
written at once. Each write still succeeds or fails on its own.

The queue is generic: an item says with `conflict_key` which others it must not share a
batch with (an append that reads its conversation back must see itself as the newest).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from bot.errors import StorageError
from bot.events import ConversationKey, Role
from bot.ports import StoredMessage
from storage.models import utcnow

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Append:
    """One message to store, and how many of its conversation's newest messages to read
    back once it is stored (0 or less: none)."""

    key: ConversationKey
    role: Role
    content: str
    token_count: int
    platform_message_id: str | None
    limit: int
    created_at: datetime = field(default_factory=utcnow)

    @property
    def conflict_key(self) -> Hashable | None:
        """Appends of one conversation go in separate batches (each reads itself back)."""
        return self.key

    def row(self, conversation_id: int) -> dict[str, Any]:
        """Its values for an INSERT into `messages`."""
        return {
            "conversation_id": conversation_id,
            "role": self.role,
            "content": self.content,
            "token_count": self.token_count,
            "platform_message_id": self.platform_message_id,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class Appended:
    """The stored message, and the newest messages read back with it (oldest first)."""

    message: StoredMessage
    newest: list[StoredMessage]


class Batchable(Protocol):
    """An item of the queue."""

    @property
    def conflict_key(self) -> Hashable | None:
        """Items with the same key (not None) never share a batch."""
        ...


T = TypeVar("T", bound=Batchable)
R = TypeVar("R")

CommitBatch = Callable[[Sequence[T]], Awaitable[list[R]]]
"""Writes a batch (no two items with one conflict key) in one transaction, answering
each in order; raises `StorageError` if the transaction fails."""


@dataclass(frozen=True, eq=False, slots=True)
class _Queued(Generic[T, R]):
    """An item in the queue, and the future its caller waits on."""

    append: T
    done: asyncio.Future[R]

    def succeed(self, result: R) -> None:
        if not self.done.done():
            self.done.set_result(result)

    def fail(self, error: StorageError) -> None:
        if not self.done.done():
            self.done.set_exception(error)


class GroupCommit(Generic[T, R]):
    """Queues writes and writes them through `commit`, at most `max_batch` at a time."""

    def __init__(self, commit: Callable[[Sequence[T]], Awaitable[list[R]]], *, max_batch: int) -> None:
        self._commit = commit
        self._max_batch = max_batch
        self._queue: deque[_Queued[T, R]] = deque()
        self._urgent: deque[_Queued[T, R]] = deque()  # written in the next batch, ahead of the queue
        self._writer: asyncio.Task[None] | None = None

    async def write(self, append: T, *, urgent: bool = False) -> R:
        """Store `append` once its turn comes (`urgent`: in the very next batch, ahead of
        those already waiting). Raises `StorageError` if it cannot be.

        A caller cancelled before its append is started cancels the append; one cancelled
        later waits until it is committed, so what the caller does next (a /reset after a
        cancelled turn) finds it committed, not still in flight.
        """
        queued: _Queued[T, R] = _Queued(append, asyncio.get_running_loop().create_future())
        (self._urgent if urgent else self._queue).append(queued)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_queue(), name="storage:appends")
        try:
            return await asyncio.shield(queued.done)
        except asyncio.CancelledError:
            if queued in self._queue:
                self._queue.remove(queued)
            elif queued in self._urgent:
                self._urgent.remove(queued)
            elif not queued.done.done():
                await asyncio.wait({queued.done})
            raise

    async def close(self) -> None:
        """Wait until every append made so far is written."""
        while (writer := self._writer) is not None:
            await asyncio.wait({writer})
            if self._writer is writer:  # cancelled before its first step: its `finally` never ran
                self._writer = None

    async def _write_queue(self) -> None:
        """The writer: drains the queue one batch at a time, then ends."""
        batch: list[_Queued[T, R]] = []
        try:
            while self._queue or self._urgent:
                batch = self._next_batch()
                await self._write_batch(batch)
        finally:
            self._writer = None
            # Anything left unanswered means this task was cancelled (the loop is closing).
            for queued in [*batch, *self._urgent, *self._queue]:
                queued.fail(StorageError("storage is shutting down"))
            self._urgent.clear()
            self._queue.clear()

    def _next_batch(self) -> list[_Queued[T, R]]:
        """The oldest items, at most one per conflict key (so each append's read-back sees
        its own append as the newest message); later ones of a key keep their place."""
        batch: list[_Queued[T, R]] = []
        keys: set[Hashable] = set()
        for queue in (self._urgent, self._queue):
            skipped: list[_Queued[T, R]] = []
            while queue and len(batch) < self._max_batch:
                queued = queue.popleft()
                key = queued.append.conflict_key
                if key is not None and key in keys:
                    skipped.append(queued)
                else:
                    if key is not None:
                        keys.add(key)
                    batch.append(queued)
            queue.extendleft(reversed(skipped))
        return batch

    async def _write_batch(self, batch: list[_Queued[T, R]]) -> None:
        try:
            results = await self._commit([queued.append for queued in batch])
        except StorageError as exc:
            if len(batch) == 1:
                batch[0].fail(exc)
                return
            # One bad message must not fail the others: write each on its own.
            logger.warning("group commit of %d messages failed (%s); writing them one by one", len(batch), exc)
            for queued in batch:
                await self._write_batch([queued])
            return
        except Exception as exc:
            logger.exception("unexpected error while storing messages")
            for queued in batch:
                queued.fail(StorageError(f"database error: {type(exc).__name__}"))
            return
        for queued, result in zip(batch, results, strict=True):
            queued.succeed(result)
