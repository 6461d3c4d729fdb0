"""One user, the real default model, through the conversation manager, against plain
`model.generate` (float32, 1 thread) on the same prompts in the same process,
interleaved question by question so that other load on the machine hits both alike.

    python bench/single_user.py [--compile auto|off] [--weight-dtype float16|float32]

Prints human lines, then one JSON line:
{"ttft_ms": …, "tokens_per_s": …, "loop_lag_p50_ms": …, "loop_lag_p99_ms": …, "loop_lag_max_ms": …,
 "hf_generate_tok_s": …, "speedup_vs_generate": …, "greedy_identical": …, "weight_dtype": …, "decode_path": …}
Targets: speedup_vs_generate ≥ 2.5 with float32 weights, ≥ 3.5 with float16; TTFT no
worse than with --compile off. The loop lag is measured by a ticker task while
generations run: it shows that the worker never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time

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

from bot.events import ChatTurn

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a CPU does in simple words.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
]
MAX_NEW_TOKENS = 64
ROUNDS = 2


async def main() -> None:
    args = fast_step_args(__doc__ or "")
    engine = await asyncio.to_thread(load_default_engine, args.compile, args.weight_dtype)
    baseline = GenerateBaseline(engine)
    async with real_stack(engine, max_new_tokens=MAX_NEW_TOKENS) as stack:
        system = stack.settings.system_prompt
        # warm-up: the first forward passes allocate
        await stack.manager.handle(event("Hello!", "warmup", 0), TimingTarget())
        baseline.generate(engine.encode("Hello!"), 4)
        lag = LoopLag()
        lag.start()
        ttfts: list[float] = []
        tokens = 0
        busy = 0.0
        hf_tokens = 0
        hf_busy = 0.0
        identical = True
        message_id = 0
        for round_ in range(ROUNDS):
            for i, question in enumerate(QUESTIONS, start=1):
                message_id += 1
                before = stack.worker.stats().tokens_generated
                target = TimingTarget()
                started = time.perf_counter()
                await stack.manager.handle(event(question, f"user{round_}-{i}", message_id), target)
                busy += time.perf_counter() - started
                made = stack.worker.stats().tokens_generated - before
                tokens += made
                ttfts.append(target.ttft)

                prompt = await stack.worker.render_prompt(system, [ChatTurn("user", question)])
                # Off the loop, so that the lag figures stay the bot's own.
                ref_tokens, seconds = await asyncio.to_thread(baseline.generate, prompt, MAX_NEW_TOKENS)
                hf_tokens += len(ref_tokens)
                hf_busy += seconds
                same = baseline.reply(ref_tokens) == target.text.strip()
                identical = identical and same
                print(
                    f"{question!r}: {made} tokens, ttft {1000 * target.ttft:.0f} ms "
                    f"| generate: {len(ref_tokens)} tokens in {seconds:.2f} s; same text: {same}"
                )
        await lag.stop()
    bot_tok_s = tokens / busy
    hf_tok_s = hf_tokens / hf_busy
    figures = {
        "ttft_ms": round(1000 * median(ttfts), 1),
        "tokens_per_s": round(bot_tok_s, 2),
        "loop_lag_p50_ms": round(lag.percentile_ms(0.50), 2),
        "loop_lag_p99_ms": round(lag.percentile_ms(0.99), 2),
        "loop_lag_max_ms": round(lag.max_ms(), 2),
        "hf_generate_tok_s": round(hf_tok_s, 2),
        "speedup_vs_generate": round(bot_tok_s / hf_tok_s, 2),
        "greedy_identical": identical,
        "weight_dtype": args.weight_dtype if engine.decode_path == "fast" else "float32",
        "decode_path": engine.decode_path,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    asyncio.run(main())
