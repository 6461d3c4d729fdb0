"""Many users at once: continuous batching through the conversation manager, with the
real default model (greedy, 64 new tokens each, different short prompts).

    python bench/throughput.py [--compile auto|off] [--weight-dtype float16|float32]

Each batch size runs twice in the same process, with the fast decode step and with the
HF forward (`HFEngine.enable_fast_step`), next to plain `model.generate` (float32, 1
thread) as the common baseline.

Prints human lines, then one JSON line:
{"single_tok_s", "agg_tok_s_8", "agg_tok_s_16", "agg_tok_s_32", "speedup_8", "speedup_32",
 "late_join_ttft_ratio", "greedy_identical", "rss_mib_32", "loop_lag_p99_ms",
 "hf_generate_tok_s", "hf_agg_tok_s_8", "hf_agg_tok_s_16", "hf_agg_tok_s_32",
 "fast_vs_hf_8", "fast_vs_hf_16", "fast_vs_hf_32", "weight_dtype", "decode_path"}
(agg_tok_s_N: the bot's default path; hf_agg_tok_s_N: the HF forward.)
Targets: fast_vs_hf_32 ≥ 1.2, fast_vs_hf_8 ≥ 1.0; greedy identical; rss_mib_32 ≤ 1536.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import psutil
from common import (
    GenerateBaseline,
    LoopLag,
    TimingTarget,
    event,
    fast_step_args,
    load_default_engine,
    median,
    real_stack,
)

from bot.core import Core
from bot.events import ChatTurn

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
    args = fast_step_args(__doc__ or "")
    engine = await asyncio.to_thread(load_default_engine, args.compile, args.weight_dtype)
    baseline = GenerateBaseline(engine)
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
        hf_tokens = 0
        hf_busy = 0.0
        for prompt in PROMPTS[:8]:
            ids = await stack.worker.render_prompt(stack.settings.system_prompt, [ChatTurn("user", prompt)])
            made_ids, seconds = await asyncio.to_thread(baseline.generate, ids, 64)
            hf_tokens += len(made_ids)
            hf_busy += seconds
        hf_generate = hf_tokens / hf_busy
        print(f"plain model.generate, 1 thread: {hf_generate:.1f} tokens/s")

        # The HF forward at each batch size, for comparison (same process, same prompts).
        hf_agg: dict[int, float] = {}
        if engine.decode_path == "fast":
            engine.enable_fast_step(False)
            try:
                for n in (8, 16, 32):
                    wall, made, _ = await together(stack, PROMPTS[:n], f"hf{n}-")
                    hf_agg[n] = made / wall
                    print(f"{n} users at once, HF forward: {made} tokens in {wall:.1f} s = {hf_agg[n]:.1f} tokens/s")
            finally:
                engine.enable_fast_step(True)

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

    hf_agg = hf_agg or {8: agg8, 16: agg16, 32: agg32}
    print(
        json.dumps(
            {
                "hf_generate_tok_s": round(hf_generate, 2),
                "hf_agg_tok_s_8": round(hf_agg[8], 2),
                "hf_agg_tok_s_16": round(hf_agg[16], 2),
                "hf_agg_tok_s_32": round(hf_agg[32], 2),
                "fast_vs_hf_8": round(agg8 / hf_agg[8], 2),
                "fast_vs_hf_16": round(agg16 / hf_agg[16], 2),
                "fast_vs_hf_32": round(agg32 / hf_agg[32], 2),
                "weight_dtype": args.weight_dtype if engine.decode_path == "fast" else "float32",
                "decode_path": engine.decode_path,
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
