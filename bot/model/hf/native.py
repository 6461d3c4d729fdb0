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
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

_OMP_PAUSE_SOFT = 1


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP workers (`omp_pause_resource_all`); the next
    parallel region on this thread starts them again. False when the process has no
    OpenMP runtime that offers it (then nothing changes)."""
    try:
        pause = ctypes.CDLL(None).omp_pause_resource_all
    except (AttributeError, OSError):
        logger.debug("No omp_pause_resource_all in this process; OpenMP pools stay as they are")
        return False
    pause.argtypes = [ctypes.c_int]
    pause.restype = ctypes.c_int
    return int(pause(_OMP_PAUSE_SOFT)) == 0


def return_free_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc's `malloc_trim`). False where
    there is no glibc (then nothing changes)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (AttributeError, OSError):
        trim = None
    if trim is None:
        logger.debug("No malloc_trim in this process; freed memory stays with the allocator")
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
