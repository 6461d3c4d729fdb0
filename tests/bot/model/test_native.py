"""Native runtimes (bot/model/native.py): the loading thread must not leave an OpenMP
pool behind that makes libgomp put the scheduler's workers to sleep, and memory freed
by replacing weights, or by dropping big buffers, goes back to the OS."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]

# Run in a fresh interpreter: in the test process other threads come and go.
_CHILD = """
import json, threading, time
from pathlib import Path
import torch
from bot.model.native import release_thread_pool

def os_threads():
    return sum(1 for _ in Path("/proc/self/task").iterdir())

seen = {}
def work():
    before = os_threads()
    float((torch.ones(4_000_000) * 2).sum())  # parallel regions: start this thread's pool
    seen["with_pool"] = os_threads() - before
    seen["released"] = release_thread_pool()
    deadline = time.monotonic() + 5
    while os_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    seen["after"] = os_threads() - before

torch.set_num_threads(2)
worker = threading.Thread(target=work)
worker.start()
worker.join()
print(json.dumps(seen))
"""


def _child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MALLOC_ARENA_MAX", None)  # glibc's defaults, which the children change
    return env


def _run_child(code: str, *args: str) -> dict[str, Any]:
    """Run `code` in a fresh interpreter; its last line of output is JSON."""
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=_child_env(), timeout=120
    )
    assert done.returncode == 0, done.stderr
    seen: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return seen


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or (os.cpu_count() or 1) < 2, reason="needs Linux, 2 cores")
def test_release_thread_pool_ends_the_calling_threads_openmp_workers() -> None:
    seen = _run_child(_CHILD)
    assert seen["with_pool"] == 1, "a 2-thread parallel region runs on this thread plus one worker"
    assert seen["released"] is True
    assert seen["after"] == 0, "the worker has exited"


_TRIM_CHILD = """
import json
import torch
from bot.model.native import return_free_memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

blocks = [torch.ones(16_000) for _ in range(4000)]  # 64 KB each: from the heap, not mmap
last = blocks[-1]  # pins the heap's top: what is freed below it stays with malloc
held = rss_mib()
del blocks
freed = rss_mib()
returned = return_free_memory()
print(json.dumps({"held": held, "freed": freed, "trimmed": rss_mib(), "returned": returned}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="needs Linux")
def test_return_free_memory_gives_the_freed_heap_back_to_the_os() -> None:
    seen = _run_child(_TRIM_CHILD)
    assert seen["returned"] is True
    assert seen["freed"] > seen["held"] - 50, "freed tensors stay with malloc"
    assert seen["trimmed"] < seen["held"] - 150, "about 250 MB went back to the OS"


_MMAP_CHILD = """
import ctypes, ctypes.util, json, sys
from bot.model.native import return_big_buffers_when_freed

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

# Where glibc's own threshold ends up once big buffers have been freed (it rises to
# the size of each freed one, up to 32 MB). Plain malloc, as torch's CPU allocator.
libc.mallopt(-3, 32 << 20)
fixed = return_big_buffers_when_freed() if sys.argv[1] == "fixed" else None
blocks = []
for _ in range(100):  # 4 MB each, 400 MB: a 32-row KV cache
    block = libc.malloc(4 << 20)
    ctypes.memset(block, 1, 4 << 20)
    blocks.append(block)
pin = libc.malloc(4 << 20)  # a live block above them (heap memory is only trimmed at the top)
held = rss_mib()
for block in blocks:
    libc.free(block)
print(json.dumps({"held": held, "freed": rss_mib(), "fixed": fixed}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="needs Linux")
def test_big_buffers_go_back_to_the_os_when_freed() -> None:
    seen = {mode: _run_child(_MMAP_CHILD, mode) for mode in ("fixed", "default")}
    returned = {mode: seen[mode]["held"] - seen[mode]["freed"] for mode in seen}
    assert seen["fixed"]["fixed"] is True
    assert returned["fixed"] > 350, returned  # the 400 MB went back at once
    assert returned["default"] < 50, returned  # what it fixes: they stay in the heap


_ARENA_CHILD = """
import ctypes, ctypes.util, json, os, sys, tempfile, threading
from bot.model.native import share_heap_arenas

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]

shared = share_heap_arenas() if sys.argv[1] == "shared" else None
start = threading.Barrier(8)

def allocate():
    start.wait()  # all at once: each would get an arena of its own
    blocks = [libc.malloc(1000) for _ in range(1000)]
    for block in blocks:
        libc.free(block)

threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
path = os.path.join(tempfile.mkdtemp(), "info.xml")
stream = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, stream)
libc.fclose(stream)
print(json.dumps({"shared": shared, "arenas": open(path).read().count("<heap nr=")}))
"""


@pytest.mark.skipif(ctypes.util.find_library("c") is None, reason="needs glibc")
def test_threads_share_two_heap_arenas() -> None:
    seen = {mode: _run_child(_ARENA_CHILD, mode) for mode in ("shared", "default")}
    assert seen["shared"]["shared"] is True
    assert seen["shared"]["arenas"] <= 2, seen  # the main thread's and one for all the others
    assert seen["default"]["arenas"] > 4, seen  # what it changes: a heap per thread
