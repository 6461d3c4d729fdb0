"""Native runtimes (bot/model/hf/native.py): the loading thread must not leave an OpenMP
pool behind that makes libgomp put the scheduler's workers to sleep, and memory freed
by replacing weights, or by dropping big buffers, goes back to the OS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[4]

# Run in a fresh interpreter: in the test process other threads come and go.
_CHILD = """
import json, threading, time
from pathlib import Path
import torch
from bot.model.hf.native import release_thread_pool

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
    return env


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or (os.cpu_count() or 1) < 2, reason="needs Linux, 2 cores")
def test_release_thread_pool_ends_the_calling_threads_openmp_workers() -> None:
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=_child_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["with_pool"] == 1, "a 2-thread parallel region runs on this thread plus one worker"
    assert seen["released"] is True
    assert seen["after"] == 0, "the worker has exited"


_TRIM_CHILD = """
import json
import torch
from bot.model.hf.native import return_free_memory

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
    done = subprocess.run(
        [sys.executable, "-c", _TRIM_CHILD], capture_output=True, text=True, env=_child_env(), timeout=120
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["returned"] is True
    assert seen["freed"] > seen["held"] - 50, "freed tensors stay with malloc"
    assert seen["trimmed"] < seen["held"] - 150, "about 250 MB went back to the OS"


_MMAP_CHILD = """
import ctypes, ctypes.util, json, sys
from bot.model.hf.native import return_big_buffers_when_freed

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
    seen = {}
    for mode in ("fixed", "default"):
        done = subprocess.run(
            [sys.executable, "-c", _MMAP_CHILD, mode], capture_output=True, text=True, env=_child_env(), timeout=120
        )
        assert done.returncode == 0, done.stderr
        seen[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    returned = {mode: seen[mode]["held"] - seen[mode]["freed"] for mode in seen}
    assert seen["fixed"]["fixed"] is True
    assert returned["fixed"] > 350, returned  # the 400 MB went back at once
    assert returned["default"] < 50, returned  # what it fixes: they stay in the heap
