"""glibc malloc tuning that ``ldm train`` applies once at start-up.

glibc serves each large allocation with a fresh mmap and munmaps it on free, so every large
tensor of a train step costs page faults and kernel zeroing; keeping freed memory in the heap
made an SD 1.5-shaped train step ~1.8x faster. Freed memory then stays with the process (as with
jemalloc/tcmalloc). Sampling got slower with it, so only training uses it (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4  # glibc <malloc.h>
_done = False


def tune_cpu_allocator() -> bool:
    """Keep freed heap memory for reuse instead of mmap/munmap per large tensor (glibc only).

    Returns True when the settings were applied; a no-op on other C libraries, when
    ``LDM_NO_MALLOC_TUNING=1`` is set, or on a second call.
    """
    global _done
    if _done or os.environ.get("LDM_NO_MALLOC_TUNING") == "1":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = (
        mallopt(M_MMAP_MAX, 0)  # every allocation from the heap, where freed memory is reused
        and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # never shrink the heap back
        and mallopt(M_TOP_PAD, 1 << 30)  # grow it in 1 GiB steps (fewer brk calls)
    )
    _done = bool(ok)
    return _done
