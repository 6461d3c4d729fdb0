"""The model worker: one scheduler thread owns the `Engine`; each request streams to
the event loop through its own queue.

The thread runs continuous batching: at every step boundary it admits waiting
requests first-come first-served while the batch has room (`Engine.add`), runs one
batched decode step (`Engine.step`), hands the new text of every request to the event
loop in one callback, and removes finished or cancelled sequences (`Engine.remove`).
Tokens are detokenized incrementally in the thread, so multi-byte characters and
word pieces arrive whole, and text that might start a stop string is held back until
it is decided.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from bot.errors import BusyError, ConfigError, GenerationCancelled, GenerationError
from bot.events import ChatTurn
from bot.ports import Engine, FinishReason, GenerationParams, ReplyChunk, WorkerStats

logger = logging.getLogger(__name__)

THREAD_NAME: Final = "model-scheduler"
# Prompt tokens decoded with the reply so the first piece gets its leading space right
# (SentencePiece-style tokenizers drop it when a token is decoded alone).
_DETOK_CONTEXT: Final = 5
_REPLACEMENT: Final = "\ufffd"


@dataclass(frozen=True, slots=True)
class _Text:
    """New text, and how many tokens the request had generated when it was decoded."""

    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class _End:
    """The stream's last item: `error` is None for a normal end."""

    error: BaseException | None = None
    finish_reason: FinishReason = "stop"
    tokens: int = 0


_Item = _Text | _End


class _Channel:
    """The event-loop half of a request: items arrive via `loop.call_soon_threadsafe`."""

    __slots__ = ("closed", "loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.closed = False  # touched on the loop only

    def put(self, item: _Item) -> None:
        """Loop side. Nothing goes in after the end (e.g. after shutdown ended it)."""
        if self.closed:
            return
        if isinstance(item, _End):
            self.closed = True
        self.queue.put_nowait(item)


class _Request:
    """One generation. The scheduler thread owns everything but `cancelled`, which is
    set under the worker's lock by the loop side."""

    def __init__(self, seq_id: int, prompt: list[int], params: GenerationParams, channel: _Channel) -> None:
        self.seq_id = seq_id
        self.prompt = prompt
        self.params = params
        self.channel = channel
        self.cancelled = False
        self.finished = False
        self.generated: list[int] = []
        # Incremental detokenization over `ids` (a little prompt context + reply).
        tail = prompt[-_DETOK_CONTEXT:]
        self.ids: list[int] = list(tail)
        self.prefix_offset = 0
        self.read_offset = len(tail)
        self.held = ""  # decoded text not yet sent (might be the start of a stop string)


class Worker:
    """Implements `bot.ports.Generator` on top of an `Engine`.

    Use as ``async with Worker(engine) as worker:``; leaving the block cancels every
    waiting and running request (their streams raise `GenerationCancelled`) and joins
    the scheduler thread without blocking the event loop.
    """

    def __init__(self, engine: Engine, *, max_batch_size: int = 8, queue_size: int = 64) -> None:
        if max_batch_size < 1:
            raise ConfigError("max_batch_size", "must be at least 1")
        if queue_size < 1:
            raise ConfigError("queue_size", "must be at least 1")
        self._engine = engine
        self._max_batch = max_batch_size
        self._queue_size = queue_size
        self._eos = engine.eos_token_ids
        self._stops = tuple(s for s in engine.stop_strings if s)

        self._cond = threading.Condition()
        # Guarded by _cond:
        self._pending: deque[_Request] = deque()
        self._live: set[_Request] = set()  # pending or active, not yet ended
        self._stopping = False
        self._dead: BaseException | None = None
        self._n_active = 0
        self._tokens = 0
        self._busy_s = 0.0
        self._busy_since: float | None = None

        self._seq_ids = itertools.count(1)
        self._active: dict[int, _Request] = {}  # scheduler thread only
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Worker:
        if self._thread is not None:
            raise RuntimeError("a Worker can be started only once")
        self._thread = threading.Thread(target=self._thread_main, name=THREAD_NAME, daemon=True)
        self._thread.start()
        try:
            await asyncio.to_thread(self._ready.wait)
        except BaseException:
            with self._cond:  # cancelled while starting: let the thread end on its own
                self._stopping = True
                self._cond.notify_all()
            raise
        if self._start_error is not None:
            await asyncio.to_thread(self._thread.join)
            raise GenerationError(f"the model thread failed to start: {self._start_error!r}") from self._start_error
        logger.info("model worker started (max batch %d, queue %d)", self._max_batch, self._queue_size)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._cond:
            self._stopping = True
            doomed = list(self._live)
            self._live.clear()
            self._pending.clear()
            for req in doomed:
                req.cancelled = True
            self._cond.notify_all()
        # End the streams now rather than after the thread's current step.
        loop = asyncio.get_running_loop()
        for req in doomed:
            _deliver_from_loop(loop, req.channel, _End(GenerationCancelled("the bot is shutting down")))
        if doomed:
            logger.info("model worker stopping: cancelled %d request(s)", len(doomed))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        logger.info("model worker stopped")

    # ------------------------------------------------------------------ ModelBackend

    @property
    def context_length(self) -> int:
        """The model's context window in tokens (prompt + reply)."""
        return self._engine.context_length

    async def count_tokens(self, text: str) -> int:
        """Tokens in `text`, counted off the event loop."""
        return len(await asyncio.to_thread(self._engine.encode, text))

    async def render_prompt(self, system: str | None, turns: Sequence[ChatTurn]) -> list[int]:
        """The chat rendered by the engine's template, off the event loop."""
        return await asyncio.to_thread(self._engine.render_chat, system, list(turns))

    async def generate(self, prompt_ids: Sequence[int], params: GenerationParams) -> AsyncGenerator[ReplyChunk, None]:
        """Stream the reply as `ReplyChunk`s; the last one says why it ended.

        Raises `BusyError` (queue full) or `GenerationError` (prompt fills the context,
        the model failed) at the latest on the first ``__anext__``; `GenerationCancelled`
        when the worker shuts down. Closing the generator or cancelling the task that
        iterates it cancels the request.
        """
        req = self._submit(list(prompt_ids), params)
        queue = req.channel.queue
        counted = 0  # tokens already reported to the consumer
        try:
            while True:
                item = await queue.get()
                # Text that piled up while the consumer was busy goes out as one piece:
                # one send or edit for it instead of one per token.
                pieces: list[str] = []
                tokens = counted
                while isinstance(item, _Text):
                    pieces.append(item.text)
                    tokens = item.tokens
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if isinstance(item, _End):
                    if item.error is not None:
                        raise item.error
                    yield ReplyChunk("".join(pieces), max(item.tokens, tokens) - counted, item.finish_reason)
                    return
                yield ReplyChunk("".join(pieces), tokens - counted)
                counted = tokens
        finally:
            self._cancel(req)

    def stats(self) -> WorkerStats:
        """Waiting and running requests, tokens so far, and tokens per busy second."""
        with self._cond:
            busy = self._busy_s
            if self._busy_since is not None:
                busy += time.monotonic() - self._busy_since
            return WorkerStats(
                queue_depth=len(self._pending),
                active=self._n_active,
                tokens_generated=self._tokens,
                tokens_per_s=self._tokens / busy if busy > 0 else 0.0,
            )

    # ------------------------------------------------------------------ loop side

    def _submit(self, prompt: list[int], params: GenerationParams) -> _Request:
        if not prompt:
            raise GenerationError("empty prompt")
        if params.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
        if len(prompt) + 1 > self.context_length:
            raise GenerationError(
                f"prompt of {len(prompt)} tokens leaves no room in a context of {self.context_length}"
            )
        channel = _Channel(asyncio.get_running_loop())
        with self._cond:
            if self._dead is not None:
                raise GenerationError("the model thread has stopped") from self._dead
            if self._thread is None or self._stopping:
                raise GenerationCancelled("the model worker is not running")
            if len(self._pending) >= self._queue_size:
                raise BusyError(f"{len(self._pending)} requests waiting")
            req = _Request(next(self._seq_ids), prompt, params, channel)
            self._pending.append(req)
            self._live.add(req)
            self._cond.notify()
        return req

    def _cancel(self, req: _Request) -> None:
        """Stop a request that ended or whose consumer went away (idempotent)."""
        with self._cond:
            if req not in self._live:
                return
            self._live.discard(req)
            req.cancelled = True
            try:
                self._pending.remove(req)
            except ValueError:
                pass  # active: the scheduler removes it at the next step boundary
        req.channel.closed = True
        logger.debug("request %d cancelled by its consumer", req.seq_id)

    # ------------------------------------------------------------------ scheduler thread

    def _thread_main(self) -> None:
        try:
            self._engine.on_thread_start()
        except BaseException as exc:
            logger.exception("model thread set-up failed")
            self._start_error = exc
            with self._cond:
                self._dead = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while self._run_once():
                pass
        except BaseException as exc:
            logger.exception("model scheduler thread died")
            self._die(exc)
        finally:
            self._shutdown_rows()

    def _run_once(self) -> bool:
        """One step boundary: admit, step, deliver, remove. False when stopping."""
        with self._cond:
            while not self._stopping and not self._pending and not self._active:
                self._cond.wait()
            if self._stopping:
                return False
            admits: list[_Request] = []
            while self._pending and len(self._active) + len(admits) < self._max_batch:
                admits.append(self._pending.popleft())
            if admits and self._busy_since is None:
                self._busy_since = time.monotonic()
        if admits:
            self._admit(admits)
        self._reap()
        if self._active:
            self._step()
            self._reap()
        return True

    def _admit(self, admits: list[_Request]) -> None:
        batch = [r for r in admits if not r.cancelled]
        try:
            if not batch:
                return
            for req in batch:
                if self._engine.decode(req.ids).endswith(_REPLACEMENT):
                    req.ids, req.read_offset = [], 0  # the prompt tail ends mid-character
            first = self._add(batch)
            deliveries: list[tuple[_Request, _Item]] = []
            for req in batch:
                if req.seq_id not in first:
                    continue
                self._active[req.seq_id] = req
                self._on_token(req, first[req.seq_id], deliveries)
            self._deliver(deliveries)
        finally:
            self._set_active_count()

    def _add(self, batch: list[_Request]) -> dict[int, int]:
        """`Engine.add` the batch; when it fails, add one by one to isolate the bad one."""
        try:
            first = self._engine.add([(r.seq_id, r.prompt, r.params.sampling) for r in batch])
        except Exception:
            if len(batch) == 1:
                logger.exception("could not start generation %d", batch[0].seq_id)
                self._forget_rows([batch[0].seq_id])
                self._fail([batch[0]], "the model could not start this reply")
                return {}
            logger.warning("batched add of %d requests failed; adding them one by one", len(batch), exc_info=True)
            self._forget_rows([r.seq_id for r in batch])
            first = {}
            for req in batch:
                first.update(self._add([req]))
            return first
        missing = [r for r in batch if r.seq_id not in first]
        if missing:
            logger.error("engine.add returned no first token for %s", [r.seq_id for r in missing])
            self._forget_rows([r.seq_id for r in missing])
            self._fail(missing, "the model returned no token")
        return first

    def _step(self) -> None:
        try:
            tokens = self._engine.step()
        except Exception:
            failed = list(self._active.values())
            logger.exception("batched decode step failed; failing %d request(s)", len(failed))
            self._active.clear()
            self._set_active_count()
            self._forget_rows([r.seq_id for r in failed])
            self._fail(failed, "the model failed during generation")
            return
        deliveries: list[tuple[_Request, _Item]] = []
        for seq_id, req in list(self._active.items()):
            if req.finished or req.cancelled:
                continue
            token = tokens.get(seq_id)
            if token is None:
                logger.error("engine.step returned no token for request %d", seq_id)
                req.finished = True
                deliveries.append((req, _End(GenerationError("the model returned no token"))))
                continue
            self._on_token(req, token, deliveries)
        self._deliver(deliveries)

    def _reap(self) -> None:
        """Remove finished and cancelled sequences from the engine, all at once."""
        gone = [seq_id for seq_id, r in self._active.items() if r.finished or r.cancelled]
        if not gone:
            return
        for seq_id in gone:
            del self._active[seq_id]
        self._set_active_count()
        self._forget_rows(gone)

    def _forget_rows(self, seq_ids: list[int]) -> None:
        try:
            self._engine.remove(seq_ids)
        except Exception:
            logger.exception("engine.remove(%s) failed", seq_ids)

    def _set_active_count(self) -> None:
        # Ended streams stop counting before their rows are removed, so that a consumer
        # that has seen its stream end never sees itself in `stats().active`.
        running = sum(1 for r in self._active.values() if not (r.finished or r.cancelled))
        with self._cond:
            self._n_active = running
            if not running and self._busy_since is not None:
                self._busy_s += time.monotonic() - self._busy_since
                self._busy_since = None

    # ------------------------------------------------------------------ tokens → text

    def _on_token(self, req: _Request, token: int, out: list[tuple[_Request, _Item]]) -> None:
        """Account one new token of `req`; appends what its consumer should get to `out`."""
        with self._cond:
            self._tokens += 1
        if req.cancelled:
            return
        req.generated.append(token)
        if token in self._eos:
            self._finish(req, out, "stop")
            return
        req.ids.append(token)
        piece = self._detokenize(req)
        if piece and self._emit(req, piece, out):
            return  # a stop string ended it
        if (
            len(req.generated) >= req.params.max_new_tokens
            or len(req.prompt) + len(req.generated) >= self.context_length
        ):
            self._finish(req, out, "length")

    def _detokenize(self, req: _Request) -> str:
        """The new text the last token completes (prefix/read-offset technique)."""
        decode = self._engine.decode
        prefix = decode(req.ids[req.prefix_offset : req.read_offset])
        text = decode(req.ids[req.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(_REPLACEMENT):
            req.prefix_offset = req.read_offset
            req.read_offset = len(req.ids)
            return text[len(prefix) :]
        return ""

    def _emit(self, req: _Request, piece: str, out: list[tuple[_Request, _Item]]) -> bool:
        """Send `piece` minus anything that may start a stop string; True if a stop string ended it."""
        held = req.held + piece
        cut = min((i for i in (held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            req.held = ""
            if cut:
                out.append((req, _Text(held[:cut], len(req.generated))))
            req.finished = True
            out.append((req, _End(finish_reason="stop", tokens=len(req.generated))))
            return True
        keep = _stop_prefix_len(held, self._stops)
        ready = held[: len(held) - keep]
        req.held = held[len(held) - keep :]
        if ready:
            out.append((req, _Text(ready, len(req.generated))))
        return False

    def _finish(self, req: _Request, out: list[tuple[_Request, _Item]], reason: FinishReason) -> None:
        # Text still undecoded (an incomplete character at a length limit) is dropped.
        tail = self._engine.decode(req.ids[req.prefix_offset :])
        prefix = self._engine.decode(req.ids[req.prefix_offset : req.read_offset])
        rest = tail[len(prefix) :].rstrip(_REPLACEMENT) if len(tail) > len(prefix) else ""
        if not (rest and self._emit(req, rest, out)):
            if req.held:
                out.append((req, _Text(req.held, len(req.generated))))
                req.held = ""
            req.finished = True
            out.append((req, _End(finish_reason=reason, tokens=len(req.generated))))

    # ------------------------------------------------------------------ delivery

    def _deliver(self, deliveries: list[tuple[_Request, _Item]]) -> None:
        """Hand a step's output to the event loop(s): one callback per loop."""
        if not deliveries:
            return
        if any(isinstance(item, _End) for _, item in deliveries):
            self._set_active_count()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Channel, _Item]]] = {}
        for req, item in deliveries:
            if isinstance(item, _End):
                with self._cond:
                    self._live.discard(req)
            by_loop.setdefault(req.channel.loop, []).append((req.channel, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_dispatch, items)
            except RuntimeError:
                logger.debug("event loop closed; dropped %d stream item(s)", len(items))

    def _fail(self, reqs: list[_Request], detail: str) -> None:
        # One exception object per stream: each consumer's traceback is its own.
        for req in reqs:
            req.finished = True
        self._deliver([(r, _End(GenerationError(detail))) for r in reqs])

    def _die(self, exc: BaseException) -> None:
        """The thread is going down unexpectedly: no stream may hang."""
        with self._cond:
            self._dead = exc
            doomed = [r for r in self._live if not r.cancelled]
            self._pending.clear()
        self._fail(doomed, "the model stopped working")

    def _shutdown_rows(self) -> None:
        """Free the engine's rows of whatever is still active as the thread exits."""
        if self._active:
            rows = list(self._active)
            self._active.clear()
            self._forget_rows(rows)
        with self._cond:
            self._n_active = 0
            if self._busy_since is not None:
                self._busy_s += time.monotonic() - self._busy_since
                self._busy_since = None


def _dispatch(items: list[tuple[_Channel, _Item]]) -> None:
    for channel, item in items:
        channel.put(item)


def _deliver_from_loop(loop: asyncio.AbstractEventLoop, channel: _Channel, item: _Item) -> None:
    if channel.loop is loop:
        channel.put(item)
    else:
        try:
            channel.loop.call_soon_threadsafe(channel.put, item)
        except RuntimeError:
            pass  # that loop is closed; nobody is waiting


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
