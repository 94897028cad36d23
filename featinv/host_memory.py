"""The host allocator: keep freed blocks for the next step instead of handing them back to the OS.

A training step on the CPU allocates and frees the same activations every step, a few MB
each (2,048 windows × 512 hidden units of the local_mlp decoder: 4 MB in float32).  glibc's
malloc hands blocks that size back to the OS on ``free`` and page-faults them in again, the
kernel zeroing every page: on the 2-core CPU, 2,554 minor faults per local_mlp step on
vgg16/block1 and 24,472 per step of the published transposed_conv at batch 4, which trained
1.2–1.3× faster with the blocks kept (the quick start's training: 48 s → 32 s, the same
metrics; ``python -m benchmarks.host_memory`` and BENCHMARKS.md, "Host allocator").

:func:`keep_freed_memory` raises glibc's mmap threshold to its ceiling (32 MiB on 64-bit) and
its trim threshold to 1 GiB, so those blocks come from the heap and stay there for reuse —
what jemalloc and tcmalloc do by design.  The cost is that a process holds up to that much
freed memory until it exits.  It is a no-op off glibc, and where the user has set glibc's
own ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (their choice stands).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); larger values are refused
TRIM_THRESHOLD = 2**30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: bool | None = None  # once per process: True (set), False (not glibc or the user's own settings)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks up to 32 MiB for reuse (module docstring); once per process.

    Returns:
        Whether the setting is in force in this process.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if any(name in os.environ for name in _USER_SETTINGS):
        log.debug("glibc malloc settings from the environment stand: %s", ", ".join(_USER_SETTINGS))
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success, 0 on a value it refuses.
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("glibc refused mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD): the allocator keeps its defaults")
    return ok
