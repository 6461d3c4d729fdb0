"""The model worker when streams end early: cancellation, failures and shutdown (and
once over the real model)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING

import pytest

from bot.errors import GenerationCancelled, GenerationError
from bot.events import ChatTurn
from bot.model.scheduler import Worker
from bot.ports import GenerationParams, ReplyChunk
from tests.bot.model.worker_harness import (
    PARAMS,
    join,
    new_schedulers,
    prompt,
    reply,
    running,
    seq_id_of,
    wait_until,
)
from tests.fakes.fake_engine import FakeEngine

if TYPE_CHECKING:
    from bot.model.hf import HFEngine


# --------------------------------------------------------------------------- cancellation


async def test_cancelling_a_consumer_task_removes_it_at_the_next_step() -> None:
    engine = FakeEngine(step_delay=0.005, reply=lambda t: t * 4)
    async with running(engine) as (worker, _):
        started = asyncio.Event()

        async def consume_then_hang(text: str) -> str:
            out = ""
            async for piece in worker.generate(await prompt(worker, text), PARAMS):
                out += piece.text
                started.set()
            return out

        keep = [asyncio.create_task(consume_then_hang(t), name=t) for t in ("aaaaaaaaaa", "bbbbbbbbbb")]
        victim = asyncio.create_task(consume_then_hang("cccccccccc"), name="victim")
        await started.wait()
        await wait_until(lambda: len(engine.added) == 3)
        victim_id = seq_id_of(engine, "cccccccccc")
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        steps_at_cancel = engine.steps
        await wait_until(lambda: victim_id not in engine.active)
        assert engine.removed_at_step[victim_id] <= steps_at_cancel + 1
        assert await asyncio.gather(*keep) == ["aaaaaaaaaa" * 4, "bbbbbbbbbb" * 4]
        assert worker.stats().active == 0


async def test_breaking_out_of_the_loop_cancels_the_request() -> None:
    engine = FakeEngine(step_delay=0.005, reply=lambda _: "x" * 300)
    async with running(engine) as (worker, _):
        ids = await prompt(worker, "hi")
        async for _piece in worker.generate(ids, PARAMS):
            break
        # The abandoned generator is closed by asyncio's finalizer hook.
        await wait_until(lambda: engine.active == frozenset() and len(engine.removed_at_step) == 1)
        assert engine.steps < 50


async def test_aclose_cancels_a_pending_request_before_it_reaches_the_engine() -> None:
    engine = FakeEngine(step_delay=0.002)
    async with running(engine, max_batch_size=1) as (worker, _):
        engine.pause()
        first = asyncio.create_task(reply(worker, "first"), name="first")
        await wait_until(lambda: len(engine.added) == 1)
        waiting = worker.generate(await prompt(worker, "dropped"), PARAMS)

        async def first_piece() -> ReplyChunk:
            return await anext(waiting)

        waiting_task = asyncio.create_task(first_piece(), name="waiting")
        await wait_until(lambda: worker.stats().queue_depth == 1)
        waiting_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting_task
        assert worker.stats().queue_depth == 0
        engine.resume()
        assert await first == "Echo: first"
        assert await reply(worker, "after") == "Echo: after"
    assert not any("dropped" in added for added in engine.added)


# --------------------------------------------------------------------------- failures


async def test_one_failing_request_fails_alone() -> None:
    engine = FakeEngine(fail_on="boom", step_delay=0.001)
    async with running(engine) as (worker, _):
        engine.pause()
        blocker = asyncio.create_task(reply(worker, "blocker"), name="blocker")
        await wait_until(lambda: len(engine.added) == 1)
        # These three queue up and are then admitted together in one batched add.
        results = asyncio.gather(
            reply(worker, "fine one"), reply(worker, "boom here"), reply(worker, "fine two"), return_exceptions=True
        )
        await wait_until(lambda: worker.stats().queue_depth == 3)
        engine.resume()
        ok1, failed, ok2 = await results
        assert await blocker == "Echo: blocker"
    assert ok1 == "Echo: fine one"
    assert ok2 == "Echo: fine two"
    assert isinstance(failed, GenerationError)
    assert engine.active == frozenset()
    assert not any("boom" in added for added in engine.added)


async def test_failing_step_fails_active_requests_and_the_worker_recovers() -> None:
    engine = FakeEngine(fail_step_after=3)
    async with running(engine) as (worker, _):
        results = await asyncio.gather(reply(worker, "one"), reply(worker, "two"), return_exceptions=True)
        assert all(isinstance(r, GenerationError) for r in results), results
        assert engine.active == frozenset()
        engine.fail_step_after = None
        assert await reply(worker, "three") == "Echo: three"
        assert worker.stats().active == 0


async def test_failing_remove_fails_the_replies_still_running_and_the_worker_recovers() -> None:
    engine = FakeEngine(step_delay=0.005, reply=lambda t: "x" * (2 if t == "short" else 100))
    async with running(engine) as (worker, _):
        engine.fail_remove = True  # the short reply's removal fails: the engine drops both
        short, long = await asyncio.gather(reply(worker, "short"), reply(worker, "long"), return_exceptions=True)
        assert short == "xx"
        assert isinstance(long, GenerationError), long
        assert engine.active == frozenset() and worker.stats().active == 0
        engine.fail_remove = False
        assert await reply(worker, "again") == "x" * 100


class _DyingEngine(FakeEngine):
    """Its step raises something the scheduler does not expect to handle."""

    def step(self) -> dict[int, int]:
        raise _ThreadKiller


class _ThreadKiller(BaseException):
    pass


async def test_dead_scheduler_thread_fails_every_stream_instead_of_hanging() -> None:
    engine = _DyingEngine()
    async with running(engine, max_batch_size=1) as (worker, _):
        results = await asyncio.wait_for(
            asyncio.gather(reply(worker, "a"), reply(worker, "b"), return_exceptions=True), timeout=2.0
        )
        assert all(isinstance(r, GenerationError) for r in results), results
        with pytest.raises(GenerationError):
            await reply(worker, "c")


class _BrokenThreadEngine(FakeEngine):
    def on_thread_start(self) -> None:
        raise RuntimeError("no threads for you")


async def test_worker_whose_thread_cannot_start_refuses_to_enter() -> None:
    before = set(threading.enumerate())
    worker = Worker(_BrokenThreadEngine())
    with pytest.raises(GenerationError):
        async with worker:
            pytest.fail("entered a worker without a model thread")
    assert not new_schedulers(before)


# --------------------------------------------------------------------------- shutdown


async def test_shutdown_cancels_in_flight_requests_and_joins_the_thread() -> None:
    engine = FakeEngine(step_delay=0.01, reply=lambda _: "y" * 500)
    worker = Worker(engine, max_batch_size=2)
    before = set(threading.enumerate())
    async with worker:
        assert len(new_schedulers(before)) == 1
        streams = [worker.generate(await prompt(worker, t), PARAMS) for t in ("a", "b", "c")]
        tasks = [asyncio.create_task(join(s), name="consumer") for s in streams]
        await wait_until(lambda: len(engine.added) == 2 and engine.steps > 2)
        assert worker.stats().queue_depth == 1
        started = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=1.0)
    assert time.monotonic() - started < 0.5
    assert all(isinstance(r, GenerationCancelled) for r in results), results
    assert not new_schedulers(before)
    assert engine.active == frozenset()
    with pytest.raises(GenerationCancelled):
        await reply(worker, "too late")


# --------------------------------------------------------------------------- the real model


@pytest.mark.model
async def test_real_model_streams_a_reply_and_stops_when_cancelled(default_engine: HFEngine) -> None:
    async with Worker(default_engine, max_batch_size=2) as worker:
        ids = await worker.render_prompt(None, [ChatTurn("user", "Say hello in one short sentence.")])
        text = "".join([p.text async for p in worker.generate(ids, GenerationParams(max_new_tokens=24))])
        assert text.strip()
        assert "\ufffd" not in text

        before = worker.stats().tokens_generated
        long_ids = await worker.render_prompt(None, [ChatTurn("user", "Write a very long story about a cat.")])
        stream = worker.generate(long_ids, GenerationParams(max_new_tokens=400))
        got: list[ReplyChunk] = []
        async for piece in stream:
            got.append(piece)
            if len(got) == 3:
                break
        await stream.aclose()
        await wait_until(lambda: worker.stats().active == 0, timeout=5.0)
        assert worker.stats().tokens_generated - before < 20
        # the worker still serves after a cancellation
        again = "".join([p.text async for p in worker.generate(ids, GenerationParams(max_new_tokens=24))])
        assert again == text  # greedy: same prompt, same reply
