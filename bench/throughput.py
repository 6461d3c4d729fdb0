"""Many users at once: continuous batching through the conversation manager, with the
real default model (greedy, 64 new tokens each, different short prompts).

    python bench/throughput.py [--compile auto|off] [--weight-dtype float16|float32]

Each batch size runs `ROUNDS` times on each path, the fast decode step and the HF
forward (`HFEngine.enable_fast_step`), alternating, next to plain `model.generate`
(float32, 1 thread) as the common baseline: other load on a shared machine comes and
goes within seconds, and one run per path let it favour either side by 30%. Each ratio
is over the summed tokens and seconds; the late joiner's ratio is the median of
`LATE_JOINS` tries.

Prints human lines, then one JSON line:
{"single_tok_s", "agg_tok_s_8", "agg_tok_s_16", "agg_tok_s_32", "speedup_8", "speedup_32",
 "late_join_ttft_ratio", "greedy_identical", "rss_mib_16", "rss_mib_32", "loop_lag_p99_ms",
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
ROUNDS = 2
LATE_JOINS = 3
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

        # Each batch size on both paths, alternating (same process, same prompts).
        paths = ["hf", "fast"] if engine.decode_path == "fast" else ["default"]
        totals: dict[tuple[str, int], list[float]] = {}
        identical = True
        peak_rss: dict[int, int] = {}
        lag.start()
        for n in (8, 16, 32):
            for round_ in range(ROUNDS):
                for path in paths if round_ % 2 == 0 else paths[::-1]:
                    engine.enable_fast_step(path != "hf")
                    with PeakRss() as rss:
                        wall, made, targets = await together(stack, PROMPTS[:n], f"{path}{n}.{round_}-")
                    if path != "hf":
                        peak_rss[n] = max(peak_rss.get(n, 0), rss.peak)
                    if path != "hf" and n == 8 and [t.text for t in targets] != alone:
                        identical = False
                        for a, b in zip(alone, (t.text for t in targets), strict=True):
                            if a != b:
                                print(f"  differs: alone {a[:80]!r}\n           batch {b[:80]!r}")
                    tokens_walls = totals.setdefault((path, n), [0.0, 0.0])
                    tokens_walls[0] += made
                    tokens_walls[1] += wall
                    print(f"{n} users at once, {path} path: {made} tokens in {wall:.1f} s = {made / wall:.1f} tokens/s")
        engine.enable_fast_step(True)
        default = paths[-1]
        agg = {n: totals[(default, n)][0] / totals[(default, n)][1] for n in (8, 16, 32)}
        hf_agg = {n: totals[(paths[0], n)][0] / totals[(paths[0], n)][1] for n in (8, 16, 32)}
        agg8, agg16, agg32 = agg[8], agg[16], agg[32]
        print(
            f"greedy identical at 8 users: {identical}; peak RSS at 16 users {peak_rss[16] / 2**20:.0f} MiB, "
            f"at 32 users {peak_rss[32] / 2**20:.0f} MiB"
        )

        # Late join: 7 users mid-reply, then an 8th writes.
        ratios: list[float] = []
        for attempt in range(LATE_JOINS):
            early = [asyncio.create_task(ask(stack, p, f"early{attempt}.{i}")) for i, p in enumerate(PROMPTS[8:15])]
            await asyncio.sleep(0)
            while not all(t.done() for t in early) and stack.worker.stats().active < 7:  # noqa: ASYNC110 (polls a thread's count)
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # well into their replies
            late = await ask(stack, PROMPTS[15], f"late{attempt}")
            await asyncio.gather(*early)
            ratios.append(late.ttft / idle_ttft)
            print(
                f"late joiner ttft {1000 * late.ttft:.0f} ms vs idle {1000 * idle_ttft:.0f} ms: ratio {ratios[-1]:.2f}"
            )
        ratio = median(ratios)
        await lag.stop()

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
                "rss_mib_16": round(peak_rss[16] / 2**20, 1),
                "rss_mib_32": round(peak_rss[32] / 2**20, 1),
                "loop_lag_p99_ms": round(lag.percentile_ms(0.99), 2),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
