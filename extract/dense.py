"""Dense extraction: patch features of every frame at a benchmark's protocol resolution.

Label propagation (DAVIS-2017, JHMDB, VIP) needs every frame of a video at a protocol
input size that is not square (DAVIS 480 x 880), so it does not go through the square
``extract`` pipeline: frames are read from the video's frame folder (JPEG / PNG, the
layout the benchmarks ship) or decoded from a video file, resized **whole** (no crop) to
the input size of the size policy, run through :meth:`Backbone.forward_dense`, and written
to a regular feature store (zarr v3, one shard per video so grids may differ between
videos) whose markers record each video's geometry::

    {"frame_size": [H, W], "input_size": [Hi, Wi], "grid": [h, w], "frames": [names...]}

Because the whole frame is resized, grid cell ``(i, j)`` covers exactly the original
pixels ``[i H / h, (i + 1) H / h) x [j W / w, (j + 1) W / w)``: labels map back to pixels
without any offset (:mod:`train.dense.adapters`).

Size policies (:data:`SIZE_POLICIES`, ``(frame H, W, step) -> (Hi, Wi)``; sides floored to
the backbone's ``dense_step``):

* ``davis``: 480 x 880;
* ``jhmdb``: 320 x 320;
* ``vip``: long side 880, short side scaled with the aspect ratio and floored to a
  multiple of 64;
* ``native``: the frame size floored to the step (small synthetic data).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from extract.backbones import Backbone, create_backbone
from manifests.dense import DenseVideo
from pipeline.config import runtime
from pipeline.errors import FreezeframeError, StoreError
from pipeline.manifest import manifest_sha256
from pipeline.registry import Registry
from pipeline.store import ShardWriter, init_store, marker_path, open_store, shard_name

__all__ = [
    "SIZE_POLICIES",
    "DenseExtractConfig",
    "DenseExtractError",
    "input_size",
    "read_frame_folder",
    "prepare_frames",
    "extract_dense",
    "video_geometry",
]

SizePolicy = Callable[[int, int, int], tuple[int, int]]
SIZE_POLICIES: Registry[SizePolicy] = Registry("dense size policy")


class DenseExtractError(FreezeframeError):
    """A video cannot be extracted densely (unreadable frame, sizes that differ, ...)."""


def _floor(v: float, step: int) -> int:
    return max(step, int(v) // step * step)


SIZE_POLICIES.add("davis", lambda h, w, step: (_floor(480, step), _floor(880, step)))
SIZE_POLICIES.add("jhmdb", lambda h, w, step: (_floor(320, step), _floor(320, step)))
SIZE_POLICIES.add("native", lambda h, w, step: (_floor(h, step), _floor(w, step)))


@SIZE_POLICIES.register("vip")
def _vip(h: int, w: int, step: int) -> tuple[int, int]:
    long_side = 880
    short = math.floor(min(h, w) * long_side / max(h, w) / 64) * 64
    short = _floor(max(short, 64), step)
    long_side = _floor(long_side, step)
    return (long_side, short) if h >= w else (short, long_side)


def input_size(policy: str, frame_size: tuple[int, int], step: int) -> tuple[int, int]:
    """``(Hi, Wi)`` input pixels for a ``frame_size`` frame under ``policy``."""
    return SIZE_POLICIES.get(policy)(frame_size[0], frame_size[1], step)


@dataclass(frozen=True)
class DenseExtractConfig:
    """What a dense store holds (content) and how fast it is made (runtime knobs).

    Attributes:
        backbone: registry name of the frozen backbone.
        weights: local checkpoint file (None: the library's pretrained weights).
        random_weights: untrained backbone (tests only).
        size_policy: a :data:`SIZE_POLICIES` name.
        interpolation: frame resize (``bicubic`` or ``bilinear``, antialiased);
            None: the backbone's preprocessing interpolation.
        dtype: stored dtype (``float16``, ``float32``, ``int8``).
        fps: nominal frame rate giving frame-folder timestamps (``index / fps`` seconds).
        batch_size: frames per forward (runtime).
        device: where the backbone runs (runtime).
    """

    backbone: str = "mobilenetv2-imagenet"
    weights: str | None = None
    random_weights: bool = False
    size_policy: str = "davis"
    interpolation: str | None = None
    dtype: str = "float16"
    fps: float = 24.0
    batch_size: int = runtime(8)
    device: str = runtime("cpu")


def read_frame_folder(video: DenseVideo) -> Iterator[np.ndarray]:
    """Frames of ``video`` as ``(H, W, 3)`` uint8 RGB, in order (JPEG / PNG files)."""
    for path in video.frames:
        try:
            with Image.open(path) as im:
                yield np.asarray(im.convert("RGB"))
        except OSError as e:
            raise DenseExtractError(f"{video.video_id}: cannot read frame {path!r} ({e})") from None


def prepare_frames(frames: np.ndarray, backbone: Backbone, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """``(n, H, W, 3)`` uint8 -> ``(n, 3, Hi, Wi)`` float32, resized whole and normalised."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255.0)
    if tuple(x.shape[2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=True).clamp_(0, 1)
    mean = torch.tensor(backbone.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(backbone.preprocess.std).view(1, 3, 1, 1)
    return (x - mean) / std


def video_geometry(store_path: str | os.PathLike) -> dict[str, dict]:
    """``video_id -> {"frame_size", "input_size", "grid", "frames"}`` from a dense store's markers."""
    store = open_store(store_path)
    out = {}
    for marker in store.markers.values():
        for v in marker["videos"]:
            if "geometry" not in v:
                raise StoreError(f"{store_path}: video {v['video_id']!r} has no dense geometry; extract it with extract_dense")
            out[v["video_id"]] = v["geometry"]
    return out


def _header(cfg: DenseExtractConfig, backbone: Backbone, videos: Sequence[DenseVideo], interpolation: str) -> dict:
    desc = backbone.describe()
    return {
        "format_version": 1,
        "kind": "dense",
        "content": {
            "backbone": cfg.backbone,
            "weights_sha256": backbone.weights_sha256,
            "weights_source": backbone.weights_source,
            "size_policy": cfg.size_policy,
            "interpolation": interpolation,
            "dense_step": backbone.dense_step,
            "dtype": cfg.dtype,
            "fps": cfg.fps,
            "channels": backbone.channels,
            "feature_shape": None,  # per video: see each video's geometry
            "manifest_sha256": manifest_sha256([v.row() for v in videos]),
            "num_videos": len(videos),
            "num_shards": len(videos),  # shard k = video k, so status/verify see what is missing
            "videos_per_shard": 1,
        },
        "backbone": desc,
    }


def extract_dense(
    videos: Sequence[DenseVideo],
    store_path: str | os.PathLike,
    cfg: DenseExtractConfig = DenseExtractConfig(),
    *,
    backbone: Backbone | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Extract every frame of every video into the dense store at ``store_path``.

    Video ``k`` goes to shard ``k`` (manifest order); a finished shard is skipped, so a
    rerun after a crash resumes. Returns the store path.

    Raises:
        ConfigMismatchError: the store exists with other content settings.
        DenseExtractError: a frame cannot be read or the frames of a video differ in size.
    """
    bb = backbone or create_backbone(
        cfg.backbone, weights=cfg.weights, pretrained=not cfg.random_weights, dynamic_size=True
    )
    if not bb.dense_step:
        raise DenseExtractError(f"backbone {cfg.backbone!r} has no any-size forward")
    interp = cfg.interpolation or bb.preprocess.interpolation
    root = Path(store_path)
    init_store(root, _header(cfg, bb, videos, interp))
    device = torch.device(cfg.device)
    bb = bb.to(device)
    for k, video in enumerate(videos):
        name = shard_name(k)
        if marker_path(root, name).exists():
            continue
        frames = np.stack(list(read_frame_folder(video)))
        if frames.shape[0] != len(video.frames):
            raise DenseExtractError(f"{video.video_id}: read {frames.shape[0]} of {len(video.frames)} frames")
        h, w = frames.shape[1:3]
        size = input_size(cfg.size_policy, (h, w), bb.dense_step)
        grid = bb.dense_grid(*size)
        writer = ShardWriter.create(root, name, feature_shape=(*grid, bb.channels), dtype=cfg.dtype,
                                    frames_per_file=max(1, len(video.frames)))
        geometry = {"frame_size": [h, w], "input_size": list(size), "grid": list(grid),
                    "frames": list(video.frame_names)}
        writer.begin_video({"video_id": video.video_id, "split": video.split, "label": None,
                            "label_name": None, "geometry": geometry})
        with torch.inference_mode():
            for i in range(0, len(frames), cfg.batch_size):
                x = prepare_frames(frames[i : i + cfg.batch_size], bb, size, interp).to(device)
                feats = bb.forward_dense(x).cpu().numpy()
                ts = np.arange(i, i + feats.shape[0], dtype=np.float64) / cfg.fps
                writer.append(feats, ts)
        writer.end_video()
        writer.finish()
        if progress is not None:
            progress(video.video_id, k + 1, len(videos))
    return root
