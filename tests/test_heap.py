"""pipeline/heap.py: after retain_freed_memory, 14 MB blocks (a Co-Settle step's temporaries)
come from the heap and stay there once freed, for the next step to reuse (glibc's own
accounting, ``mallinfo2``), instead of being mapped and unmapped (page faults every step)."""
from __future__ import annotations

import ctypes
import sys

import pytest
import torch

from pipeline.heap import retain_freed_memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo() -> _MallInfo2:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_stay_in_the_heap() -> None:
    assert retain_freed_memory() is True
    assert retain_freed_memory() is True  # idempotent
    block = 8 * 3 * 14 * 14 * 768 * 4  # 14.4 MB: one float32 tensor of a Co-Settle batch
    mapped = _mallinfo().hblkhd
    temps = [torch.ones(8, 3, 14, 14, 768) for _ in range(10)]
    assert _mallinfo().hblkhd - mapped < block  # from the heap, not mmap'd one by one
    assert sum(float(t[0, 0, 0, 0, 0]) for t in temps) == 10.0
    del temps
    info = _mallinfo()
    assert info.fordblks >= 10 * block  # freed but kept: the next step reuses these pages
    assert info.arena >= 10 * block
