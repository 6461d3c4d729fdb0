"""The model worker over the deterministic fake engine: streaming, batching, back-pressure and stats."""

from __future__ import annotations

import asyncio
import time

import pytest

from bot.errors import BusyError, GenerationError
from bot.ports import GenerationParams, ReplyChunk
from tests.bot.model.worker_harness import PARAMS, join, pieces, prompt, reply, running, wait_until
from tests.fakes.fake_engine import FakeEngine

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


async def test_a_reply_cut_by_a_stop_string_ends_with_reason_stop() -> None:
    engine = FakeEngine(stop_strings=("\nUser:",), reply=lambda _: "Sure.\nUser: and more")
    async with running(engine) as (worker, _):
        chunks = [c async for c in worker.generate(await prompt(worker, "x"), PARAMS)]
    assert "".join(c.text for c in chunks) == "Sure."
    assert sum(c.tokens for c in chunks) == len("Sure.\nUser:")  # up to the token that completed the stop
    assert chunks[-1].finish_reason == "stop"


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
            tasks.append(asyncio.create_task(join(worker.generate(i, PARAMS)), name="consumer"))
            await asyncio.sleep(0)  # each request enqueued before the next one
        await wait_until(lambda: worker.stats().queue_depth + len(engine.added) == 8)
        engine.resume()
        assert await asyncio.gather(*tasks) == [f"Echo: {t}" for t in texts]
    assert [added.split("<|user|>")[1].split("<|end|>")[0] for added in engine.added] == texts
    admitted = [seq_id for call in engine.add_calls for seq_id in call]
    assert admitted == sorted(admitted)


# --------------------------------------------------------------------------- back-pressure


async def test_full_queue_raises_busy_immediately() -> None:
    engine = FakeEngine()
    async with running(engine, max_batch_size=1, queue_size=2) as (worker, _):
        engine.pause()
        ids = {t: await prompt(worker, t) for t in ("a", "b", "c", "d")}
        active = asyncio.create_task(join(worker.generate(ids["a"], PARAMS)), name="a")
        await wait_until(lambda: len(engine.added) == 1)
        queued = [asyncio.create_task(join(worker.generate(ids[t], PARAMS)), name=t) for t in ("b", "c")]
        await wait_until(lambda: worker.stats().queue_depth == 2)
        rejected = worker.generate(ids["d"], PARAMS)
        started = time.monotonic()
        with pytest.raises(BusyError):
            await asyncio.wait_for(anext(rejected), timeout=1.0)
        assert time.monotonic() - started < 0.2
        engine.resume()
        assert await asyncio.gather(active, *queued) == ["Echo: a", "Echo: b", "Echo: c"]
        assert await reply(worker, "d") == "Echo: d"  # room again


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
