"""A deterministic `bot.ports.Engine`: the fake model behind the real `Worker` in tests.

Tokenizer: one token per Unicode code point (or, with ``byte_tokens=True``, one per
UTF-8 byte, so a character can span several tokens as with a real byte-level BPE).
Special ids live above the Unicode range: ``EOS`` and the role markers.

``render_chat`` renders ``<|system|>…<|end|><|user|>…<|end|><|assistant|>`` with the
markers as special tokens. A sequence's reply is decided at ``add`` from its prompt:
``reply(last user text)`` (default ``"Echo: " + last user text``), then ``EOS``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from bot.events import ChatTurn, Role
from bot.ports import SamplingParams

SPECIAL_BASE = 0x110000
EOS = SPECIAL_BASE
SYSTEM = SPECIAL_BASE + 1
USER = SPECIAL_BASE + 2
ASSISTANT = SPECIAL_BASE + 3
END = SPECIAL_BASE + 4

MARKERS: dict[int, str] = {
    EOS: "<|eos|>",
    SYSTEM: "<|system|>",
    USER: "<|user|>",
    ASSISTANT: "<|assistant|>",
    END: "<|end|>",
}
_ROLE_MARKER: dict[Role, int] = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class FakeEngineError(RuntimeError):
    """What the fake raises when told to fail (as a real engine raises torch errors)."""


def echo(text: str) -> str:
    """The default reply rule."""
    return "Echo: " + text


class FakeEngine:
    """A deterministic engine that really batches: sequences live from `add` to `remove`.

    Knobs:
    - ``reply``: last user text -> reply text (default `echo`).
    - ``step_delay``: seconds each `step` sleeps (in the scheduler thread).
    - ``fail_on``: `add` raises when a request's last user text contains it. A batched
      `add` that contains such a request raises and adds nothing (atomic), so the
      caller must add the others one by one to isolate the bad one.
    - ``fail_step_after``: `step` raises on every call after this many successful steps,
      until `fail_step_after` is set to None again (it is a plain attribute).
    - ``fail_remove``: `remove` drops every sequence, then raises (as the real engine
      does when it runs out of memory while shrinking its cache); a plain attribute.
    - ``stop_strings``, ``context_length``, ``byte_tokens``: see the module docstring.

    Records what it saw: ``added`` (prompt texts with markers, in admission order),
    ``add_calls`` (the seq ids of each `add` call), ``removed`` (each `remove` call),
    ``active`` (live seq ids), ``max_active``, ``steps``, ``step_sizes`` (batch size of
    each step), ``samplings``, ``thread_errors`` (engine calls made off the scheduler
    thread, which the protocol forbids; empty when the worker behaves).
    """

    def __init__(
        self,
        *,
        reply: Callable[[str], str] | None = None,
        step_delay: float = 0.0,
        fail_on: str | None = None,
        fail_step_after: int | None = None,
        stop_strings: Sequence[str] = (),
        context_length: int = 2048,
        byte_tokens: bool = False,
    ) -> None:
        self.reply = reply or echo
        self.step_delay = step_delay
        self.fail_on = fail_on
        self.fail_step_after = fail_step_after
        self.fail_remove = False
        self._stop_strings = tuple(stop_strings)
        self._context_length = context_length
        self.byte_tokens = byte_tokens

        self._lock = threading.Lock()
        self._running = threading.Event()
        self._running.set()
        self._thread_id: int | None = None
        # seq_id -> (reply tokens, index of the next token to return)
        self._seqs: dict[int, tuple[list[int], int]] = {}

        self.thread_starts = 0
        self.added: list[str] = []
        self.added_ids: list[list[int]] = []
        self.add_calls: list[list[int]] = []
        self.samplings: list[SamplingParams] = []
        self.removed: list[list[int]] = []
        self.removed_at_step: dict[int, int] = {}
        self.steps = 0
        self.step_sizes: list[int] = []
        self.max_active = 0
        self.thread_errors: list[str] = []

    # ------------------------------------------------------------------ properties

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset({EOS})

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self._stop_strings

    @property
    def active(self) -> frozenset[int]:
        """Seq ids currently in the batch."""
        with self._lock:
            return frozenset(self._seqs)

    # ------------------------------------------------------------------ tokenizer (thread-safe)

    def encode(self, text: str) -> list[int]:
        if self.byte_tokens:
            return list(text.encode("utf-8"))
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Special tokens are skipped; incomplete UTF-8 decodes to U+FFFD like HF tokenizers."""
        plain = [i for i in ids if i < SPECIAL_BASE]
        if self.byte_tokens:
            return bytes(i for i in plain if i < 256).decode("utf-8", errors="replace")
        return "".join(chr(i) for i in plain)

    def render_chat(self, system: str | None, turns: Sequence[ChatTurn]) -> list[int]:
        ids: list[int] = []
        if system is not None:
            ids += [SYSTEM, *self.encode(system), END]
        for turn in turns:
            ids += [_ROLE_MARKER[turn.role], *self.encode(turn.content), END]
        ids.append(ASSISTANT)
        return ids

    def render_text(self, ids: Sequence[int]) -> str:
        """The prompt as text with the markers spelled out (what ``added`` records)."""
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in MARKERS:
                out.append(self.decode(run))
                run = []
                out.append(MARKERS[i])
            else:
                run.append(i)
        out.append(self.decode(run))
        return "".join(out)

    def last_user_text(self, prompt_ids: Sequence[int]) -> str:
        """The last user turn of a rendered chat; the whole prompt text if there is none."""
        ids = list(prompt_ids)
        if USER not in ids:
            return self.decode(ids)
        start = len(ids) - ids[::-1].index(USER)
        end = ids.index(END, start) if END in ids[start:] else len(ids)
        return self.decode(ids[start:end])

    def reply_tokens(self, prompt_ids: Sequence[int]) -> list[int]:
        """The tokens `add`/`step` will produce for this prompt, EOS included."""
        return [*self.encode(self.reply(self.last_user_text(prompt_ids))), EOS]

    # ------------------------------------------------------------------ test controls

    def pause(self) -> None:
        """Make `step` block (for at most 10 s) until `resume`."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    # ------------------------------------------------------------------ scheduler-thread side

    def _check_thread(self, what: str) -> None:
        if self._thread_id is not None and threading.get_ident() != self._thread_id:
            self.thread_errors.append(f"{what} called from thread {threading.current_thread().name}")

    def on_thread_start(self) -> None:
        self.thread_starts += 1
        self._thread_id = threading.get_ident()

    def add(self, requests: Sequence[tuple[int, Sequence[int], SamplingParams]]) -> dict[int, int]:
        self._check_thread("add")
        with self._lock:
            # Validate everything first: a failed add changes nothing.
            for seq_id, prompt, _ in requests:
                if seq_id in self._seqs:
                    raise FakeEngineError(f"seq {seq_id} is already active")
                if not prompt:
                    raise FakeEngineError(f"seq {seq_id} has an empty prompt")
                if len(prompt) >= self._context_length:
                    raise FakeEngineError(f"seq {seq_id}: prompt of {len(prompt)} tokens fills the context")
                if self.fail_on is not None and self.fail_on in self.last_user_text(prompt):
                    raise FakeEngineError(f"seq {seq_id}: told to fail on {self.fail_on!r}")
            first: dict[int, int] = {}
            self.add_calls.append([seq_id for seq_id, _, _ in requests])
            for seq_id, prompt, sampling in requests:
                tokens = self.reply_tokens(prompt)
                self._seqs[seq_id] = (tokens, 1)
                first[seq_id] = tokens[0]
                self.added.append(self.render_text(prompt))
                self.added_ids.append(list(prompt))
                self.samplings.append(sampling)
            self.max_active = max(self.max_active, len(self._seqs))
            return first

    def step(self) -> dict[int, int]:
        self._check_thread("step")
        if not self._running.wait(timeout=10.0):
            raise FakeEngineError("paused for more than 10 s")
        if self.step_delay:
            time.sleep(self.step_delay)
        with self._lock:
            if self.fail_step_after is not None and self.steps >= self.fail_step_after:
                raise FakeEngineError(f"step failed after {self.steps} steps")
            self.steps += 1
            self.step_sizes.append(len(self._seqs))
            out: dict[int, int] = {}
            for seq_id, (tokens, pos) in self._seqs.items():
                # Past the reply the fake keeps emitting EOS, as a model would emit something.
                out[seq_id] = tokens[pos] if pos < len(tokens) else EOS
                self._seqs[seq_id] = (tokens, pos + 1)
            return out

    def remove(self, seq_ids: Sequence[int]) -> None:
        """Unknown ids are ignored (removing after a failed `add` is allowed)."""
        self._check_thread("remove")
        with self._lock:
            self.removed.append(list(seq_ids))
            if self.fail_remove:
                self._seqs.clear()
                raise FakeEngineError("remove failed; every sequence is dropped")
            for seq_id in seq_ids:
                if self._seqs.pop(seq_id, None) is not None:
                    self.removed_at_step[seq_id] = self.steps
