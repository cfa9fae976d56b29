"""``freezeframe plan``: what an extraction would produce, from container headers only.

It takes the same :class:`~extract.config.ExtractConfig` as ``freezeframe extract`` (built
by :func:`extract.config.resolve_extract_config`) and plans shards with the same
:func:`extract.runner.plan_shards`.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import numpy as np

from extract.backbones import create_backbone
from extract.config import ExtractConfig
from extract.decode import DecodeError, probe
from extract.encode import feature_shape
from extract.runner import plan_shards
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

    @property
    def bytes(self) -> int:
        return self.frames * self.bytes_per_frame


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


def make_plan(rows: list[ManifestRow], cfg: ExtractConfig, shape: tuple[int, int, int]) -> Plan:
    """Probe every video's header (no decoding) and add up frames, bytes and shards.

    Paths that are not regular files (a FIFO would block the probe forever) are listed in
    ``unreadable`` without being opened."""
    require_fs_libraries(r.path for r in rows)  # s3:// without s3fs: one line with the pip command
    frames = 0
    seconds = 0.0
    bad: list[tuple[str, str]] = []
    for r in rows:
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
    )


def plan_extraction(cfg: ExtractConfig) -> Plan:
    """The plan of ``cfg.manifest`` for ``cfg`` (``freezeframe plan``): the backbone is built
    with random weights, since only its grid and width are needed (no checkpoint is read)."""
    backbone = create_backbone(cfg.backbone, pretrained=False, image_size=cfg.image_size)
    return make_plan(read_manifest(cfg.manifest), cfg, feature_shape(backbone, cfg))
