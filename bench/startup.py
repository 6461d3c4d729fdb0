"""Start-up time of the default model: first start (empty cache: the GGUF is
de-quantized and cached) and second start (loaded from that cache).

Each load runs in a fresh subprocess so nothing is shared in memory.
Run from the repository root: ``python bench/startup.py``. The last line is JSON:
``{"load_first_s": ..., "load_cached_s": ...}``. Target: cached start under 5 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # put on the child's sys.path

CACHED_TARGET_S = 5.0

# Runs in the child: load the engine, print one JSON line with what happened.
_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
started = time.perf_counter()
from pathlib import Path
from bot.model.hf import load_engine
engine = load_engine(None, cache_dir=Path(sys.argv[2]), progress=lambda line: print(line, flush=True))
print(json.dumps({"seconds": time.perf_counter() - started, "loaded_from": engine.loaded_from}), flush=True)
"""


def load_once(cache_dir: Path) -> tuple[float, str]:
    """Load the default model in a new Python process; returns (seconds incl. imports, source)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(ROOT), str(cache_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"loading failed with exit code {proc.returncode}")
    lines = proc.stdout.strip().splitlines()
    for line in lines[:-1]:
        print(f"    {line}")
    result = json.loads(lines[-1])
    print(f"    (process wall time incl. interpreter start: {wall:.1f} s)")
    return float(result["seconds"]), str(result["loaded_from"])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        cache_dir = Path(tmp)
        print(f"Empty model cache: {cache_dir}")
        print("First start (de-quantize the GGUF, write the cache):")
        first, first_from = load_once(cache_dir)
        print(f"  load_first_s = {first:.2f} (from {first_from})")
        print("Second start (same cache dir):")
        cached, cached_from = load_once(cache_dir)
        print(f"  load_cached_s = {cached:.2f} (from {cached_from})")
        verdict = "OK" if cached_from == "cache" and cached < CACHED_TARGET_S else "MISSED"
        print(f"Cached start target < {CACHED_TARGET_S:.0f} s: {verdict}")
    print(json.dumps({"load_first_s": round(first, 2), "load_cached_s": round(cached, 2)}))


if __name__ == "__main__":
    main()
