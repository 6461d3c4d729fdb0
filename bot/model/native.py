"""Process-wide native runtimes that shape how fast and how big the model runs.

- **OpenMP pools.** libgomp (the OpenMP runtime of torch's Linux wheels) keeps a pool of
  worker threads for every thread that ever ran a parallel region, for the life of that
  thread. While it manages more threads than there are CPUs, every worker sleeps
  between parallel regions instead of spinning, and a decode step runs hundreds of
  them: on 2 cores, a pool left behind on the loading thread (MKL's vector maths starts
  one whatever torch's thread count) made each compiled step on the scheduler thread
  2-3x slower.
- **Freed heap.** Replacing the weights (see `fast_step._fused`) frees hundreds of
  megabytes in the middle of glibc's heap, which it keeps until asked to give it back.
  And glibc serves big allocations with their own mappings, returned to the OS when
  freed, only until the first one is freed: then it raises that threshold and keeps
  later ones (KV cache buffers, batch activations) in the heap, so at 32 users the
  process stayed ~200 MB above what it used.
- **Heap arenas.** glibc gives each thread that allocates its own heap (up to 8 per
  core), and each keeps its own free pages: the scheduler thread, the event loop, the
  database and executor threads. Two shared between them, set at process start,
  lowered the peak by about 20 MB (`bench/throughput.py`, float16 weights: 1406-1435
  MiB at 16 users against 1430-1450, 1510-1518 at 32 against 1519-1560); big buffers
  have their own mappings anyway, so the lock they share is taken for small
  allocations only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any

logger = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1
_M_MMAP_THRESHOLD = -3  # mallopt's parameter numbers (malloc.h)
_M_ARENA_MAX = -8
_MMAP_THRESHOLD_BYTES = 1 << 20
_ARENAS = 2


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP workers (`omp_pause_resource_all`); the next
    parallel region on this thread starts them again. False when the process has no
    OpenMP runtime that offers it (then nothing changes)."""
    pause = _native(None, "omp_pause_resource_all", [ctypes.c_int], "OpenMP pools stay as they are")
    return pause is not None and int(pause(_OMP_PAUSE_SOFT)) == 0


def return_free_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc's `malloc_trim`). False where
    there is no glibc (then nothing changes)."""
    trim = _native(_LIBC, "malloc_trim", [ctypes.c_size_t], "freed memory stays with the allocator")
    if trim is None:
        return False
    trim(0)
    return True


def return_big_buffers_when_freed() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (`mallopt`): buffers that size or bigger get
    their own mappings, which go back to the OS as soon as they are freed. Process-wide;
    False where there is no glibc (then nothing changes)."""
    return _mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES, "the allocator keeps its own thresholds")


def share_heap_arenas() -> bool:
    """Let glibc make at most two heap arenas (`mallopt`), shared by the threads that
    start allocating from now on (threads that have one keep it): call it first thing
    in the process. Process-wide; False where there is no glibc (then nothing changes)."""
    return _mallopt(_M_ARENA_MAX, _ARENAS, "every thread keeps its own heap")


_LIBC = ctypes.util.find_library("c") or ""


def _mallopt(parameter: int, value: int, otherwise: str) -> bool:
    """glibc's `mallopt(parameter, value)`; False where it is missing or refuses."""
    mallopt = _native(_LIBC, "mallopt", [ctypes.c_int, ctypes.c_int], otherwise)
    return mallopt is not None and int(mallopt(parameter, value)) == 1


def _native(library: str | None, name: str, argtypes: list[Any], otherwise: str) -> Any:
    """The C function `name` (returning int) of `library` (None: what the process has
    loaded already), or None (logged with `otherwise`) where there is no such function."""
    try:
        function = getattr(ctypes.CDLL(library), name) if library != "" else None
    except (AttributeError, OSError):
        function = None
    if function is None:
        logger.debug("No %s in this process; %s", name, otherwise)
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function
