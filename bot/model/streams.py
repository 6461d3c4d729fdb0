"""Delivery of reply streams from the scheduler thread to the event loop.

Each request has a `Channel`, an asyncio queue that only its event loop touches. The
scheduler thread hands every loop the items of one step in a single
`call_soon_threadsafe` callback (`send`); the consumer reads them with
`Channel.receive`, which merges the text that piled up while it was busy into one
`ReplyChunk`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from bot.ports import FinishReason, ReplyChunk

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Text:
    """New text, and how many tokens the request had generated when it was decoded."""

    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class End:
    """The stream's last item: `error` is None for a normal end."""

    error: BaseException | None = None
    finish_reason: FinishReason = "stop"
    tokens: int = 0


Item = Text | End


class Channel:
    """The event-loop half of one request's stream."""

    __slots__ = ("_closed", "_queue", "_reported", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._closed = False
        self._reported = 0  # tokens already handed to the consumer

    def put(self, item: Item) -> None:
        """On the loop. Nothing goes in after the end (e.g. after shutdown ended it)."""
        if self._closed:
            return
        if isinstance(item, End):
            self._closed = True
        self._queue.put_nowait(item)

    def close(self) -> None:
        """On the loop: the consumer has gone; drop whatever still arrives."""
        self._closed = True

    async def receive(self) -> ReplyChunk:
        """The next chunk; the last one has a `finish_reason`. Raises the error that
        ended the stream, if any."""
        # Text that piled up while the consumer was busy goes out as one piece:
        # one send or edit for it instead of one per token.
        item = await self._queue.get()
        pieces: list[str] = []
        tokens = self._reported
        while isinstance(item, Text):
            pieces.append(item.text)
            tokens = item.tokens
            if self._queue.empty():
                break
            item = self._queue.get_nowait()
        if isinstance(item, End):
            if item.error is not None:
                raise item.error
            return ReplyChunk("".join(pieces), max(item.tokens, tokens) - self._reported, item.finish_reason)
        chunk = ReplyChunk("".join(pieces), tokens - self._reported)
        self._reported = tokens
        return chunk


def send(items: Sequence[tuple[Channel, Item]]) -> None:
    """From the scheduler thread: queue the items, one callback per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Channel, Item]]] = {}
    for channel, item in items:
        by_loop.setdefault(channel.loop, []).append((channel, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:
            logger.debug("event loop closed; dropped %d stream item(s)", len(batch))


def send_from_loop(loop: asyncio.AbstractEventLoop, channel: Channel, item: Item) -> None:
    """From code running on `loop`: queue the item now if it is the channel's loop."""
    if channel.loop is loop:
        channel.put(item)
        return
    try:
        channel.loop.call_soon_threadsafe(channel.put, item)
    except RuntimeError:
        pass  # that loop is closed; nobody is waiting


def _put_all(items: list[tuple[Channel, Item]]) -> None:
    for channel, item in items:
        channel.put(item)
