"""Video decoding with PyAV: frames selected by presentation time, resized, streamed in chunks.

Output layout: :class:`FrameChunk` ``frames`` are ``(n, S, S, 3)`` uint8 RGB (``(n, H, W, 3)``,
the displayed frame size, with the ``native`` geometry) and ``timestamps`` are ``(n,)``
float64 **seconds**.

Timeline
    A frame's time is its presentation timestamp in seconds minus the video stream's
    ``start_time`` (so an ordinary file starts at 0.0). A trimmed segment ``[start, end)``
    keeps that timeline: the segment 900-1800 s yields timestamps in ``[900, 1800)``.

Frame selection (``fps``)
    ``fps=None`` emits every decoded frame. For a target rate ``f`` the grid is
    ``t_k = t0 + k / f`` with ``t0 = start`` (or the first frame's time when ``start`` is
    None) and for each ``t_k`` the decoder emits the frame *on screen* at ``t_k``: the latest
    frame whose time is ``<= t_k``. The stored timestamp is that frame's real presentation
    time, never ``t_k``. Like ffmpeg's ``fps`` filter, a target rate above the native rate
    repeats frames; variable-frame-rate files are handled the same way since only the
    timestamps matter. Two edge rules: the first frame of the segment also stands for the
    grid point just before it (the segment starts on it), and no grid point past the last
    frame's time is emitted at the end of the file (a segment cut by ``end`` emits every
    grid point ``< end``). ``stream.frames`` from the header is never used for control flow.

Errors (:class:`DecodeError`, ``stage`` says where it failed)
    ``fetch``: a remote input (URL, tar member) kept failing with transient network errors
    after every retry (:mod:`extract.inputs`; the retries themselves are counted apart).
    ``open``: missing/unreadable file, not a media file, no video stream (audio only, a
    still image renamed ``.mp4``). ``decode``: the demuxer or decoder raised, or the
    demuxer flagged a packet as corrupt (a truncated MP4 cut inside a sample; with frame
    threading the decoder itself drops such errors silently). A file cut exactly between
    two packets just ends early and cannot be told from a short video. The product rule is
    that a corrupt file is quarantined with its stage and reason, so frames decoded before
    the corruption are *not* kept: the error is raised even if chunks were already yielded,
    and the consumer discards the partial video. ``empty``: no frame (in the requested
    segment). ``too_short``: fewer than ``min_frames`` frames; nothing is yielded before
    ``min_frames`` frames are available, so this error never follows a yielded chunk.
    ``too_long``: at a target ``fps``, more frames than the video can honestly hold: more
    than :func:`frame_cap` (its header duration times ``fps``, with a margin), or two
    consecutive frames more than ``max_gap`` seconds apart (one frame would be repeated
    for the whole gap). Like ``decode``, it can follow yielded chunks.

Bounded work
    A tiny variable-frame-rate file can ask for unbounded work: with a 100,000 s timestamp
    gap, ``fps=8`` repeats one frame 800,000 times. Two limits apply when ``fps`` is set:
    the stored-frame cap from the header duration (frames whose timestamps run far past
    what the header says) and, when the caller sets it, ``max_gap`` (the extraction does:
    ``ExtractConfig.max_gap``). Both raise ``too_long`` as soon as they are crossed, so the
    work done before is bounded by the cap or by ``max_gap * fps`` repeats.

Memory
    Frames are decoded, selected and converted one at a time and packed into fresh
    ``(chunk_size, S, S, 3)`` arrays; at most ``max(chunk_size, min_frames)`` output frames
    are held, whatever the length of the video (or of a VFR gap that repeats a frame).

Display
    With ``Geometry.display`` (the default) frames are shown as a player shows them before
    the geometry applies: rotated by the display matrix (multiples of 90 degrees) and
    stretched by the sample aspect ratio. Known limits: mirror flips in the display matrix
    are ignored, and colour conversion uses the frame's own colorspace tags.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Callable, Iterator

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

from extract.inputs import FetchError, open_input
from pipeline.errors import FreezeframeError
from pipeline.registry import Registry

__all__ = [
    "GEOMETRIES",
    "INTERPOLATIONS",
    "DecodeError",
    "FrameChunk",
    "Geometry",
    "GeometryError",
    "VideoProbe",
    "decode_all",
    "frame_cap",
    "iter_frames",
    "opened_video",
    "probe",
    "test_crop_boxes",
    "video_stream",
]

CropBox = tuple[int, int, int, int]  # (left, top, right, bottom) in the scaled image, pixels
GeometryFn = Callable[[int, int, int], tuple[int, int, CropBox]]

#: ``name -> fn(frame_w, frame_h, size) -> (scaled_w, scaled_h, (left, top, right, bottom))``.
GEOMETRIES: Registry[GeometryFn] = Registry("geometry")
#: ``name -> swscale algorithm`` used by ``VideoFrame.reformat``.
INTERPOLATIONS: Registry[Interpolation] = Registry("interpolation")
INTERPOLATIONS.add("bilinear", Interpolation.BILINEAR)
INTERPOLATIONS.add("bicubic", Interpolation.BICUBIC)
INTERPOLATIONS.add("area", Interpolation.AREA)


@GEOMETRIES.register("short_side_crop")
def short_side_crop(frame_w: int, frame_h: int, size: int) -> tuple[int, int, CropBox]:
    """Scale the short side to ``size`` (aspect kept), then take the centred ``size x size`` crop."""
    if frame_w <= frame_h:
        sw, sh = size, max(size, round(frame_h * size / frame_w))
    else:
        sw, sh = max(size, round(frame_w * size / frame_h)), size
    left, top = (sw - size) // 2, (sh - size) // 2
    return sw, sh, (left, top, left + size, top + size)


@GEOMETRIES.register("short_side")
def short_side(frame_w: int, frame_h: int, size: int) -> tuple[int, int, CropBox]:
    """Scale the short side to ``size`` (aspect kept, same size as ``short_side_crop``) and keep
    the whole scaled frame: ``(size, L, 3)`` or ``(L, size, 3)``. The extraction decodes the
    test videos of a store with spatial test crops this way and cuts them itself
    (:func:`test_crop_boxes`); not a choice of ``ExtractConfig.geometry``."""
    sw, sh, _ = short_side_crop(frame_w, frame_h, size)
    return sw, sh, (0, 0, sw, sh)


#: ``test_crop_boxes`` returns this many boxes (the only spatial test-crop count besides 1)
TEST_CROPS = 3


def test_crop_boxes(scaled_w: int, scaled_h: int, size: int) -> list[CropBox]:
    """The 3 spatial test crops (``size x size``) of a frame already scaled by ``short_side``
    (``scaled_w x scaled_h`` pixels): ``[first side, centre, second side]``, i.e. left, centre,
    right for a landscape frame and top, centre, bottom for a portrait one (the three coincide
    on a square frame). The centre box is exactly the crop of ``short_side_crop``, so the
    centre crop of a ``short_side`` frame is the ``short_side_crop`` frame, pixel for pixel."""
    left, top = (scaled_w - size) // 2, (scaled_h - size) // 2
    if scaled_w >= scaled_h:
        xs, ys = [0, left, scaled_w - size], [top] * 3
    else:
        xs, ys = [left] * 3, [0, top, scaled_h - size]
    return [(x, y, x + size, y + size) for x, y in zip(xs, ys)]


test_crop_boxes.__test__ = False  # type: ignore[attr-defined]  # pytest must not collect it on import


@GEOMETRIES.register("squash")
def squash(frame_w: int, frame_h: int, size: int) -> tuple[int, int, CropBox]:
    """Resize the whole frame to ``size x size`` (aspect ratio not kept, nothing cut off)."""
    return size, size, (0, 0, size, size)


@GEOMETRIES.register("native")
def native(frame_w: int, frame_h: int, size: int) -> tuple[int, int, CropBox]:
    """The whole frame at its own (displayed) size; ``size`` is ignored and chunks are
    ``(n, H, W, 3)`` (dense extraction resizes the frames itself, as it does frame files)."""
    return frame_w, frame_h, (0, 0, frame_w, frame_h)


class GeometryError(FreezeframeError, ValueError):
    """An invalid :class:`Geometry` (unknown mode/interpolation or a bad size)."""


@dataclass(frozen=True)
class Geometry:
    """How decoded frames become ``(S, S, 3)`` RGB images.

    Attributes:
        size: output side ``S`` in pixels (square output).
        mode: a :data:`GEOMETRIES` name: ``"short_side_crop"`` (scale the short side to
            ``S``, centre crop), ``"squash"`` (resize to ``S x S``) or ``"native"`` (the
            displayed frame at its own size ``H x W``, ``size`` ignored).
        interpolation: an :data:`INTERPOLATIONS` name: ``"bilinear"``, ``"bicubic"``,
            ``"area"`` (swscale, applied by ``VideoFrame.reformat``).
        display: show the picture as a player does before ``mode`` applies: rotate it by
            the display matrix (a phone's portrait video stored as landscape; multiples of
            90 degrees) and stretch it by the sample aspect ratio (anamorphic video).
            False: the coded pixels as stored.
    """

    size: int = 224
    mode: str = "short_side_crop"
    interpolation: str = "bilinear"
    display: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise GeometryError(f"geometry size must be a positive int, got {self.size!r}")
        for registry, value in ((GEOMETRIES, self.mode), (INTERPOLATIONS, self.interpolation)):
            if value not in registry:
                raise GeometryError(
                    f"unknown {registry.kind} {value!r}; choose one of: {', '.join(registry.names())}"
                )

    def to_dict(self) -> dict:
        """JSON-ready record of the geometry (stored with the features' provenance)."""
        return asdict(self)


@dataclass(frozen=True)
class VideoProbe:
    """What the container headers say about a video (nothing is decoded).

    Attributes:
        duration: seconds, or None when the headers do not say.
        fps: average frame rate (frames per second), or None when unknown.
        width, height: coded frame size in pixels.
        codec: decoder name, e.g. ``"h264"``.
        num_frames_header: ``stream.frames`` as written in the header; often 0 or wrong
            (WebM/MKV/TS), informational only.
    """

    duration: float | None
    fps: float | None
    width: int
    height: int
    codec: str
    num_frames_header: int

    def estimate_frames(
        self, fps: float | None = None, start: float | None = None, end: float | None = None
    ) -> int:
        """Best header-only estimate of how many frames :func:`iter_frames` would yield.

        ``fps=None`` estimates native frames; ``start``/``end`` are seconds as in
        :func:`iter_frames`. For planning only (VFR files and wrong headers make it approximate).
        """
        duration = self.duration
        if duration is None and self.num_frames_header > 0 and self.fps:
            duration = self.num_frames_header / self.fps
        rate = fps if fps is not None else self.fps
        if rate is None or (duration is None and end is None):
            return self.num_frames_header if fps is None and start is None and end is None else 0
        lo = max(start or 0.0, 0.0)
        if duration is None:  # only the segment is known
            return max(0, math.ceil((end - lo) * rate - 1e-6))
        # The last frame is shown at about duration - 1/native_fps; no grid point past it.
        last = duration - (1.0 / self.fps if self.fps else 0.0)
        if end is not None and end <= last + 1e-9:
            return max(0, math.ceil((end - lo) * rate - 1e-6))
        if last < lo:
            return 0
        return math.floor((last - lo) * rate + 1e-6) + 1


@dataclass
class FrameChunk:
    """A run of decoded frames.

    Attributes:
        frames: ``(n, S, S, 3)`` uint8 RGB.
        timestamps: ``(n,)`` float64, presentation time of each frame in seconds.
    """

    frames: np.ndarray
    timestamps: np.ndarray

    def __len__(self) -> int:
        return len(self.timestamps)


_HINTS = {
    "fetch": "reading it kept failing with network errors after every retry: check the connection "
    "or the endpoint, then rerun with --retry-failed",
    "open": "check it is a video (ffprobe shows a video stream) and fix or drop it from the manifest",
    "decode": "the file is corrupt or truncated: re-download or re-encode it "
    "(e.g. ffmpeg -i IN -c:v libx264 OUT.mp4), or drop it from the manifest",
    "empty": "it has no frames (in the requested segment): check start/end or drop it",
    "too_short": "lower min_frames or drop this video from the manifest",
    "too_long": "its timestamps span far more time than its frames (a variable-frame-rate gap or "
    "timestamps past the duration in its header): re-encode it at a constant rate "
    "(ffmpeg -i IN -fps_mode cfr -r 25 OUT.mp4), raise max_gap if long still frames are "
    "real, or drop it from the manifest",
}


class DecodeError(FreezeframeError):
    """A video cannot be decoded. ``stage`` is one of ``fetch``, ``open``, ``decode``, ``empty``,
    ``too_short``, ``too_long``.

    ``path`` is the video and ``reason`` what was found; ``str(error)`` adds what to do.
    """

    STAGES = tuple(_HINTS)

    def __init__(self, stage: str, path: str, reason: str) -> None:
        if stage not in _HINTS:
            raise ValueError(f"unknown decode stage {stage!r}")
        self.stage, self.path, self.reason = stage, str(path), reason
        super().__init__(f"{path}: {reason} [stage {stage}]; {_HINTS[stage]}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across worker processes
        return (type(self), (self.stage, self.path, self.reason))


# --------------------------------------------------------------------------- opening

_OPEN_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)
_DECODE_ERRORS = (av.FFmpegError, OSError, EOFError, MemoryError)
_IMAGE_DEMUXERS = {"image2", "image2pipe"}


def _is_url(path: str) -> bool:
    return "::" in path or "://" in path


def _open_container(path: str) -> tuple[av.container.InputContainer, Callable[[], None]]:
    """Open ``path`` (local or fsspec URL); return the container and a release function.

    URLs go through :func:`extract.inputs.open_input` (one cached file system per process,
    tar members by a cached index, transient errors retried)."""
    src = str(path)
    if src.startswith("file://") and "::" not in src:
        src = src[len("file://") :]
    release: Callable[[], None] = lambda: None  # noqa: E731
    try:
        if _is_url(src):
            fileobj = open_input(src)
            release = fileobj.close
            container = av.open(fileobj, mode="r", metadata_errors="ignore")
        else:
            container = av.open(src, mode="r", metadata_errors="ignore")
    except FetchError as e:
        release()
        raise DecodeError("fetch", path, str(e)) from e
    except _OPEN_ERRORS as e:
        release()
        what = "file not found" if isinstance(e, FileNotFoundError) else "cannot open as a media file"
        raise DecodeError("open", path, f"{what} ({type(e).__name__}: {e})") from e
    try:
        video_stream(container, path)
    except BaseException:
        container.close()
        release()
        raise
    return container, release


def _describe_streams(container: av.container.InputContainer) -> str:
    parts = []
    for s in container.streams:
        ctx = getattr(s, "codec_context", None)
        name = getattr(ctx, "name", None) or "unknown codec"
        extra = ", attached cover picture" if s.disposition & av.stream.Disposition.attached_pic else ""
        parts.append(f"{s.type} ({name}{extra})")
    return ", ".join(parts) or "no streams at all"


def video_stream(
    container: av.container.InputContainer, path: str = "<video>"
) -> av.video.stream.VideoStream:
    """The first real video stream of ``container`` (cover pictures and still images excluded).

    Raises:
        DecodeError(stage="open"): the container holds no video (audio only, an image, ...).
    """
    fmt = container.format.name
    if fmt.endswith("_pipe") or fmt in _IMAGE_DEMUXERS:
        kind = fmt.removesuffix("_pipe").upper()
        raise DecodeError("open", path, f"this is a still image ({kind}, demuxer {fmt}), not a video")
    for s in container.streams.video:
        if not s.disposition & av.stream.Disposition.attached_pic:
            return s
    raise DecodeError(
        "open", path, f"no video stream in this {fmt} file; found: {_describe_streams(container)}"
    )


@contextmanager
def opened_video(path: str | os.PathLike) -> Iterator[av.container.InputContainer]:
    """Open a local path or an fsspec URL (e.g. ``"tar://member.mp4::/x/shard.tar"``) for
    reading; the container and any fsspec files are closed on exit.

    Raises:
        DecodeError(stage="open"): missing file, not a media file, or no video stream.
    """
    container, release = _open_container(str(path))
    try:
        yield container
    finally:
        try:
            container.close()
        finally:
            release()


def _header_duration(container: av.container.InputContainer,
                     s: av.video.stream.VideoStream) -> float | None:
    """The video's duration in seconds from the headers (stream, else container), or None."""
    if s.duration is not None and s.time_base is not None and s.duration > 0:
        return float(s.duration * s.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    return None


def probe(path: str | os.PathLike) -> VideoProbe:
    """Read duration, frame rate, size and codec from the container headers (no decoding)."""
    with opened_video(path) as container:
        s = video_stream(container, str(path))
        duration = _header_duration(container, s)
        rate = s.average_rate or s.guessed_rate
        return VideoProbe(
            duration=duration,
            fps=float(rate) if rate else None,
            width=int(s.codec_context.width),
            height=int(s.codec_context.height),
            codec=s.codec_context.name,
            num_frames_header=int(s.frames or 0),
        )


# --------------------------------------------------------------------------- decoding


class _Timeline:
    """Converts frame pts to seconds on the stream's timeline (minus its start_time)."""

    def __init__(self, stream: av.video.stream.VideoStream) -> None:
        self.time_base: Fraction = stream.time_base or Fraction(1, 1_000_000)
        self.start_pts: int = stream.start_time or 0
        rate = stream.average_rate or stream.guessed_rate
        self.frame_step = float(1 / rate) if rate else 1 / 30
        # Half a tick absorbs pts rounding when comparing times with the fps grid / segment.
        self.eps = 0.5 * float(self.time_base) + 1e-9
        self.last: float | None = None

    def seconds(self, frame: av.VideoFrame) -> float:
        pts = frame.pts if frame.pts is not None else frame.dts
        if pts is None:  # no timestamp at all: assume the nominal frame step
            return 0.0 if self.last is None else self.last + self.frame_step
        return float((pts - self.start_pts) * self.time_base)

    def to_pts(self, seconds: float) -> int:
        return self.start_pts + math.floor(Fraction(seconds) / self.time_base)


class _CorruptPacket(EOFError):
    """The demuxer flagged a packet as corrupt (e.g. cut short by a truncated file)."""


def _demux_decode(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                  timeline: _Timeline) -> Iterator[av.VideoFrame]:
    """Like ``container.decode(stream)`` but raises on packets the demuxer flags as corrupt.

    With frame threading the decoder drops its errors silently, so the corrupt flag is what
    reveals a truncated file (the MP4 demuxer sets it on a sample cut by the end of file).
    """
    for packet in container.demux(stream):
        if packet.is_corrupt:
            at = f"{float((packet.pts - timeline.start_pts) * timeline.time_base):.3f} s" \
                if packet.pts is not None else "unknown time"
            raise _CorruptPacket(f"corrupt packet at {at}, the file is truncated or damaged")
        yield from packet.decode()


def _decode_from(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    start: float | None,
    timeline: _Timeline,
) -> Iterator[av.VideoFrame]:
    """Decoded frames in presentation order, starting at a keyframe at or before ``start``.

    Seeks backwards to a keyframe before ``start`` (seconds) so a long video is not decoded
    from its beginning. If a demuxer lands after ``start`` (inexact index), it seeks again
    further back (1 s, 2 s, 4 s, ... earlier) down to the beginning of the stream.
    """
    if start is None or start <= timeline.eps:
        yield from _demux_decode(container, stream, timeline)
        return
    margin = 0.0
    while True:
        target = max(start - margin, 0.0)
        try:
            container.seek(timeline.to_pts(target), backward=True, any_frame=False, stream=stream)
        except av.FFmpegError:
            if margin == 0.0:  # not seekable: still at the beginning, decode from there
                yield from _demux_decode(container, stream, timeline)
                return
            raise
        frames = _demux_decode(container, stream, timeline)
        first = next(frames, None)
        if first is None and target <= 0.0:
            return
        if first is not None and (target <= 0.0 or timeline.seconds(first) <= start + timeline.eps):
            yield first
            yield from frames
            return
        frames.close()
        margin = max(1.0, 2 * margin)


class _Selector:
    """Chooses which decoded frames to emit (see the module docstring for the rule).

    ``max_gap`` (seconds, None: no limit): with ``fps`` set, a frame may fill a gap of at most
    this long with repeats; a longer one raises ``DecodeError("too_long")`` before any repeat.
    """

    def __init__(self, fps: float | None, start: float | None, end: float | None, eps: float,
                 *, max_gap: float | None = None, src: str = "<video>") -> None:
        self.fps, self.start, self.end, self.eps = fps, start, end, eps
        self.max_gap, self.src = max_gap, src
        self.t0: float | None = start
        self.k = 0
        self.prev: tuple[av.VideoFrame, float] | None = None

    def _target(self) -> float:
        assert self.t0 is not None and self.fps is not None
        return self.t0 + self.k / self.fps

    def _check_gap(self, until: float, what: str) -> None:
        """Refuse to repeat the previous frame from its time up to ``until`` seconds if that is
        longer than ``max_gap``."""
        assert self.prev is not None and self.fps is not None
        gap = until - self.prev[1]
        if self.max_gap is not None and gap > self.max_gap + self.eps:
            raise DecodeError("too_long", self.src, (
                f"the frame at {self.prev[1]:.3f} s is followed by {what} {gap:.3f} s later, a gap over "
                f"max_gap={self.max_gap:g} s: at {self.fps:g} fps one frame would be stored about "
                f"{math.floor(gap * self.fps):,} times"))

    def push(self, frame: av.VideoFrame, t: float) -> Iterator[tuple[av.VideoFrame, float]]:
        """Feed a frame of the segment (``start <= t < end``); yield the frames to emit now
        (lazily: a long gap in a VFR file repeats a frame many times)."""
        if self.fps is None:
            yield frame, t
            return
        if self.prev is None:
            if self.t0 is None:
                self.t0 = t
            # The first frame stands for the last grid point at or before it.
            self.k = max(0, math.floor((t - self.t0) * self.fps + 1e-9))
        else:
            self._check_gap(t, "the next frame")
            while t > self._target() + self.eps:
                yield self.prev
                self.k += 1
        self.prev = (frame, t)

    def finish(self, cut_by_end: bool) -> Iterator[tuple[av.VideoFrame, float]]:
        """Frames still owed at the end: grid points ``< end`` if ``end`` stopped decoding,
        else grid points up to the last frame's time."""
        if self.fps is None or self.prev is None:
            return
        last_t = self.prev[1]
        if cut_by_end:
            assert self.end is not None
            self._check_gap(self.end, "the end of the segment")
        while True:
            target = self._target()
            if cut_by_end:
                assert self.end is not None
                if target >= self.end - self.eps:
                    break
            elif target > last_t + self.eps:
                break
            yield self.prev
            self.k += 1


class _Converter:
    """Frame -> ``(S, S, 3)`` uint8 RGB with the geometry; caches the last frame (repeats).

    One :class:`VideoReformatter` serves the whole video: ``VideoFrame.reformat`` builds a
    new swscale context (its filter tables) for every frame, which costs 2-3x the scaling
    itself; the cached context gives bit-identical pixels.
    """

    def __init__(self, geometry: Geometry, stream: av.video.stream.VideoStream) -> None:
        self.size = geometry.size
        self.fn = GEOMETRIES.get(geometry.mode)
        self.interp = INTERPOLATIONS.get(geometry.interpolation)
        self.display = geometry.display
        self.stream = stream
        self.reformatter = VideoReformatter()
        self._last: tuple[av.VideoFrame, np.ndarray] | None = None

    def _pixel_aspect(self) -> float:
        """Sample aspect ratio (pixel width / height) of the stream; 1 when unknown or unset."""
        sar = self.stream.codec_context.sample_aspect_ratio
        return float(sar) if sar else 1.0

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if self._last is not None and self._last[0] is frame:
            return self._last[1]
        quarters = round(frame.rotation / 90) % 4 if self.display else 0  # counter-clockwise
        shown_w = frame.width * (self._pixel_aspect() if self.display else 1.0)
        shown = (frame.height, shown_w) if quarters % 2 else (shown_w, frame.height)
        sw, sh, (left, top, right, bottom) = self.fn(max(1, round(shown[0])), max(1, round(shown[1])), self.size)
        tw, th = (sh, sw) if quarters % 2 else (sw, sh)  # scale the coded picture, then rotate it
        rgb = self.reformatter.reformat(frame, width=tw, height=th, format="rgb24", interpolation=self.interp)
        image = rgb.to_ndarray()
        if quarters:
            image = np.rot90(image, k=quarters)
        arr = image[top:bottom, left:right]
        self._last = (frame, arr)
        return arr


class _Chunker:
    """Packs ``(H, W, 3)`` images (``(S, S, 3)`` but for the ``native`` geometry) into fresh
    ``(chunk_size, H, W, 3)`` arrays (never reused), shaped by the first image."""

    def __init__(self, chunk_size: int, src: str = "<video>") -> None:
        self.chunk_size, self.src = chunk_size, src
        self.shape: tuple[int, ...] | None = None
        self.total = 0
        self.n = 0

    def _new(self) -> None:
        assert self.shape is not None
        self.frames = np.empty((self.chunk_size, *self.shape), dtype=np.uint8)
        self.times = np.empty(self.chunk_size, dtype=np.float64)
        self.n = 0

    def add(self, image: np.ndarray, t: float) -> FrameChunk | None:
        """Store one image; return the chunk when it is full."""
        if self.shape is None:
            self.shape = image.shape
            self._new()
        elif image.shape != self.shape:  # only the native geometry follows the coded size
            raise DecodeError("decode", self.src, f"the frame at {t:.3f} s is {image.shape[1]}x{image.shape[0]}, "
                              f"the first {self.shape[1]}x{self.shape[0]}: the size changes mid-stream")
        self.frames[self.n] = image
        self.times[self.n] = t
        self.n += 1
        self.total += 1
        if self.n < self.chunk_size:
            return None
        full = FrameChunk(self.frames, self.times)
        self._new()
        return full

    def flush(self) -> FrameChunk | None:
        """The last, partial chunk (None when empty)."""
        if self.n == 0:
            return None
        return FrameChunk(self.frames[: self.n], self.times[: self.n])


#: :func:`frame_cap` allows this much more time than the header states (fraction) ...
CAP_MARGIN = 0.25
#: ... plus this many seconds of frames.
CAP_SLACK_S = 1.0


def frame_cap(duration: float | None, fps: float, start: float | None = None,
              end: float | None = None) -> int | None:
    """Most frames :func:`iter_frames` stores at ``fps`` for a video whose header says it lasts
    ``duration`` seconds (segment ``[start, end)`` in seconds, as in :func:`iter_frames`).

    ``ceil(fps * ((1 + CAP_MARGIN) * span + CAP_SLACK_S))`` where ``span`` is the segment's
    length within the duration; None (no cap) when neither ``duration`` nor ``end`` is known.
    """
    lo = start or 0.0
    if duration is None:
        if end is None:
            return None
        span = end - lo
    else:
        span = (min(end, duration) if end is not None else duration) - lo
    return math.ceil(fps * ((1 + CAP_MARGIN) * max(span, 0.0) + CAP_SLACK_S))


class _Emitter:
    """Selected ``(frame, t)`` pairs -> :class:`FrameChunk` s: converts each frame to an image,
    enforces the stored-frame ``cap`` (``too_long``) and holds full chunks back until
    ``min_frames`` frames exist; :meth:`close` checks ``empty`` / ``too_short`` and yields
    the rest. Shared by every decoder so that they apply the same rules."""

    def __init__(self, convert: Callable[[Any], np.ndarray], *, chunk_size: int,
                 fps: float | None, cap: int | None, span: str, min_frames: int, src: str) -> None:
        self.convert, self.fps, self.cap, self.span = convert, fps, cap, span
        self.min_frames, self.src = min_frames, src
        self.chunker = _Chunker(chunk_size, src)
        self.pending: list[FrameChunk] = []  # full chunks held back until min_frames frames exist

    def emit(self, items: Iterator[tuple[Any, float]]) -> Iterator[FrameChunk]:
        chunker = self.chunker
        for frame, t in items:
            try:
                image = self.convert(frame)
            except _DECODE_ERRORS as e:
                raise DecodeError("decode", self.src, f"cannot convert the frame at {t:.3f} s to RGB "
                                  f"({type(e).__name__}: {e})") from e
            full = chunker.add(image, t)
            if self.cap is not None and chunker.total > self.cap:
                raise DecodeError("too_long", self.src, (
                    f"more than {self.cap:,} frames at {self.fps:g} fps, the cap for {self.span} "
                    f"(+{CAP_MARGIN:.0%} +{CAP_SLACK_S:g} s): timestamps run past the duration its "
                    f"header states (frame at {t:.3f} s)"))
            if full is not None:
                self.pending.append(full)
                if chunker.total >= self.min_frames:
                    yield from self.pending
                    self.pending.clear()

    def close(self, start: float | None, end: float | None) -> Iterator[FrameChunk]:
        total = self.chunker.total
        segment = "" if start is None and end is None else f" in segment [{start or 0.0}, {end or 'end'}) s"
        if total == 0:
            raise DecodeError("empty", self.src, f"no frames decoded{segment}")
        if total < self.min_frames:
            raise DecodeError("too_short", self.src,
                              f"{total} frames{segment}, fewer than min_frames={self.min_frames}")
        yield from self.pending
        last = self.chunker.flush()
        if last is not None:
            yield last


#: what :func:`_place` says of a decoded frame
TAKE, SKIP, STOP = 0, 1, 2


def _place(t: float, last: float | None, start: float | None, end: float | None, eps: float) -> int:
    """Where a decoded frame shown at ``t`` seconds falls, the same rule for every decoder:
    SKIP a repeated or backwards timestamp (the first one shown is kept) or a frame before
    ``start``; STOP at or after ``end``; else TAKE."""
    if last is not None and t <= last:
        return SKIP
    if start is not None and t < start - eps:
        return SKIP
    if end is not None and t >= end - eps:
        return STOP
    return TAKE


def _span_text(header_duration: float | None, start: float | None, end: float | None) -> str:
    """What the frame cap was computed from, for the ``too_long`` message."""
    span = "its unknown duration" if header_duration is None else f"its header duration of {header_duration:.3f} s"
    if start is not None or end is not None:
        span = f"the segment [{start or 0.0}, {end or 'end'}) s within {span}"
    return span


def _check_args(fps: float | None, start: float | None, end: float | None, chunk_size: int,
                threads: int, min_frames: int) -> None:
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0 or None (every frame), got {fps}")
    if start is not None and start < 0:
        raise ValueError(f"start must be >= 0 seconds, got {start}")
    if end is not None and end <= (start or 0.0):
        raise ValueError(f"end ({end} s) must be after start ({start or 0.0} s)")
    if chunk_size < 1 or threads < 0 or min_frames < 0:
        raise ValueError("chunk_size must be >= 1, threads >= 0 and min_frames >= 0")


def iter_frames(
    path: str | os.PathLike,
    *,
    geometry: Geometry,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    chunk_size: int = 32,
    threads: int = 0,
    min_frames: int = 1,
    max_gap: float | None = None,
) -> Iterator[FrameChunk]:
    """Decode ``path`` and yield :class:`FrameChunk` s of at most ``chunk_size`` frames.

    Args:
        path: local path or fsspec URL (``"tar://member.mp4::/x/shard.tar"``).
        geometry: output size / resize mode; frames come out ``(n, S, S, 3)`` uint8 RGB.
        fps: target frames per second chosen by presentation time (None: every frame).
            Above the native rate frames repeat (like ffmpeg's ``fps`` filter).
        start, end: segment ``[start, end)`` in seconds on the video's timeline; ``start``
            seeks to the preceding keyframe. Timestamps keep the source timeline.
        chunk_size: frames per chunk; memory stays ``O(max(chunk_size, min_frames))``
            frames whatever the video length.
        threads: codec threads (``thread_type="AUTO"``); 0 = library default.
        min_frames: fewer frames -> ``DecodeError(stage="too_short")``. Nothing is yielded
            until ``min_frames`` frames are available.
        max_gap: with ``fps`` set, the longest gap (seconds) between two consecutive frames
            that may be filled by repeating the first one; None: no limit. With ``fps`` set
            the stored frames are also capped by :func:`frame_cap` of the header duration.

    Raises:
        DecodeError: stage ``open`` / ``decode`` / ``empty`` / ``too_short`` / ``too_long``.
            A ``decode`` or ``too_long`` error can follow yielded chunks: the consumer must
            discard the partial video.
    """
    _check_args(fps, start, end, chunk_size, threads, min_frames)
    if max_gap is not None and not max_gap > 0:
        raise ValueError(f"max_gap must be > 0 seconds or None (no limit), got {max_gap}")
    src = str(path)

    with opened_video(src) as container:
        stream = video_stream(container, src)
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        timeline = _Timeline(stream)
        eps = timeline.eps
        selector = _Selector(fps, start, end, eps, max_gap=max_gap, src=src)
        header_duration = _header_duration(container, stream)
        out = _Emitter(_Converter(geometry, stream), chunk_size=chunk_size, fps=fps,
                       cap=None if fps is None else frame_cap(header_duration, fps, start, end),
                       span=_span_text(header_duration, start, end), min_frames=min_frames, src=src)
        frames = _decode_from(container, stream, start, timeline)
        cut_by_end = False
        try:
            while True:
                try:
                    frame = next(frames)
                except StopIteration:
                    break
                except FetchError as e:  # a remote input's network errors outlasted the retries
                    raise DecodeError("fetch", src, str(e)) from e
                except _DECODE_ERRORS as e:
                    where = f" after {timeline.last:.3f} s" if timeline.last is not None else ""
                    raise DecodeError("decode", src, f"demux/decode failed{where} "
                                      f"({type(e).__name__}: {e})") from e
                t = timeline.seconds(frame)
                place = _place(t, timeline.last, start, end, eps)
                if place == SKIP:
                    continue
                if place == STOP:
                    cut_by_end = True
                    break
                timeline.last = t
                yield from out.emit(selector.push(frame, t))
            yield from out.emit(selector.finish(cut_by_end))
        finally:
            frames.close()
    yield from out.close(start, end)


def decode_all(
    path: str | os.PathLike,
    *,
    geometry: Geometry,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    chunk_size: int = 32,
    threads: int = 0,
    min_frames: int = 1,
    max_gap: float | None = None,
) -> FrameChunk:
    """All of :func:`iter_frames` concatenated (for tests and small videos): ``(N, S, S, 3)``, ``(N,)``."""
    chunks = list(iter_frames(path, geometry=geometry, fps=fps, start=start, end=end,
                              chunk_size=chunk_size, threads=threads, min_frames=min_frames,
                              max_gap=max_gap))
    return FrameChunk(
        frames=np.concatenate([c.frames for c in chunks]),
        timestamps=np.concatenate([c.timestamps for c in chunks]),
    )
