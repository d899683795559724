"""Process-wide CPU settings that ``ldm train`` applies once at start-up.

glibc's malloc serves every allocation above a (dynamic, at most 32 MiB) threshold with a fresh
``mmap`` and returns it with ``munmap`` on free, so a tensor of that size costs page faults and
kernel zeroing on every use. A U-Net train step allocates gigabytes of such tensors (weight
gradients, im2col patches, activations): on the project's 2-core CPU an SD 1.5-shaped train step
took 11.3 s with glibc's defaults and 6.2-6.5 s with mmap off and trimming disabled (diffusers'
step: 12.8 s -> 6.9 s; ``scripts/bench_models.py``). The price is that freed memory stays with the
process (its RSS keeps its peak) instead of going back to the system, which is how jemalloc and
tcmalloc, the allocators usually recommended for PyTorch on CPU, behave too. For sampling it did not
pay: the SD 1.5 txt2img benchmark went from 33.8 s to 36.8 s with it (diffusers' from 43.4 s to 39.7
s), so txt2img, batch and eval keep glibc's defaults.
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
