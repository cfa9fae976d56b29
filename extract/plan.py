"""``freezeframe plan``: what an extraction would produce and cost, without decoding.

It takes the same :class:`~extract.config.ExtractConfig` as ``freezeframe extract`` (built
by :func:`extract.config.resolve_extract_config`) and plans shards with the same
:func:`extract.runner.plan_shards`. Frames come from the container headers
(:func:`make_plan`), from the manifest's segments (``start``/``end``) for videos that are not
on this machine, or from a ``N videos x S seconds`` estimate (:func:`estimate_plan`) when
there is no manifest yet. Hours: frames / (frames/s per device x devices), the rate measured
by ``python -m bench.backbones`` (docs/bench-backbones.json, :func:`measured_rate`) unless
given (docs/scale.md).
"""
from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from extract.backbones import create_backbone
from extract.config import ExtractConfig
from extract.decode import DecodeError, probe
from extract.encode import feature_shape
from extract.runner import plan_shards
from pipeline.errors import FreezeframeError
from pipeline.manifest import ManifestRow, read_manifest
from pipeline.remote import require_fs_libraries
from pipeline.store import STORAGE_DTYPES


@dataclass
class Plan:
    videos: int
    shards: int
    frames: int  # estimated frames to store
    seconds_of_video: float
    feature_shape: tuple[int, int, int]
    bytes_per_frame: int  # uncompressed, including int8 scales and timestamps
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (video_id, reason)
    #: how ``frames`` was obtained: "headers", "headers + manifest segments", "estimate"
    source: str = "headers"
    #: videos not on this machine whose frames come from their manifest segment (start/end)
    from_segments: int = 0

    @property
    def bytes(self) -> int:
        return self.frames * self.bytes_per_frame

    def bytes_as(self, dtype: str) -> int:
        """Uncompressed store bytes if stored as ``dtype`` (same grid)."""
        return self.frames * bytes_per_frame(self.feature_shape, dtype)


#: where ``python -m bench.backbones`` records the measured backbone rates (docs/benchmarks.md)
RATES_FILE = Path(__file__).resolve().parents[1] / "docs" / "bench-backbones.json"


@dataclass(frozen=True)
class Rate:
    """Frames/s of one device and where the number comes from."""

    frames_per_s: float
    source: str


def measured_rate(backbone: str, path: Path = RATES_FILE) -> Rate | None:
    """The model-only frames/s measured for ``backbone`` (None if it was not measured)."""
    try:
        data = json.loads(path.read_text())
        r = data["backbones"][backbone]
        return Rate(float(r["frames_per_s"]), f"measured: {data.get('machine', '?')}, {data.get('date', '?')}, "
                                              f"{r.get('weights', '?')} weights (docs/benchmarks.md)")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def device_hours(frames: int, frames_per_s: float, devices: int) -> float:
    """Wall-clock hours for ``frames`` on ``devices`` devices of ``frames_per_s`` each
    (perfect split: dynamic shard claiming keeps every device busy to the last shard)."""
    return frames / (frames_per_s * max(1, devices)) / 3600.0


def bytes_per_frame(shape: tuple[int, int, int], dtype: str) -> int:
    """Uncompressed bytes stored per frame (features + extras + float64 timestamp)."""
    h, w, c = shape
    sd = STORAGE_DTYPES.get(dtype)
    extra = sum(h * w * np.dtype(dt).itemsize for dt in sd.extras.values())
    return h * w * c * np.dtype(sd.feature_dtype).itemsize + extra + np.dtype(np.float64).itemsize


def special_file(path: str) -> str | None:
    """What a local ``path`` is if it exists but is not a regular file (``"a FIFO"``,
    ``"a directory"``, ...), else None. Opening a FIFO blocks until someone writes to it, so
    :func:`make_plan` reports such paths instead of probing them. For a chained fsspec URL
    (``tar://member::/x/shard.tar``) the local file at its end is checked."""
    local = path.rsplit("::", 1)[-1]
    if local.startswith("file://"):
        local = local[len("file://"):]
    elif "://" in local:
        return None
    try:
        mode = os.stat(local).st_mode
    except OSError:  # missing or unreadable: the probe says so
        return None
    for test, what in ((stat.S_ISREG, None), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "not a regular file"


def _absent(path: str) -> bool:
    """A local path (not a URL) with no file behind it."""
    local = path.rsplit("::", 1)[-1]
    local = local[len("file://"):] if local.startswith("file://") else local
    return "://" not in local and not os.path.exists(local)


def make_plan(rows: list[ManifestRow], cfg: ExtractConfig, shape: tuple[int, int, int],
              native_fps: float = 30.0) -> Plan:
    """Probe every video's header (no decoding) and add up frames, bytes and shards.

    A video that is not on this machine but whose manifest row has a segment (``start`` and
    ``end``, seconds) counts ``(end - start) x fps`` frames (``native_fps`` when ``cfg.fps``
    keeps every frame). Paths that are not regular files (a FIFO would block the probe
    forever) are listed in ``unreadable`` without being opened."""
    require_fs_libraries(r.path for r in rows)  # s3:// without s3fs: one line with the pip command
    frames = 0
    seconds = 0.0
    segments = 0
    bad: list[tuple[str, str]] = []
    for r in rows:
        if r.start is not None and r.end is not None and _absent(r.path):
            dur = max(r.end - r.start, 0.0)
            frames += round(dur * (cfg.fps or native_fps))
            seconds += dur
            segments += 1
            continue
        kind = special_file(r.path)
        if kind is not None:
            bad.append((r.video_id, f"{r.path}: {kind}, not a regular file; not opened "
                                    "(point the manifest at the video file itself)"))
            continue
        try:
            p = probe(r.path)
        except DecodeError as e:
            bad.append((r.video_id, str(e)))
            continue
        n = p.estimate_frames(fps=cfg.fps, start=r.start, end=r.end)
        frames += n
        dur = p.duration or 0.0
        lo = r.start or 0.0
        hi = min(r.end, dur) if r.end is not None and dur else (r.end or dur)
        seconds += max(hi - lo, 0.0)
    return Plan(
        videos=len(rows),
        shards=len(plan_shards(rows, cfg.videos_per_shard)),
        frames=frames,
        seconds_of_video=seconds,
        feature_shape=shape,
        bytes_per_frame=bytes_per_frame(shape, cfg.dtype),
        unreadable=bad,
        source="headers + manifest segments" if segments else "headers",
        from_segments=segments,
    )


def estimate_plan(cfg: ExtractConfig, shape: tuple[int, int, int], videos: int, seconds: float,
                  native_fps: float = 30.0) -> Plan:
    """The plan of ``videos`` videos of ``seconds`` seconds each, without a manifest:
    ``seconds x fps`` frames per video (``native_fps`` when ``cfg.fps`` keeps every frame)."""
    if videos < 1 or not seconds > 0 or not native_fps > 0:
        raise FreezeframeError(f"an estimate needs --videos >= 1, --seconds > 0 and --native-fps > 0 "
                               f"(got {videos}, {seconds}, {native_fps})")
    per_video = round(seconds * (cfg.fps or native_fps))
    return Plan(videos=videos, shards=math.ceil(videos / cfg.videos_per_shard), frames=videos * per_video,
                seconds_of_video=videos * seconds, feature_shape=shape,
                bytes_per_frame=bytes_per_frame(shape, cfg.dtype), source="estimate")


def plan_shape(cfg: ExtractConfig) -> tuple[int, int, int]:
    """The stored (H, W, C) per frame: the backbone is built with random weights, since only
    its grid and width are needed (no checkpoint is read)."""
    backbone = create_backbone(cfg.backbone, pretrained=False, image_size=cfg.image_size)
    return feature_shape(backbone, cfg)


def plan_extraction(cfg: ExtractConfig, native_fps: float = 30.0) -> Plan:
    """The plan of ``cfg.manifest`` for ``cfg`` (``freezeframe plan``)."""
    return make_plan(read_manifest(cfg.manifest), cfg, plan_shape(cfg), native_fps)
