"""Many users at once: continuous batching through the conversation manager, with the
real default model (greedy, 64 new tokens each, different short prompts).

Prints human lines, then one JSON line:
{"single_tok_s", "agg_tok_s_8", "agg_tok_s_16", "agg_tok_s_32", "speedup_8", "speedup_32",
 "late_join_ttft_ratio", "greedy_identical", "rss_mib_32", "loop_lag_p99_ms"}
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import psutil
from common import LoopLag, TimingTarget, event, load_default_engine, median, real_stack

from bot.core import Core

TOPICS = [
    "the sea",
    "a city at night",
    "a lost cat",
    "the first day of spring",
    "a robot learning to paint",
    "a mountain village",
    "an old library",
    "a rainy afternoon",
    "a train journey",
    "the moon",
    "a busy market",
    "a quiet forest",
    "a lighthouse keeper",
    "a snowstorm",
    "a birthday party",
    "a chess game",
    "a desert oasis",
    "a jazz club",
    "a garden in summer",
    "a sailing ship",
    "a haunted house",
    "a football match",
    "a bakery at dawn",
    "a space station",
    "a river",
    "a violin",
    "an island",
    "a clock tower",
    "a festival of lights",
    "a small bookshop",
    "a volcano",
    "a bicycle ride",
]
PROMPTS = [f"Write a story about {t}." for t in TOPICS]
_ids = iter(range(1, 1_000_000))


class PeakRss:
    """Samples this process's RSS every 20 ms in a thread."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def ask(stack: Core, prompt: str, user: str) -> TimingTarget:
    target = TimingTarget()
    await stack.manager.handle(event(prompt, user, next(_ids)), target)
    return target


async def together(stack: Core, prompts: list[str], tag: str) -> tuple[float, int, list[TimingTarget]]:
    before = stack.worker.stats().tokens_generated
    started = time.perf_counter()
    targets = await asyncio.gather(*(ask(stack, p, f"{tag}{i}") for i, p in enumerate(prompts)))
    wall = time.perf_counter() - started
    return wall, stack.worker.stats().tokens_generated - before, list(targets)


async def main() -> None:
    engine = await asyncio.to_thread(load_default_engine)
    lag = LoopLag()
    async with real_stack(engine, max_batch_size=32, queue_size=64) as stack:
        await ask(stack, "Hello!", "warmup")

        # One user at a time: the baseline, and each prompt's reply alone.
        alone: list[str] = []
        tokens = 0
        busy = 0.0
        ttfts: list[float] = []
        for i, prompt in enumerate(PROMPTS[:8]):
            wall, made, (target,) = await together(stack, [prompt], f"alone{i}-")
            alone.append(target.text)
            tokens += made
            busy += wall
            ttfts.append(target.ttft)
        single = tokens / busy
        idle_ttft = median(ttfts)
        print(f"single user: {single:.1f} tokens/s, idle ttft {1000 * idle_ttft:.0f} ms")

        lag.start()
        wall8, made8, targets8 = await together(stack, PROMPTS[:8], "batch8-")
        agg8 = made8 / wall8
        identical = [t.text for t in targets8] == alone
        print(f"8 users at once: {made8} tokens in {wall8:.1f} s = {agg8:.1f} tokens/s; greedy identical: {identical}")
        if not identical:
            for a, b in zip(alone, (t.text for t in targets8), strict=True):
                if a != b:
                    print(f"  differs: alone {a[:80]!r}\n           batch {b[:80]!r}")

        wall16, made16, _ = await together(stack, PROMPTS[:16], "batch16-")
        agg16 = made16 / wall16
        print(f"16 users at once: {made16} tokens in {wall16:.1f} s = {agg16:.1f} tokens/s")

        with PeakRss() as rss:
            wall32, made32, _ = await together(stack, PROMPTS[:32], "batch32-")
        agg32 = made32 / wall32
        print(
            f"32 users at once: {made32} tokens in {wall32:.1f} s = {agg32:.1f} tokens/s; "
            f"peak RSS {rss.peak / 2**20:.0f} MiB"
        )

        # Late join: 7 users mid-reply, then an 8th writes.
        early = [asyncio.create_task(ask(stack, p, f"early{i}")) for i, p in enumerate(PROMPTS[8:15])]
        await asyncio.sleep(0)
        while not all(t.done() for t in early) and stack.worker.stats().active < 7:  # noqa: ASYNC110 (polls a thread's count)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # well into their replies
        late = await ask(stack, PROMPTS[15], "late")
        await asyncio.gather(*early)
        ratio = late.ttft / idle_ttft
        print(f"late joiner ttft {1000 * late.ttft:.0f} ms vs idle {1000 * idle_ttft:.0f} ms: ratio {ratio:.2f}")
        await lag.stop()

    print(
        json.dumps(
            {
                "single_tok_s": round(single, 2),
                "agg_tok_s_8": round(agg8, 2),
                "agg_tok_s_16": round(agg16, 2),
                "agg_tok_s_32": round(agg32, 2),
                "speedup_8": round(agg8 / single, 2),
                "speedup_32": round(agg32 / single, 2),
                "late_join_ttft_ratio": round(ratio, 2),
                "greedy_identical": identical,
                "rss_mib_32": round(rss.peak / 2**20, 1),
                "loop_lag_p99_ms": round(lag.percentile_ms(0.99), 2),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
