"""A CPU-free stand-in decoder for ``bench/decode.py`` (its own module: spawned decode workers
import it to unpickle the decoder, without running the benchmark's main module)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from extract.decode import FrameChunk, Geometry
from extract.decoders import DECODERS


@DECODERS.register("standin-sleep")
@dataclass(frozen=True)
class SleepDecoder:
    """Models I/O-bound decoding: every video has ``frames`` frames and each chunk takes
    ``seconds_per_chunk`` of sleep (no CPU). Frames are black ``(n, S, S, 3)`` uint8 at the
    geometry's size, timestamps ``k / 25`` seconds; the path is not opened. For benchmarks
    only: it shows the pool's structure (how many videos are in flight), not a codec's speed."""

    frames: int = 320
    seconds_per_chunk: float = 0.02

    def iter_frames(self, path: str | os.PathLike, *, geometry: Geometry, chunk_size: int = 32,
                    **_: Any) -> Iterator[FrameChunk]:
        s = geometry.size
        for lo in range(0, self.frames, chunk_size):
            n = min(chunk_size, self.frames - lo)
            time.sleep(self.seconds_per_chunk)
            yield FrameChunk(np.zeros((n, s, s, 3), np.uint8), np.arange(lo, lo + n) / 25.0)
