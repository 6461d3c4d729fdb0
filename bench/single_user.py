"""One user, the real default model, through the conversation manager.

Prints human lines, then one JSON line:
{"ttft_ms": …, "tokens_per_s": …, "loop_lag_p50_ms": …, "loop_lag_p99_ms": …, "loop_lag_max_ms": …}
The loop lag is measured by a ticker task while generations run: it shows that the
worker never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time

from common import LoopLag, TimingTarget, event, load_default_engine, median, real_stack

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a CPU does in simple words.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
]


async def main() -> None:
    engine = await asyncio.to_thread(load_default_engine)
    async with real_stack(engine, max_new_tokens=64) as stack:
        # warm-up: the first forward passes allocate
        await stack.manager.handle(event("Hello!", "warmup", 0), TimingTarget())
        lag = LoopLag()
        lag.start()
        ttfts: list[float] = []
        tokens = 0
        busy = 0.0
        for i, question in enumerate(QUESTIONS, start=1):
            before = stack.worker.stats().tokens_generated
            target = TimingTarget()
            started = time.perf_counter()
            await stack.manager.handle(event(question, f"user{i}", i), target)
            busy += time.perf_counter() - started
            made = stack.worker.stats().tokens_generated - before
            tokens += made
            ttfts.append(target.ttft)
            print(f"{question!r}: {made} tokens, ttft {1000 * target.ttft:.0f} ms -> {target.text[:60]!r}…")
        await lag.stop()
    figures = {
        "ttft_ms": round(1000 * median(ttfts), 1),
        "tokens_per_s": round(tokens / busy, 2),
        "loop_lag_p50_ms": round(lag.percentile_ms(0.50), 2),
        "loop_lag_p99_ms": round(lag.percentile_ms(0.99), 2),
        "loop_lag_max_ms": round(lag.max_ms(), 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
