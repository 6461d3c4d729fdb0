"""Shared pieces of the benchmarks: the real stack (manager, worker, real model, SQLite
in a temp dir), a reply target that timestamps what the user would see, and an
event-loop lag monitor."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bot.config import Settings, default_cache_dir  # noqa: E402
from bot.core import Core, open_core  # noqa: E402
from bot.events import IncomingMessage  # noqa: E402
from bot.model.native import share_heap_arenas  # noqa: E402

share_heap_arenas()  # as `python -m bot` does first thing: the benchmarks measure the bot


class TimingTarget:
    """A ReplyTarget that records when the first text and the last edit arrived."""

    max_chars = 1_000_000
    edit_interval = 0.0

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.messages: list[str] = []
        self.first_text = asyncio.Event()

    async def send(self, text: str) -> str:
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
            self.first_text.set()
        self.last_at = now
        self.messages.append(text)
        return str(len(self.messages) - 1)

    async def edit(self, message_id: str, text: str) -> None:
        self.last_at = time.perf_counter()
        self.messages[int(message_id)] = text

    async def typing(self) -> None:
        return None

    async def sender_is_chat_admin(self) -> bool:
        return False

    async def send_file(self, filename: str, data: bytes, caption: str) -> str:
        return await self.send(f"{caption} [{filename}: {len(data)} bytes]")

    @property
    def ttft(self) -> float:
        assert self.first_at is not None, "no reply"
        return self.first_at - self.started

    @property
    def text(self) -> str:
        return "\n".join(self.messages)


class LoopLag:
    """A ticker task: how late each 10 ms sleep wakes up is the loop's lag."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.samples.append(max(0.0, time.perf_counter() - before - self.interval))

    def start(self) -> None:
        self._task = asyncio.create_task(self._tick(), name="loop-lag")

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def percentile_ms(self, q: float) -> float:
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def max_ms(self) -> float:
        return 1000 * max(self.samples, default=0.0)


def event(text: str, user: str, message_id: int) -> IncomingMessage:
    return IncomingMessage(
        platform="console",
        chat_id="bench",
        user_id=user,
        display_name=user,
        message_id=str(message_id),
        text=text,
        is_private=True,
        timestamp=datetime.now(UTC),
    )


def load_default_engine(compile_mode: str = "off", weight_dtype: str = "float16") -> Any:
    """The default model, through the user's model cache (so repeated runs are fast).
    With ``compile_mode="auto"`` this waits until the compiled decode step is ready."""
    from bot.model.hf import load_engine

    engine = load_engine(
        None,
        cache_dir=default_cache_dir(),
        context_tokens=2048,
        progress=print,
        compile_mode=compile_mode,
        weight_dtype=weight_dtype,
    )
    if compile_mode == "auto" and not engine.wait_for_fast_step(1800):
        raise SystemExit("the compiled decode step is not available (see the log line above)")
    return engine


def fast_step_args(description: str) -> argparse.Namespace:
    """``--compile auto|off`` and ``--weight-dtype float32|float16``, defaulting to the
    bot's own defaults (`Settings`)."""
    defaults = Settings(_env_file=None)  # type: ignore[call-arg]
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--compile", choices=["auto", "off"], default=defaults.model_compile)
    parser.add_argument("--weight-dtype", choices=["float32", "float16"], default=defaults.model_weight_dtype)
    return parser.parse_args()


class GenerateBaseline:
    """Plain transformers `model.generate` on the cached default model: float32, greedy,
    1 thread. The reference every speed-up of the bot's own decoding is measured against,
    in the same process."""

    def __init__(self, engine: Any) -> None:
        # The engine's own transformers model (float32 weights): no second copy in memory.
        self.model = engine.hf_model
        self.engine = engine

    def generate(self, prompt: list[int], max_new_tokens: int) -> tuple[list[int], float]:
        """Greedy tokens (stopping at the end of turn, like the bot) and the seconds taken."""
        import torch

        from bot.model.native import release_thread_pool

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            ids = torch.tensor([prompt])
            started = time.perf_counter()
            with torch.inference_mode():
                out = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=sorted(self.engine.eos_token_ids),
                    pad_token_id=sorted(self.engine.eos_token_ids)[0],
                )
            seconds = time.perf_counter() - started
        finally:
            torch.set_num_threads(threads)
            # This thread's OpenMP workers would slow the bot's own steps (see `bot.model.native`).
            release_thread_pool()
        tokens = [int(t) for t in out[0, len(prompt) :]]
        return tokens, seconds

    def reply(self, tokens: list[int]) -> str:
        """The text the bot would show for these tokens (without the end-of-turn token)."""
        kept = [t for t in tokens if t not in self.engine.eos_token_ids]
        return str(self.engine.decode(kept)).strip()


@asynccontextmanager
async def real_stack(engine: Any, **overrides: Any) -> AsyncIterator[Core]:
    """The real core (manager, worker, SQLite in a temp dir) around an already loaded engine."""
    with tempfile.TemporaryDirectory() as tmp:
        values: dict[str, Any] = {
            "database_url": f"sqlite+aiosqlite:///{tmp}/bench.db",
            "temperature": 0.0,
            "max_new_tokens": 64,
            "history_turns": 0,
        }
        values.update(overrides)
        settings = Settings(_env_file=None, **values)  # type: ignore[call-arg]
        async with open_core(settings, lambda: engine) as core:
            yield core


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
