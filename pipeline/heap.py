"""Keep the memory a process frees in its heap for reuse, instead of handing it back to the OS.

A training step allocates and frees the same large temporaries every step (activations and
gradients: 14 MB each for a Co-Settle batch of 8 x 3 x 14 x 14 x 768 float32). glibc's
malloc serves such blocks with fresh ``mmap`` pages, or trims them off the top of the heap
when they are freed, so every step pays the kernel again for page faults and zeroed pages
of memory it just gave back: 16,000 minor faults per Co-Settle step on CPU
(``docs/benchmarks.md``, Co-Settle). :func:`retain_freed_memory` sets glibc's mmap and trim
thresholds (``mallopt``) so that blocks up to 32 MB come from the heap and the heap keeps
up to ``trim_bytes`` free at its top: a steady-state training loop then reuses its own pages
(the process's resident memory stays at its peak instead of shrinking between steps; blocks
above 32 MB are still mapped and unmapped). The ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` environment variables do the same for a whole process, from its
start. Other C libraries (macOS, musl): nothing is changed.
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["MMAP_THRESHOLD_MAX", "retain_freed_memory"]

#: glibc's upper bound for M_MMAP_THRESHOLD on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``)
MMAP_THRESHOLD_MAX = 32 << 20
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3


def retain_freed_memory(trim_bytes: int = 1 << 30) -> bool:
    """Blocks up to 32 MB from the heap, up to ``trim_bytes`` of free heap kept; True when set
    (glibc), False elsewhere. Process-wide and idempotent; DataLoader workers forked after
    it inherit it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, int(trim_bytes)))
