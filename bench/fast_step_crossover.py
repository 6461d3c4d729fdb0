"""Which kernel serves which batch size: per-step time of every compiled variant of the
fast decode step (`bot/model/hf/fast_step.py`, compiled by `fast_decoder.py`):
multiply-and-sum, and the float32 matmul with the weights as the left (``w @ x.T``) or
the right (``x @ w.T``) operand, at 1 to 32 rows, with the default model, interleaved
in one process. `fast_step.KERNELS` comes from here.

    python bench/fast_step_crossover.py [--weight-dtype float16|float32] [--rounds N]

Prints one line per batch size, then one JSON line:
{"weight_dtype": …, "ms": {"<rows>": {"<kernel>": …}}, "fastest": {"<rows>": "<kernel>"}}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import common  # noqa: F401  (puts the repository on sys.path)

ROWS = [1, 2, 4, 6, 8, 10, 12, 16, 20, 24, 32]
WIDTH = 120  # cached tokens per row: a short chat prompt plus some reply


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from bot.config import default_cache_dir
    from bot.model.hf.fast_decoder import FastDecoder, FastStepConfig
    from bot.model.hf.fast_step import Graph
    from bot.model.native import release_thread_pool

    parser = argparse.ArgumentParser()
    parser.add_argument("--weight-dtype", choices=["float32", "float16"], default="float16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    cached = [p for p in default_cache_dir().iterdir() if (p / "config.json").is_file()]
    if not cached:
        raise SystemExit("run the bot (or bench/startup.py) once so the default model is cached")
    threads = torch.get_num_threads()
    model: Any = AutoModelForCausalLM.from_pretrained(cached[0])
    model.eval()
    release_thread_pool()  # the loading thread's OpenMP workers (see bot/model/native.py)
    config = FastStepConfig("auto", args.weight_dtype, cached[0] / "inductor", threads)
    graphs: tuple[Graph, ...] = ("one", "mulsum", "matmul_wx", "matmul_xw")
    decoder = FastDecoder(model, context_length=2048, config=config, graphs=graphs)
    decoder.start(print)
    if not decoder.wait():
        raise SystemExit(f"compiling failed: {decoder.failed}")
    times: dict[str, dict[str, list[float]]] = {str(r): {} for r in ROWS}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for rows in ROWS:
                kv = [torch.randn(rows, 3, WIDTH + 64, 64) for _ in range(2 * len(model.model.layers))]
                inputs: tuple[Any, ...] = (
                    torch.zeros(rows, dtype=torch.long),
                    torch.full((rows,), WIDTH, dtype=torch.long),
                    torch.ones(rows, WIDTH, dtype=torch.bool),
                    kv,
                )
                # One row has a graph of its own (multiply-and-sum); the others take 2+.
                for graph in ("one",) if rows == 1 else graphs[1:]:
                    fn = decoder.graph(graph)
                    fn(*inputs)
                    started = time.perf_counter()
                    for _ in range(5):
                        fn(*inputs)
                    name = "mulsum" if graph == "one" else graph
                    times[str(rows)].setdefault(name, []).append(1000 * (time.perf_counter() - started) / 5)
    ms = {r: {k: round(statistics.median(v), 2) for k, v in d.items()} for r, d in times.items()}
    fastest = {r: min(d, key=d.__getitem__) for r, d in ms.items()}
    for r, d in ms.items():
        print(f"{r:>3} rows: " + ", ".join(f"{k} {v:.1f} ms" for k, v in d.items()) + f"  -> {fastest[r]}")
    print(json.dumps({"weight_dtype": args.weight_dtype, "ms": ms, "fastest": fastest}))


if __name__ == "__main__":
    main()
