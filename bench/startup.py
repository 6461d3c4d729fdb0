"""Start-up time of the default model: first start (empty cache: the GGUF is
de-quantized and cached), second start (loaded from that cache), then the compiled
decode step (MODEL_COMPILE=auto): its first compile into the empty inductor cache, and
a warm start that loads it from the cache.

Each load runs in a fresh subprocess so nothing is shared in memory.
Run from the repository root: ``python bench/startup.py [--weight-dtype float16|float32]``.
The last line is JSON: ``{"load_first_s": …, "load_cached_s": …, "compile_cold_s": …,
"warm_answering_s": …, "warm_one_row_s": …, "warm_compiled_s": …, "weight_dtype": …}``.
``warm_answering_s`` is when the bot can answer (with the HF forward),
``warm_one_row_s`` when one user's replies run compiled, ``warm_compiled_s`` when every
batch size does. Targets: cached start under 5 s; warm start with the compiled step
(one user) ≤ 10 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # put on the child's sys.path

CACHED_TARGET_S = 5.0
WARM_COMPILED_TARGET_S = 10.0

# Runs in the child: load the engine, print one JSON line with what happened.
_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
started = time.perf_counter()
from pathlib import Path
from bot.model.hf import load_engine
engine = load_engine(None, cache_dir=Path(sys.argv[2]), progress=lambda line: print(line, flush=True),
                     compile_mode=sys.argv[3], weight_dtype=sys.argv[4])
answering = time.perf_counter() - started
one_row = engine.wait_for_fast_step(3600, one_row=True)
one_row_s = time.perf_counter() - started
ready = engine.wait_for_fast_step(3600)
print(json.dumps({"seconds": answering, "loaded_from": engine.loaded_from,
                  "one_row_s": one_row_s if one_row else None,
                  "compiled_s": time.perf_counter() - started if ready else None}), flush=True)
"""


def load_once(cache_dir: Path, compile_mode: str = "off", weight_dtype: str = "float16") -> dict[str, Any]:
    """Load the default model in a new Python process; returns the child's figures
    (seconds incl. imports until it answers, where from, seconds until compiled)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ROOT), str(cache_dir), compile_mode, weight_dtype],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"loading failed with exit code {proc.returncode}")
    # The background thread's progress lines may interleave with the result line.
    lines = proc.stdout.strip().splitlines()
    last = max(i for i, line in enumerate(lines) if '{"seconds"' in line)
    head, _, result_text = lines[last].partition('{"seconds"')
    for line in [*lines[:last], head, *lines[last + 1 :]]:
        if line.strip():
            print(f"    {line}")
    result: dict[str, Any] = json.loads('{"seconds"' + result_text)
    print(f"    (process wall time incl. interpreter start: {wall:.1f} s)")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weight-dtype", choices=["float32", "float16"], default="float16")
    weight_dtype = parser.parse_args().weight_dtype
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        cache_dir = Path(tmp)
        print(f"Empty model cache: {cache_dir}")
        print("First start (de-quantize the GGUF, write the cache):")
        first = load_once(cache_dir)
        print(f"  load_first_s = {first['seconds']:.2f} (from {first['loaded_from']})")
        print("Second start (same cache dir):")
        cached = load_once(cache_dir)
        print(f"  load_cached_s = {cached['seconds']:.2f} (from {cached['loaded_from']})")
        verdict = "OK" if cached["loaded_from"] == "cache" and cached["seconds"] < CACHED_TARGET_S else "MISSED"
        print(f"Cached start target < {CACHED_TARGET_S:.0f} s: {verdict}")
        print(f"Compiled step, first time (empty inductor cache, {weight_dtype} weights):")
        cold = load_once(cache_dir, "auto", weight_dtype)
        print(f"  answering after {cold['seconds']:.2f} s, compiled after {cold['compiled_s']} s")
        print("Compiled step, warm start:")
        warm = load_once(cache_dir, "auto", weight_dtype)
        print(
            f"  answering after {warm['seconds']:.2f} s, one row compiled after {warm['one_row_s']} s, "
            f"all compiled after {warm['compiled_s']} s"
        )
        ok = warm["one_row_s"] is not None and warm["one_row_s"] <= WARM_COMPILED_TARGET_S
        print(f"Warm start with the compiled step ≤ {WARM_COMPILED_TARGET_S:.0f} s: {'OK' if ok else 'MISSED'}")

    def rounded(value: Any) -> float | None:
        return None if value is None else round(float(value), 2)

    print(
        json.dumps(
            {
                "load_first_s": rounded(first["seconds"]),
                "load_cached_s": rounded(cached["seconds"]),
                "compile_cold_s": rounded(cold["compiled_s"]),
                "warm_answering_s": rounded(warm["seconds"]),
                "warm_one_row_s": rounded(warm["one_row_s"]),
                "warm_compiled_s": rounded(warm["compiled_s"]),
                "weight_dtype": weight_dtype,
            }
        )
    )


if __name__ == "__main__":
    main()
