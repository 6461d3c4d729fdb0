"""The model worker: one scheduler thread owns the `Engine`; each request streams to
the event loop through its own `streams.Channel`.

The thread runs continuous batching: at every step boundary it admits waiting
requests first-come first-served while the batch has room (`Engine.add`), runs one
batched decode step (`Engine.step`), hands the new text of every request to the event
loop in one callback, and removes finished or cancelled sequences (`Engine.remove`).
Tokens become text in the thread, through each request's `Detokenizer`.
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
from typing import Final

from bot.errors import BusyError, GenerationCancelled, GenerationError
from bot.events import ChatTurn
from bot.model.detokenizer import Detokenizer
from bot.model.streams import Channel, End, Item, Text, send, send_from_loop
from bot.ports import Engine, FinishReason, GenerationParams, RenderedPrompt, ReplyChunk, WorkerStats

logger = logging.getLogger(__name__)

THREAD_NAME: Final = "model-scheduler"


@dataclass(eq=False, slots=True)  # eq=False: requests are kept in sets by identity
class _Request:
    """One generation. The scheduler thread owns everything but `cancelled`, which is
    set under the worker's lock by the loop side."""

    seq_id: int
    prompt: list[int]
    params: GenerationParams
    channel: Channel
    text: Detokenizer
    cancelled: bool = False
    finished: bool = False
    generated: int = 0  # tokens so far


class Worker:
    """Implements `bot.ports.ModelBackend` on top of an `Engine`.

    Use as ``async with Worker(engine) as worker:``; leaving the block cancels every
    waiting and running request (their streams raise `GenerationCancelled`) and joins
    the scheduler thread without blocking the event loop.
    """

    def __init__(
        self, engine: Engine, *, max_batch_size: int = 8, queue_size: int = 64, model_name: str = "the local model"
    ) -> None:
        """`max_batch_size` and `queue_size` are at least 1 (`bot.config.Settings` checks them);
        `model_name` is what `/model` shows."""
        self._engine = engine
        self._model_name = model_name
        self._max_batch = max_batch_size
        self._queue_size = queue_size
        self._eos = engine.eos_token_ids
        self._stops = engine.stop_strings

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

    async def __aexit__(self, *_: object) -> None:
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
            send_from_loop(loop, req.channel, End(GenerationCancelled("the bot is shutting down")))
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

    @property
    def model_name(self) -> str:
        return self._model_name

    async def models(self) -> None:
        """The worker serves the one model it was started with."""
        return None

    async def render_prompt(self, system: str | None, turns: Sequence[ChatTurn]) -> list[int]:
        """The chat rendered by the engine's template, off the event loop."""
        return await asyncio.to_thread(self._engine.render_chat, system, list(turns))

    async def render(self, system: str | None, turns: Sequence[ChatTurn]) -> RenderedPrompt:
        """`render_prompt` as the `ModelBackend` port's `RenderedPrompt`."""
        ids = await self.render_prompt(system, turns)
        return RenderedPrompt(system, tuple(turns), len(ids), tuple(ids))

    async def generate(
        self, prompt: RenderedPrompt | Sequence[int], params: GenerationParams
    ) -> AsyncGenerator[ReplyChunk, None]:
        """Stream the reply as `ReplyChunk`s; the last one says why it ended. `prompt`
        is a `render` result or token ids; `params.model` is ignored (there is one).

        Raises `BusyError` (queue full) or `GenerationError` (prompt fills the context,
        the model failed) at the latest on the first ``__anext__``; `GenerationCancelled`
        when the worker shuts down. Closing the generator or cancelling the task that
        iterates it cancels the request.
        """
        ids = prompt.ids if isinstance(prompt, RenderedPrompt) else prompt
        req = self._submit(list(ids), params)
        try:
            while True:
                chunk = await req.channel.receive()
                yield chunk
                if chunk.finish_reason is not None:
                    return
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

    def _submit(self, prompt: list[int], params: GenerationParams) -> _Request:
        if not prompt:
            raise GenerationError("empty prompt")
        if params.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
        if len(prompt) + 1 > self.context_length:
            raise GenerationError(
                f"prompt of {len(prompt)} tokens leaves no room in a context of {self.context_length}"
            )
        channel, text = (
            Channel(asyncio.get_running_loop()),
            Detokenizer(self._engine.decode, prompt, (*self._stops, *params.stop)),
        )
        with self._cond:
            if self._dead is not None:
                raise GenerationError("the model thread has stopped") from self._dead
            if self._thread is None or self._stopping:
                raise GenerationCancelled("the model worker is not running")
            if len(self._pending) >= self._queue_size:
                raise BusyError(f"{len(self._pending)} requests waiting")
            req = _Request(next(self._seq_ids), prompt, params, channel, text)
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
        req.channel.close()
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
            first = self._add(batch)
            deliveries: list[tuple[_Request, Item]] = []
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
        deliveries: list[tuple[_Request, Item]] = []
        for seq_id, req in list(self._active.items()):
            if req.finished or req.cancelled:
                continue
            token = tokens.get(seq_id)
            if token is None:
                logger.error("engine.step returned no token for request %d", seq_id)
                req.finished = True
                deliveries.append((req, End(GenerationError("the model returned no token"))))
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
            # The engine has dropped every sequence: the replies still running end now.
            lost = [r for r in self._active.values() if not (r.finished or r.cancelled)]
            logger.exception("engine.remove(%s) failed; failing %d running request(s)", seq_ids, len(lost))
            self._active.clear()
            self._set_active_count()
            self._fail(lost, "the model failed during generation")

    def _set_active_count(self) -> None:
        # Ended streams stop counting before their rows are removed, so that a consumer
        # that has seen its stream end never sees itself in `stats().active`.
        running = sum(1 for r in self._active.values() if not (r.finished or r.cancelled))
        with self._cond:
            self._n_active = running
            if not running and self._busy_since is not None:
                self._busy_s += time.monotonic() - self._busy_since
                self._busy_since = None

    def _on_token(self, req: _Request, token: int, out: list[tuple[_Request, Item]]) -> None:
        """Account one new token of `req`; appends what its consumer should get to `out`."""
        with self._cond:
            self._tokens += 1
        if req.cancelled:
            return
        req.generated += 1
        if token in self._eos:
            self._finish(req, "stop", out)
            return
        piece = req.text.push(token)
        self._send_text(req, piece.text, out)
        if piece.stopped:
            self._end(req, "stop", out)
        elif req.generated >= req.params.max_new_tokens or len(req.prompt) + req.generated >= self.context_length:
            self._finish(req, "length", out)

    def _finish(self, req: _Request, reason: FinishReason, out: list[tuple[_Request, Item]]) -> None:
        """End the reply with the text still held back (a stop string in it makes the reason "stop")."""
        rest = req.text.flush()
        self._send_text(req, rest.text, out)
        self._end(req, "stop" if rest.stopped else reason, out)

    @staticmethod
    def _send_text(req: _Request, text: str, out: list[tuple[_Request, Item]]) -> None:
        if text:
            out.append((req, Text(text, req.generated)))

    @staticmethod
    def _end(req: _Request, reason: FinishReason, out: list[tuple[_Request, Item]]) -> None:
        req.finished = True
        out.append((req, End(finish_reason=reason, tokens=req.generated)))

    # ------------------------------------------------------------------ delivery

    def _deliver(self, deliveries: list[tuple[_Request, Item]]) -> None:
        """Hand a step's output to the event loop(s)."""
        ended = [req for req, item in deliveries if isinstance(item, End)]
        if ended:
            self._set_active_count()
            with self._cond:
                self._live.difference_update(ended)
        if deliveries:
            send([(req.channel, item) for req, item in deliveries])

    def _fail(self, reqs: list[_Request], detail: str) -> None:
        # One exception object per stream: each consumer's traceback is its own.
        for req in reqs:
            req.finished = True
        self._deliver([(r, End(GenerationError(detail))) for r in reqs])

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
        self._set_active_count()
