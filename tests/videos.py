"""Tiny real videos written with PyAV for the tests (the pytorchvideo pattern).

Every maker writes a real file with the real encoder/muxer and returns its path, so the
decoder under test reads exactly what it would read in production. Frame arrays are
``(T, H, W, 3)`` uint8 RGB; times are in seconds.

Which frame came out of a (possibly lossy) decode is recovered with :func:`frame_index`:
:func:`pattern_frames` writes the frame index into the flat red/green levels of each frame.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np

#: Codec used for lossless fixtures (decoding gives back the exact RGB pixels).
LOSSLESS_CODEC = "libx264rgb" if "libx264rgb" in av.codecs_available else "ffv1"

_LEVEL_STEP = 16  # levels per index digit; survives lossy H.264 (errors << 8 levels)


def pattern_frames(T: int, H: int, W: int, seed: int = 0) -> np.ndarray:
    """Deterministic frames ``(T, H, W, 3)`` uint8 RGB, each identifiable by its index.

    Frame ``k`` has a flat red level ``8 + 16 * (k % 16)`` and a flat green level
    ``8 + 16 * ((k // 16) % 16)`` (so up to 256 frames are distinct, robustly even after
    lossy coding), and a blue channel of 8x8 blocks drawn from ``seed`` (same for every
    frame) so the picture has spatial structure. Recover ``k`` with :func:`frame_index`.
    """
    if T > 256:
        raise ValueError("pattern_frames encodes at most 256 distinct frames")
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(math.ceil(H / 8), math.ceil(W / 8)), dtype=np.uint8)
    blue = np.kron(blocks, np.ones((8, 8), dtype=np.uint8))[:H, :W]
    out = np.empty((T, H, W, 3), dtype=np.uint8)
    for k in range(T):
        out[k, :, :, 0] = 8 + _LEVEL_STEP * (k % 16)
        out[k, :, :, 1] = 8 + _LEVEL_STEP * ((k // 16) % 16)
        out[k, :, :, 2] = blue
    return out


def frame_index(frame: np.ndarray) -> int:
    """Index ``k`` of a :func:`pattern_frames` frame ``(H, W, 3)`` (any size, lossy ok)."""
    r = float(frame[..., 0].mean())
    g = float(frame[..., 1].mean())
    lo = int(round((r - 8) / _LEVEL_STEP)) % 16
    hi = int(round((g - 8) / _LEVEL_STEP)) % 16
    return hi * 16 + lo


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")


def _encode(
    path: Path,
    frames: np.ndarray,
    pts: Sequence[int],
    time_base: Fraction,
    rate: Fraction | int,
    codec: str,
    pix_fmt: str,
    options: dict[str, str],
    container_options: dict[str, str] | None = None,
    rotation: int = 0,
    sample_aspect_ratio: Fraction | None = None,
) -> Path:
    """Encode ``frames`` (T, H, W, 3) with explicit presentation timestamps ``pts``.

    ``rotation``: display matrix rotation, degrees counter-clockwise (as a phone writes it);
    ``sample_aspect_ratio``: pixel width / height (anamorphic video), written in the stream.
    """
    _check_frames(frames)
    T, H, W, _ = frames.shape
    with av.open(str(path), mode="w", options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=rate, options=options)
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        if rotation:
            stream.set_display_rotation(rotation)
        if sample_aspect_ratio is not None:
            stream.codec_context.sample_aspect_ratio = sample_aspect_ratio
        for k in range(T):
            frame = av.VideoFrame.from_ndarray(frames[k], format="rgb24")
            frame.pts = int(pts[k])
            frame.time_base = time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def make_lossless_video(path: str | Path, frames: np.ndarray, fps: int, *, rotation: int = 0,
                        sample_aspect_ratio: Fraction | None = None) -> Path:
    """Write ``frames`` (T, H, W, 3) uint8 RGB losslessly at constant ``fps``.

    Uses ``libx264rgb`` with ``crf 0`` in MP4 (RGB H.264, B-frames on, so the decoder
    reorders), or FFV1 in Matroska when libx264rgb is unavailable (the returned path then
    ends in ``.mkv``). Frame ``k`` has presentation time ``k / fps`` seconds.
    ``rotation`` / ``sample_aspect_ratio``: display metadata, see :func:`_encode`.
    """
    path = Path(path)
    if LOSSLESS_CODEC == "libx264rgb":
        opts = {"crf": "0", "preset": "veryfast"}
        fmt = "rgb24"
    else:
        path = path.with_suffix(".mkv")
        opts, fmt = {}, "bgr0"
    tb = Fraction(1, fps)
    return _encode(path, frames, range(len(frames)), tb, fps, LOSSLESS_CODEC, fmt, opts,
                   rotation=rotation, sample_aspect_ratio=sample_aspect_ratio)


def make_vfr_video(
    path: str | Path,
    frame_times: Sequence[float],
    H: int,
    W: int,
    frames: np.ndarray | None = None,
) -> Path:
    """Write a variable-frame-rate lossless video whose frame ``k`` is shown at ``frame_times[k]``.

    Times are seconds (strictly increasing, rounded to the 1/1000 s time base). ``frames``
    defaults to ``pattern_frames(len(frame_times), H, W)``.
    """
    times = [round(t * 1000) for t in frame_times]
    if any(b <= a for a, b in zip(times, times[1:])):
        raise ValueError("frame_times must be strictly increasing (at 1 ms resolution)")
    if frames is None:
        frames = pattern_frames(len(times), H, W)
    path = Path(path)
    if LOSSLESS_CODEC == "libx264rgb":
        opts, fmt = {"crf": "0", "preset": "veryfast"}, "rgb24"
    else:
        path, opts, fmt = path.with_suffix(".mkv"), {}, "bgr0"
    # The nominal rate only seeds rate control; the real timing comes from the pts.
    return _encode(path, frames, times, Fraction(1, 1000), 30, LOSSLESS_CODEC, fmt, opts)


def make_h264_video(path: str | Path, frames: np.ndarray, fps: int, gop: int = 12, *,
                    rotation: int = 0, sample_aspect_ratio: Fraction | None = None) -> Path:
    """Write ``frames`` (T, H, W, 3) as plain lossy H.264 yuv420p MP4 at ``fps`` (like real files).

    A keyframe every ``gop`` frames (so seeking has several keyframes to choose from),
    B-frames on. Frame ``k`` is shown at ``k / fps`` seconds. ``H`` and ``W`` must be even.
    ``rotation`` / ``sample_aspect_ratio``: display metadata, see :func:`_encode`.
    """
    opts = {"crf": "18", "preset": "veryfast", "g": str(gop), "keyint_min": str(gop),
            "sc_threshold": "0"}
    return _encode(Path(path), frames, range(len(frames)), Fraction(1, fps), fps,
                   "libx264", "yuv420p", opts, rotation=rotation, sample_aspect_ratio=sample_aspect_ratio)


def make_truncated_video(path: str | Path) -> Path:
    """Write a valid 2 s H.264 MP4 (index at the front) and cut its data in the middle.

    The header and sample index survive, so the file opens and the first frames decode;
    reading the sample that lies past the cut fails inside the demuxer.
    """
    path = Path(path)
    # Noise makes every frame a few kB, so the cut falls between frames ~20 and ~30.
    frames = np.random.default_rng(1).integers(0, 256, size=(48, 64, 64, 3), dtype=np.uint8)
    opts = {"crf": "18", "preset": "veryfast", "g": "12"}
    _encode(path, frames, range(48), Fraction(1, 24), 24, "libx264", "yuv420p", opts,
            container_options={"movflags": "faststart"})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_zero_frame_video(path: str | Path) -> Path:
    """Write an AVI with one H.264 video stream (64x64, 24 fps) and no frames at all.

    AVI is used because its header keeps a track without samples (the MP4 muxer drops such
    a track, Matroska/TS write nothing readable); the returned path ends in ``.avi``.
    """
    path = Path(path).with_suffix(".avi")
    with av.open(str(path), mode="w", format="avi") as out:
        stream = out.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        out.start_encoding()
    return path


def make_non_video(path: str | Path) -> Path:
    """Write plain text bytes under a video-looking name (e.g. ``notes.mp4``)."""
    path = Path(path)
    path.write_text("this is not a video\n" * 20)
    return path


def make_audio_only(path: str | Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    """Write an AAC audio-only MP4/M4A (a 440 Hz tone), i.e. a container without video."""
    path = Path(path)
    n = int(seconds * rate)
    tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(n) / rate)).astype(np.float32)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        step = 1024
        for i in range(0, n, step):
            chunk = tone[i : i + step]
            frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def make_image_as_video(path: str | Path, H: int = 32, W: int = 48) -> Path:
    """Write a real PNG image (encoded by PyAV's png encoder) under a video name like ``x.mp4``."""
    path = Path(path)
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = W, H, "rgb24"
    frame = av.VideoFrame.from_ndarray(pattern_frames(1, H, W)[0], format="rgb24")
    data = b"".join(bytes(p) for p in ctx.encode(frame)) + b"".join(bytes(p) for p in ctx.encode(None))
    path.write_bytes(data)
    return path


def make_webm_video(path: str | Path, frames: np.ndarray, fps: int) -> Path:
    """Write ``frames`` (T, H, W, 3) as lossy VP9 in WebM at ``fps`` (``H``, ``W`` even).

    Like many real WebM files its header has no frame count (``stream.frames == 0``) and a
    1/1000 s time base, so frame ``k`` is shown at ``round(1000 k / fps) / 1000`` seconds.
    """
    opts = {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"}
    return _encode(Path(path).with_suffix(".webm"), frames, range(len(frames)), Fraction(1, fps),
                   fps, "libvpx-vp9", "yuv420p", opts)
