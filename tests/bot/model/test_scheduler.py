"""The model worker over the deterministic fake engine (and once over the real model)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import pytest

from bot.errors import BusyError, GenerationCancelled, GenerationError
from bot.events import ChatTurn
from bot.model.scheduler import THREAD_NAME, Worker
from bot.ports import GenerationParams, ReplyChunk
from tests.fakes.fake_engine import FakeEngine

if TYPE_CHECKING:
    from bot.model.hf import HFEngine

PARAMS = GenerationParams(max_new_tokens=200)


@contextlib.asynccontextmanager
async def running(
    engine: FakeEngine | None = None, *, max_batch_size: int = 8, queue_size: int = 64
) -> AsyncIterator[tuple[Worker, FakeEngine]]:
    engine = engine or FakeEngine()
    async with Worker(engine, max_batch_size=max_batch_size, queue_size=queue_size) as worker:
        yield worker, engine
    assert engine.thread_errors == []


async def prompt(worker: Worker, text: str) -> list[int]:
    return await worker.render_prompt("be nice", [ChatTurn("user", text)])


async def pieces(worker: Worker, text: str, params: GenerationParams = PARAMS) -> list[str]:
    ids = await prompt(worker, text)
    return [piece.text async for piece in worker.generate(ids, params) if piece.text]


async def reply(worker: Worker, text: str, params: GenerationParams = PARAMS) -> str:
    return "".join(await pieces(worker, text, params))


async def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def seq_id_of(engine: FakeEngine, text: str) -> int:
    """The seq id the engine got for the prompt whose user turn is `text`."""
    ids = [seq_id for call in engine.add_calls for seq_id in call]
    matches = [seq_id for seq_id, added in zip(ids, engine.added) if f"<|user|>{text}<|end|>" in added]
    assert len(matches) == 1, matches
    return matches[0]


# --------------------------------------------------------------------------- streaming


async def test_stream_yields_the_engine_reply_exactly() -> None:
    async with running() as (worker, engine):
        assert await reply(worker, "hello there") == "Echo: hello there"
        assert engine.added == ["<|system|>be nice<|end|><|user|>hello there<|end|><|assistant|>"]
        await wait_until(lambda: engine.active == frozenset())
        assert engine.thread_starts == 1


async def test_multibyte_characters_arrive_whole_from_byte_tokens() -> None:
    text = "héllo 🎉 wörld — 日本語 👩‍👩‍👧"
    # a slow engine: the consumer keeps up, so each step's text is its own piece
    async with running(FakeEngine(byte_tokens=True, reply=lambda t: t, step_delay=0.005)) as (worker, _):
        got = await pieces(worker, text)
    assert "".join(got) == text
    assert all("\ufffd" not in piece for piece in got)
    assert "🎉" in got  # four byte tokens, one piece


async def test_pieces_stream_incrementally_not_all_at_once() -> None:
    async with running(FakeEngine(step_delay=0.005)) as (worker, _):
        got = await pieces(worker, "abc")
    assert got == list("Echo: abc")


async def test_text_that_piles_up_behind_a_slow_consumer_comes_as_one_piece() -> None:
    async with running(FakeEngine(step_delay=0.002)) as (worker, engine):
        stream = worker.generate(await prompt(worker, "abcdefghij"), PARAMS)
        first = await anext(stream)
        await wait_until(lambda: engine.active == frozenset())  # the rest is all queued
        rest = [piece async for piece in stream]
    assert first == ReplyChunk("E", tokens=1)
    # 15 more characters and the EOS token, which ends the stream with its reason
    assert rest == [ReplyChunk("cho: abcdefghij", tokens=16, finish_reason="stop")]


async def test_a_reply_cut_by_its_token_budget_ends_with_reason_length() -> None:
    async with running() as (worker, _engine):
        chunks = [c async for c in worker.generate(await prompt(worker, "hello"), GenerationParams(max_new_tokens=4))]
    assert "".join(c.text for c in chunks) == "Echo"
    assert sum(c.tokens for c in chunks) == 4
    assert chunks[-1].finish_reason == "length"
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_max_new_tokens_is_honoured() -> None:
    async with running() as (worker, engine):
        assert await reply(worker, "hello", GenerationParams(max_new_tokens=4)) == "Echo"
        assert engine.steps == 3  # the first token comes from add
        await wait_until(lambda: engine.active == frozenset())


async def test_eos_ends_the_stream() -> None:
    async with running(FakeEngine(reply=lambda _: "Hi")) as (worker, engine):
        assert await reply(worker, "hello") == "Hi"
        assert engine.steps == 2  # "H" from add, then "i", then EOS
        await wait_until(lambda: engine.active == frozenset())


async def test_stop_string_split_across_tokens_is_cut_and_never_leaked() -> None:
    engine = FakeEngine(stop_strings=("\nUser:",), reply=lambda _: "Sure.\nUser: and more")
    async with running(engine) as (worker, _):
        got = await pieces(worker, "x")
    assert "".join(got) == "Sure."
    assert not any("\n" in piece for piece in got)


async def test_stop_string_made_of_byte_tokens_is_cut() -> None:
    engine = FakeEngine(byte_tokens=True, stop_strings=("🛑",), reply=lambda _: "stop é here🛑 secret")
    async with running(engine) as (worker, _):
        assert await reply(worker, "x") == "stop é here"


async def test_text_held_back_as_a_possible_stop_string_is_sent_when_it_is_not_one() -> None:
    engine = FakeEngine(stop_strings=("\nUser:",), reply=lambda _: "a\nUse it\nUs")
    async with running(engine) as (worker, _):
        assert await reply(worker, "x") == "a\nUse it\nUs"


async def test_context_limit_ends_generation() -> None:
    engine = FakeEngine(context_length=40, reply=lambda _: "z" * 100)
    async with running(engine) as (worker, _):
        ids = await prompt(worker, "hello")
        text = "".join([p.text async for p in worker.generate(ids, PARAMS)])
    assert text == "z" * (40 - len(ids))
    assert engine.active == frozenset()


async def test_prompt_that_fills_the_context_is_refused() -> None:
    async with running(FakeEngine(context_length=20)) as (worker, engine):
        ids = await prompt(worker, "x" * 8)
        assert len(ids) == 20
        with pytest.raises(GenerationError):
            await reply(worker, "x" * 8)
        assert engine.added == []
        assert await reply(worker, "x" * 7, GenerationParams(max_new_tokens=5)) == "E"  # room for one


async def test_count_tokens_and_context_length_come_from_the_engine() -> None:
    async with running(FakeEngine(byte_tokens=True, context_length=123)) as (worker, _):
        assert await worker.count_tokens("aé🎉") == 1 + 2 + 4
        assert worker.context_length == 123


# --------------------------------------------------------------------------- batching


async def test_concurrent_requests_are_batched_up_to_max_batch_size() -> None:
    engine = FakeEngine(step_delay=0.002)
    async with running(engine, max_batch_size=3) as (worker, _):
        texts = [f"request number {i}" for i in range(7)]
        replies = await asyncio.gather(*(reply(worker, t) for t in texts))
    assert replies == [f"Echo: {t}" for t in texts]
    assert engine.max_active == 3
    assert max(engine.step_sizes) == 3
    assert sum(len(call) for call in engine.add_calls) == 7


async def test_request_joining_a_running_batch_starts_before_the_others_finish() -> None:
    engine = FakeEngine(step_delay=0.005, reply=lambda t: t)
    async with running(engine) as (worker, _):
        long_ids = await prompt(worker, "L" * 100)
        long_stream = worker.generate(long_ids, PARAMS)
        first = await anext(long_stream)
        late = worker.generate(await prompt(worker, "late one"), PARAMS)
        late_first = await anext(late)
        rest = "".join([p.text async for p in long_stream])
        assert first.text + rest == "L" * 100
        assert late_first.text == "l"
        assert "".join([p.text async for p in late]) == "ate one"
    # the late request ran in the same batch as the long one
    assert engine.max_active == 2
    assert [len(call) for call in engine.add_calls] == [1, 1]


async def test_admission_is_first_come_first_served() -> None:
    engine = FakeEngine(step_delay=0.001)
    async with running(engine, max_batch_size=2) as (worker, _):
        texts = [f"r{i}" for i in range(8)]
        ids = [await prompt(worker, t) for t in texts]
        engine.pause()
        tasks = []
        for i in ids:
            tasks.append(asyncio.create_task(_join(worker.generate(i, PARAMS)), name="consumer"))
            await asyncio.sleep(0)  # each request enqueued before the next one
        await wait_until(lambda: worker.stats().queue_depth + len(engine.added) == 8)
        engine.resume()
        assert await asyncio.gather(*tasks) == [f"Echo: {t}" for t in texts]
    assert [added.split("<|user|>")[1].split("<|end|>")[0] for added in engine.added] == texts
    admitted = [seq_id for call in engine.add_calls for seq_id in call]
    assert admitted == sorted(admitted)


async def _join(stream: AsyncIterator[ReplyChunk]) -> str:
    return "".join([piece.text async for piece in stream])


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

        async def first_piece() -> str:
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


# --------------------------------------------------------------------------- back-pressure


async def test_full_queue_raises_busy_immediately() -> None:
    engine = FakeEngine()
    async with running(engine, max_batch_size=1, queue_size=2) as (worker, _):
        engine.pause()
        ids = {t: await prompt(worker, t) for t in ("a", "b", "c", "d")}
        active = asyncio.create_task(_join(worker.generate(ids["a"], PARAMS)), name="a")
        await wait_until(lambda: len(engine.added) == 1)
        queued = [asyncio.create_task(_join(worker.generate(ids[t], PARAMS)), name=t) for t in ("b", "c")]
        await wait_until(lambda: worker.stats().queue_depth == 2)
        rejected = worker.generate(ids["d"], PARAMS)
        started = time.monotonic()
        with pytest.raises(BusyError):
            await asyncio.wait_for(anext(rejected), timeout=1.0)
        assert time.monotonic() - started < 0.2
        engine.resume()
        assert await asyncio.gather(active, *queued) == ["Echo: a", "Echo: b", "Echo: c"]
        assert await reply(worker, "d") == "Echo: d"  # room again


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


def _new_schedulers(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t not in before]


class _BrokenThreadEngine(FakeEngine):
    def on_thread_start(self) -> None:
        raise RuntimeError("no threads for you")


async def test_worker_whose_thread_cannot_start_refuses_to_enter() -> None:
    before = set(threading.enumerate())
    worker = Worker(_BrokenThreadEngine())
    with pytest.raises(GenerationError):
        async with worker:
            pytest.fail("entered a worker without a model thread")
    assert not _new_schedulers(before)


# --------------------------------------------------------------------------- shutdown


async def test_shutdown_cancels_in_flight_requests_and_joins_the_thread() -> None:
    engine = FakeEngine(step_delay=0.01, reply=lambda _: "y" * 500)
    worker = Worker(engine, max_batch_size=2)
    before = set(threading.enumerate())
    async with worker:
        assert len(_new_schedulers(before)) == 1
        streams = [worker.generate(await prompt(worker, t), PARAMS) for t in ("a", "b", "c")]
        tasks = [asyncio.create_task(_join(s), name="consumer") for s in streams]
        await wait_until(lambda: len(engine.added) == 2 and engine.steps > 2)
        assert worker.stats().queue_depth == 1
        started = time.monotonic()
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=1.0)
    assert time.monotonic() - started < 0.5
    assert all(isinstance(r, GenerationCancelled) for r in results), results
    assert not _new_schedulers(before)
    assert engine.active == frozenset()
    with pytest.raises(GenerationCancelled):
        await reply(worker, "too late")


# --------------------------------------------------------------------------- loop and stats


async def test_event_loop_is_never_blocked_by_generation() -> None:
    engine = FakeEngine(step_delay=0.02, reply=lambda _: "w" * 40)
    async with running(engine, max_batch_size=2) as (worker, _):
        lags: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                before = time.monotonic()
                await asyncio.sleep(0.005)
                lags.append(time.monotonic() - before - 0.005)

        tick = asyncio.create_task(ticker(), name="ticker")
        await asyncio.gather(*(reply(worker, t) for t in ("a", "b", "c")))
        done.set()
        await tick
    assert len(lags) > 50
    assert max(lags) < 0.1


async def test_stats_count_tokens_queue_and_speed() -> None:
    engine = FakeEngine(step_delay=0.001)
    async with running(engine, max_batch_size=1) as (worker, _):
        assert worker.stats().tokens_generated == 0
        assert worker.stats().tokens_per_s == 0.0
        await asyncio.gather(reply(worker, "abc"), reply(worker, "defg"))
        stats = worker.stats()
    # every reply token plus its EOS
    assert stats.tokens_generated == len("Echo: abc") + len("Echo: defg") + 2
    assert stats.queue_depth == 0
    assert stats.active == 0
    assert 0 < stats.tokens_per_s < 2000  # 1 ms per step bounds it


async def test_sampling_params_reach_the_engine() -> None:
    from bot.ports import SamplingParams

    sampling = SamplingParams(temperature=0.7, top_p=0.9, seed=3)
    async with running() as (worker, engine):
        await reply(worker, "x", GenerationParams(max_new_tokens=3, sampling=sampling))
    assert engine.samplings == [sampling]


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
        got: list[str] = []
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
