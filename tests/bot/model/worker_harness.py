"""Running the real `Worker` over a `FakeEngine`, and reading its streams, in tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable

from bot.events import ChatTurn
from bot.model.scheduler import THREAD_NAME, Worker
from bot.ports import GenerationParams, ReplyChunk
from tests.fakes.fake_engine import FakeEngine

PARAMS = GenerationParams(max_new_tokens=200)


@contextlib.asynccontextmanager
async def running(
    engine: FakeEngine | None = None, *, max_batch_size: int = 8, queue_size: int = 64
) -> AsyncIterator[tuple[Worker, FakeEngine]]:
    """A started `Worker`; afterwards, checks that only its thread drove the engine."""
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
    matches = [seq_id for seq_id, added in zip(ids, engine.added, strict=True) if f"<|user|>{text}<|end|>" in added]
    assert len(matches) == 1, matches
    return matches[0]


async def join(stream: AsyncIterator[ReplyChunk]) -> str:
    """The whole text of a stream."""
    return "".join([piece.text async for piece in stream])


def new_schedulers(before: set[threading.Thread]) -> list[threading.Thread]:
    """Scheduler threads started since `before` was taken and still alive."""
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t not in before]
