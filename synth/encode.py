"""Deterministic H.264 writing of rendered frames (PyAV, libx264, yuv420p MP4)."""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np


def encode_h264(frames: np.ndarray, path: str | os.PathLike, fps: int, crf: int = 18) -> Path:
    """Write ``frames`` (T, H, W, 3) uint8 RGB as H.264 yuv420p MP4 at ``fps`` (reproducibly).

    libx264 runs single-threaded with a fixed GOP of ``fps`` frames (a keyframe every second),
    no scene-cut keyframes and no macroblock-tree rate control, so the same frames give the
    same bytes with the same PyAV/FFmpeg build. Frame ``k`` is shown at ``k / fps`` seconds.
    Written to a temporary name first, then renamed.
    """
    import av  # lazy: PyAV is only needed when writing (keeps `import synth` light)

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    T, H, W, _ = frames.shape
    tb = Fraction(1, fps)
    # mbtree=0: with macroblock-tree rate control on, this libx264 build gave different
    # bytes for the same frames from run to run (single-threaded; more often when the heap
    # had been churned, i.e. an uninitialised read), e.g. for 16-frame 64 px clips with a
    # GOP of 8. With it off, 400 churned re-encodes were all identical.
    options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "g": str(fps),
               "keyint_min": str(fps), "sc_threshold": "0", "mbtree": "0"}
    with av.open(str(tmp), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = tb
        stream.codec_context.thread_count = 1
        for k in range(T):
            # explicit, single-threaded RGB -> YUV conversion (swscale's defaults)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[k]), format="rgb24")
            frame = frame.reformat(format="yuv420p", threads=1)
            frame.pts, frame.time_base = k, tb
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    os.replace(tmp, path)
    return path


