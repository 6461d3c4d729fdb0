"""Where the matmul beats the multiply-and-sum kernel: per-step time of both compiled
variants of the fast decode step (`bot/model/hf/fast_step.py`, compiled by `fast_decoder.py`) at 1 to 32 rows, with
the default model, interleaved in one process. `MATMUL_MIN_ROWS` comes from here.

Prints one line per batch size, then one JSON line:
{"weight_dtype": …, "ms": {"<rows>": {"mulsum": …, "matmul": …}}, "crossover_rows": …}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import common  # noqa: F401  (puts the repository on sys.path)

ROWS = [1, 2, 4, 8, 12, 16, 20, 24, 32]
WIDTH = 120  # cached tokens per row: a short chat prompt plus some reply


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from bot.config import default_cache_dir
    from bot.model.hf.fast_decoder import FastDecoder, FastStepConfig

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
    config = FastStepConfig("auto", args.weight_dtype, cached[0] / "inductor", threads)
    decoder = FastDecoder(model, context_length=2048, config=config)
    decoder.start(print)
    if not decoder.wait():
        raise SystemExit(f"compiling failed: {decoder.failed}")
    few, many = decoder.kernels
    times: dict[str, dict[str, list[float]]] = {str(r): {"mulsum": [], "matmul": []} for r in ROWS}
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
                for name, fn in (("mulsum", few), ("matmul", many)):
                    if name == "matmul" and rows == 1:
                        continue  # the matmul graph is traced for 2+ rows only
                    fn(*inputs)
                    started = time.perf_counter()
                    for _ in range(5):
                        fn(*inputs)
                    times[str(rows)][name].append(1000 * (time.perf_counter() - started) / 5)
    ms = {r: {k: round(statistics.median(v), 2) for k, v in d.items() if v} for r, d in times.items()}
    crossover = next((int(r) for r, d in ms.items() if "matmul" in d and d["matmul"] < d["mulsum"]), None)
    for r, d in ms.items():
        print(f"{r:>3} rows: " + ", ".join(f"{k} {v:.1f} ms" for k, v in d.items()))
    print(json.dumps({"weight_dtype": args.weight_dtype, "ms": ms, "crossover_rows": crossover}))


if __name__ == "__main__":
    main()
