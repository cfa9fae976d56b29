"""Optional torchcodec decoder: NVDEC on a GPU (``decoder = "torchcodec-cuda"``), or torchcodec's
CPU device (``"torchcodec-cpu"``, which is how its frame selection is tested without a GPU).

Same contract as :func:`extract.decode.iter_frames` (frames ``(n, S, S, 3)`` uint8 RGB,
timestamps ``(n,)`` float64 seconds on the stream's timeline, the same ``fps`` grid rule,
segment, frame cap, ``min_frames`` and ``max_gap``): the container's headers are read with
PyAV (which stream, its ``start_time``, duration, sample aspect ratio), torchcodec decodes
that same stream in presentation order, and the frames go through the same
:class:`~extract.decode._Selector` and :class:`~extract.decode._Emitter`.

Pixels: at the native size (no scaling) torchcodec's CPU device gives PyAV's pixels exactly
(both convert with swscale); NVDEC converts YUV to RGB on the GPU with its own rounding and
chroma upsampling. Scaling uses torchcodec's ``Resize`` (bilinear *with* antialiasing), so a
scaled frame differs from PyAV's swscale bilinear by about one level on average: the decoder
is part of the store's content (a store is made with one decoder). Limits: videos with a
display rotation are refused (stage ``open``; use ``decoder = "pyav"``).

Needs ``pip install 'freezeframe[gpu-decode]'`` (torchcodec) and FFmpeg's shared libraries
(4 to 8; e.g. ``apt-get install libavcodec59 libavformat59 libavutil57 libswscale6
libswresample4 libavfilter8 libavdevice59`` on Debian 12); NVDEC also needs a CUDA build of
torch and an NVIDIA driver.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from extract.decode import (
    _DECODE_ERRORS,
    SKIP,
    STOP,
    _place,
    GEOMETRIES,
    DecodeError,
    FrameChunk,
    Geometry,
    _check_args,
    _Emitter,
    _header_duration,
    _is_url,
    _Selector,
    _span_text,
    _Timeline,
    frame_cap,
    opened_video,
    video_stream,
)
from extract.inputs import open_input
from pipeline.errors import ConfigError

INSTALL = ("pip install 'freezeframe[gpu-decode]' (torchcodec), with FFmpeg's shared libraries 4-8 "
           "installed (Debian 12: apt-get install libavcodec59 libavformat59 libavutil57 libswscale6 "
           "libswresample4 libavfilter8 libavdevice59)")


def torchcodec_problem(device: str = "cpu") -> str | None:
    """Why the torchcodec decoder cannot run on ``device`` here (None: it can)."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401 - loads torchcodec's FFmpeg libraries
    except ImportError as e:
        return f"torchcodec is not installed ({e}); {INSTALL}"
    except (OSError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"torchcodec cannot load FFmpeg ({first}); {INSTALL}"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return "decoder torchcodec-cuda needs a CUDA GPU (torch.cuda.is_available() is False); use decoder=pyav"
    return None


@dataclass(frozen=True)
class TorchCodecDecoder:
    """torchcodec on ``device`` (``"cuda"``: NVDEC, ``"cpu"``), under iter_frames' contract."""

    device: str = "cuda"

    def check(self) -> None:
        """Raise :class:`ConfigError` (what to install) if it cannot run here."""
        problem = torchcodec_problem(self.device)
        if problem is not None:
            raise ConfigError(f"decoder torchcodec-{self.device}: {problem}")

    def iter_frames(self, path: str | os.PathLike, *, geometry: Geometry, fps: float | None = None,
                    start: float | None = None, end: float | None = None, chunk_size: int = 32,
                    threads: int = 0, min_frames: int = 1, max_gap: float | None = None) -> Iterator[FrameChunk]:
        """See :func:`extract.decode.iter_frames` (same arguments, same output and errors)."""
        from torchcodec.decoders import VideoDecoder
        from torchcodec.transforms import Resize

        _check_args(fps, start, end, chunk_size, threads, min_frames)
        src = str(path)
        with opened_video(src) as container:  # headers, stream choice and open errors as PyAV says
            stream = video_stream(container, src)
            index = stream.index
            timeline = _Timeline(stream)
            t0 = float(timeline.start_pts * timeline.time_base)
            header_duration = _header_duration(container, stream)
            sar = stream.codec_context.sample_aspect_ratio
            width, height = stream.codec_context.width, stream.codec_context.height
        source: Any = open_input(src) if _is_url(src) else src
        try:
            try:
                probe_dec = VideoDecoder(source, stream_index=index, device=self.device, seek_mode="exact")
            except (RuntimeError, ValueError) as e:
                raise DecodeError("open", src, f"torchcodec cannot open it ({type(e).__name__}: {e})") from e
            rotation = probe_dec.metadata.rotation or 0
            if geometry.display and round(rotation / 90) % 4:
                raise DecodeError("open", src, f"display rotation of {rotation:g} degrees: the torchcodec "
                                  "decoder does not rotate; extract with decoder=pyav")
            shown_w = width * (float(sar) if geometry.display and sar else 1.0)
            fn = GEOMETRIES.get(geometry.mode)
            sw, sh, (left, top, right, bottom) = fn(max(1, round(shown_w)), height, geometry.size)
            transforms = [] if (sw, sh) == (width, height) else [Resize((sh, sw))]
            if hasattr(source, "seek"):
                source.seek(0)
            dec = VideoDecoder(source, stream_index=index, device=self.device, seek_mode="exact",
                               dimension_order="NHWC", num_ffmpeg_threads=max(threads, 1),
                               transforms=transforms or None)
            del probe_dec
            eps = timeline.eps
            selector = _Selector(fps, start, end, eps, max_gap=max_gap, src=src)
            out = _Emitter(lambda image: image[top:bottom, left:right], chunk_size=chunk_size,
                           fps=fps,
                           cap=None if fps is None else frame_cap(header_duration, fps, start, end),
                           span=_span_text(header_duration, start, end), min_frames=min_frames, src=src)
            n = dec.metadata.num_frames or 0
            i = self._first_index(dec, n, start, t0, eps)
            last: float | None = None
            cut_by_end = False
            while i < n and not cut_by_end:
                j = min(i + chunk_size, n)
                try:
                    batch = dec.get_frames_in_range(i, j)
                    data = batch.data.cpu().numpy()
                    times = (batch.pts_seconds.cpu().numpy().astype(np.float64) - t0).tolist()
                except (RuntimeError, *_DECODE_ERRORS) as e:
                    where = f" after {last:.3f} s" if last is not None else ""
                    raise DecodeError("decode", src, f"torchcodec failed{where} ({type(e).__name__}: {e})") from e
                for image, t in zip(data, times):
                    place = _place(t, last, start, end, eps)
                    if place == SKIP:
                        continue
                    if place == STOP:
                        cut_by_end = True
                        break
                    last = t
                    yield from out.emit(selector.push(image, t))
                i = j
            yield from out.emit(selector.finish(cut_by_end))
        finally:
            if hasattr(source, "close"):
                source.close()
        yield from out.close(start, end)

    @staticmethod
    def _first_index(dec: Any, n: int, start: float | None, t0: float, eps: float) -> int:
        """Index of the first frame at or after ``start`` seconds (frames are in presentation
        order in torchcodec's exact mode): a binary search that decodes log2(n) frames."""
        if start is None or start <= eps:
            return 0
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            if float(dec.get_frame_at(mid).pts_seconds) - t0 < start - eps:
                lo = mid + 1
            else:
                hi = mid
        return lo
