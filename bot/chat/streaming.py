"""Streaming a reply into a chat: throttled edits, and splitting at the platform's limit.

Shared by every adapter: the limit and the edit interval come from the `ReplyTarget`.
A streamer can resume a reply whose first messages a previous run of the bot already
showed (it edits them instead of sending new ones), and reports each new message it
sends, so that the messages of a reply are known after a restart.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from bot.ports import ReplyTarget

logger = logging.getLogger(__name__)

_FENCE = re.compile(r"^[ \t]*(```+|~~~+)(.*)$", re.MULTILINE)
_FENCE_CLOSE = "\n```"


def _open_fence(text: str) -> str | None:
    """The opening fence line still open at the end of `text` (None when balanced)."""
    current: str | None = None
    for match in _FENCE.finditer(text):
        if current is None:
            current = match.group(0).strip()
        elif not match.group(2).strip():  # a bare fence closes the open block
            current = None
    return current


def _cut_point(text: str, limit: int) -> int:
    """Where to cut `text` so the first part fits in `limit`: at a paragraph, then a line,
    then a word boundary; mid-word only when a single word is longer than the limit."""
    window = text[:limit]
    floor = limit // 4  # a boundary too close to the start wastes a whole message
    for sep in ("\n\n", "\n", " "):
        at = window.rfind(sep)
        if at > floor:
            return at
    return limit


def split_message(text: str, limit: int) -> list[str]:
    """Split `text` into messages of at most `limit` characters.

    Cuts at paragraph, line or word boundaries (the separator itself is dropped).
    A cut inside a fenced code block closes the fence and reopens it, with its
    language tag, in the next message.
    """
    if limit < 16:
        raise ValueError("limit too small to split messages sensibly")
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        budget = limit - len(_FENCE_CLOSE)
        cut = _cut_point(rest, budget)
        head, rest = rest[:cut], rest[cut:]
        if rest[:1] in ("\n", " "):
            rest = rest[2:] if rest.startswith("\n\n") else rest[1:]
        # a reopened fence becomes the first line of `rest`, so each part parses alone
        still_open = _open_fence(head)
        if still_open is not None:
            head += _FENCE_CLOSE
            rest = f"{still_open}\n{rest}"
        parts.append(head)
    parts.append(rest)
    return parts


@dataclass(slots=True)
class _Sent:
    message_id: str
    text: str | None  # None: shown before a restart, text unknown (always edited)


class ReplyStreamer:
    """Turns a stream of text pieces into one or more chat messages, edited as it grows.

    The first message is sent as soon as there is visible text; after that edits are
    throttled to `target.edit_interval`. `finish()` makes every message hold its exact
    final text. Errors from the target (`DeliveryError`) propagate to the caller, and a
    later `finish()` picks up where the failed call stopped.

    `shown`: ids of the reply's messages already in the chat (a reply resumed after a
    restart), edited in place. `on_new_message` is awaited with every message id of the
    reply each time a new message was sent.
    """

    def __init__(
        self,
        target: ReplyTarget,
        *,
        clock: Callable[[], float] = time.monotonic,
        shown: Sequence[str] = (),
        on_new_message: Callable[[list[str]], Awaitable[None]] | None = None,
    ) -> None:
        self._target = target
        self._clock = clock
        self._text = ""
        self._sent: list[_Sent] = [_Sent(message_id, None) for message_id in shown]
        self._on_new_message = on_new_message
        self._last_flush = float("-inf")

    @property
    def text(self) -> str:
        return self._text

    @property
    def message_ids(self) -> list[str]:
        return [s.message_id for s in self._sent]

    async def push(self, piece: str) -> None:
        """Add generated text; sends or edits when the throttle allows."""
        self._text += piece
        if not self._text.strip():
            return
        if not self._sent or self._clock() - self._last_flush >= self._target.edit_interval:
            await self._flush()

    def add(self, piece: str) -> None:
        """Add text without showing it yet (the next `finish` shows it)."""
        self._text += piece

    async def finish(self, suffix: str = "") -> None:
        """Write the exact final text (plus `suffix`) into the messages."""
        self._text += suffix
        if self._text.strip():
            await self._flush()

    async def _flush(self) -> None:
        self._last_flush = self._clock()
        chunks = split_message(self._text, self._target.max_chars)
        for index, chunk in enumerate(chunks):
            if not chunk.strip():
                continue
            if index < len(self._sent):
                sent = self._sent[index]
                if sent.text != chunk:
                    await self._target.edit(sent.message_id, chunk)
                    sent.text = chunk
            else:
                message_id = await self._target.send(chunk)
                self._sent.append(_Sent(message_id, chunk))
                if self._on_new_message is not None:
                    await self._on_new_message(self.message_ids)
