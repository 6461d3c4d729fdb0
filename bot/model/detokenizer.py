"""Incremental detokenization of one reply, with stop strings.

Decoding each token alone breaks characters that span several tokens (a byte-level BPE
spends up to four on one) and loses the leading space of SentencePiece word pieces. So
the reply is decoded over a window that slides along it (the prefix/read-offset
technique): a new token's text is ``decode(window + new) - decode(window)``, released
only once it no longer ends in an incomplete character. The first window is the tail
of the prompt, so the first word gets its space. Text that might be the start of a stop
string is held back until the next tokens decide it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

# Prompt tokens decoded with the reply so the first piece gets its leading space right
# (SentencePiece-style tokenizers drop it when a token is decoded alone).
CONTEXT_TOKENS: Final = 5
REPLACEMENT: Final = "\ufffd"  # what tokenizers decode an incomplete character to


@dataclass(frozen=True, slots=True)
class Piece:
    """Text that is safe to send; `stopped` when a stop string ended the reply right after it."""

    text: str
    stopped: bool = False


_NOTHING: Final = Piece("")


class Detokenizer:
    """Turns one reply's tokens into text as they arrive.

    `decode` is the tokenizer's (special tokens skipped, an incomplete character
    decoded to U+FFFD). Only one thread may feed an instance; it is the only one that
    decodes, so the caller can build the detokenizer anywhere.
    """

    __slots__ = ("_context_checked", "_decode", "_held", "_ids", "_prefix_offset", "_read_offset", "_stops")

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt: Sequence[int], stops: Sequence[str]) -> None:
        self._decode = decode
        self._stops = tuple(s for s in stops if s)
        self._ids = list(prompt[-CONTEXT_TOKENS:])  # the prompt's tail, then the reply
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._held = ""  # decoded, not yet released: it may be the start of a stop string
        self._context_checked = False

    def push(self, token: int) -> Piece:
        """Add the reply's next token; the text it releases (often none)."""
        if not self._context_checked:
            self._context_checked = True
            if self._decode(self._ids).endswith(REPLACEMENT):
                self._ids, self._read_offset = [], 0  # the prompt's tail ends mid-character
        self._ids.append(token)
        new = self._unread()
        if not new or new.endswith(REPLACEMENT):
            return _NOTHING
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._release(new)

    def flush(self) -> Piece:
        """The reply ended: the text held back and not yet decoded. An incomplete
        character at the end (a reply cut by a length limit) is dropped."""
        rest = self._unread().rstrip(REPLACEMENT)
        piece = self._release(rest) if rest else _NOTHING
        if piece.stopped:
            return piece
        text, self._held = piece.text + self._held, ""
        return Piece(text)

    def _unread(self) -> str:
        """The text the tokens after the read offset add to the window."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        return text[len(prefix) :] if len(text) > len(prefix) else ""

    def _release(self, new: str) -> Piece:
        """`new` after the held text, cut at a stop string, minus what may start one."""
        held = self._held + new
        cut = min((i for i in (held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return Piece(held[:cut], stopped=True)
        keep = _stop_prefix_len(held, self._stops)
        self._held = held[len(held) - keep :]
        return Piece(held[: len(held) - keep])


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
