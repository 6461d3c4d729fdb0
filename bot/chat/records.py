"""How a turn's progress reaches the repository: the reply's messages shown so far
(`Repository.reply_started`, in the background) and the turn's end
(`Repository.finish_turn`). A storage failure here is logged, rate-limited, never raised:
the user already has (or is about to get) their answer."""

from __future__ import annotations

import asyncio
import logging
import time

from bot.chat.background import Background
from bot.errors import StorageError
from bot.ports import FinishedReply, Repository, TurnState

# Storage failures are logged with a traceback at most once per this many seconds.
STORAGE_LOG_EVERY_S = 30.0


class StorageFailureLog:
    """Logs storage failures to `logger`: one ERROR with its traceback per
    `STORAGE_LOG_EVERY_S`, then how many more there were (a broken disk fails every
    message). One per manager, shared by its parts, so that they are one rate-limited
    stream under the manager's logger."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._logged_at = float("-inf")
        self._unlogged = 0

    def failed(self, exc: StorageError, what: str) -> None:
        """Log that storage failed while doing `what`."""
        now = time.monotonic()
        if now - self._logged_at < STORAGE_LOG_EVERY_S:
            self._unlogged += 1
            return
        unlogged, self._unlogged = self._unlogged, 0
        self._logged_at = now
        more = f" ({unlogged} more storage failure(s) in the last {STORAGE_LOG_EVERY_S:.0f} s)" if unlogged else ""
        self._logger.error("storage failed while %s: %s%s", what, exc, more, exc_info=exc)


class TurnRecorder:
    """Stores the reply's messages shown so far and the end of each turn."""

    def __init__(self, repository: Repository, background: Background, storage: StorageFailureLog) -> None:
        self._repo = repository
        self._background = background
        self._storage = storage
        # The latest background record of each reply's messages (`record_shown`).
        self._recording: dict[int, asyncio.Task[None]] = {}

    def record_shown(self, turn_id: int, message_ids: list[str]) -> None:
        """Store the reply's messages shown so far (`Repository.reply_started`), so that a
        restart edits them instead of sending them again. In the background: the reply
        streams on meanwhile. A newer record replaces one still waiting to be written."""
        previous = self._recording.get(turn_id)
        if previous is not None:
            previous.cancel()  # still queued: dropped; being written: it completes first
        task = self._recording[turn_id] = self._background.spawn(
            self._write_shown(turn_id, message_ids), f"reply-shown:{turn_id}"
        )
        task.add_done_callback(
            lambda done: self._recording.pop(turn_id) if self._recording.get(turn_id) is done else None
        )

    async def _write_shown(self, turn_id: int, message_ids: list[str]) -> None:
        try:
            await self._repo.reply_started(turn_id, message_ids)
        except StorageError as exc:  # the reply goes on; only a restart would send it again
            self._storage.failed(exc, "recording a reply's messages")

    async def finish(self, turn_id: int, state: TurnState, reply: FinishedReply | None = None) -> None:
        """`Repository.finish_turn`; a storage failure is logged (rate-limited), not raised.
        A record of the reply's messages still waiting is dropped first (the end stores
        them too); one being written is waited for, so it cannot land after the end."""
        recording = self._recording.pop(turn_id, None)
        if recording is not None and not recording.done():
            recording.cancel()
            await asyncio.wait({recording})
        try:
            await self._repo.finish_turn(turn_id, state, reply)
        except StorageError as exc:
            self._storage.failed(exc, f"storing the end of turn {turn_id}")
