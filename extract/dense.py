"""Dense extraction: patch features of every frame at a benchmark's protocol resolution.

Label propagation (DAVIS-2017, JHMDB, VIP) needs every frame of a video at a protocol
input size that is not square (DAVIS 480 x 880), so it does not go through the square
``extract`` pipeline: frames are read from the video's frame folder (JPEG / PNG, the
layout the benchmarks ship) or, when ``DenseVideo.video`` names a file, decoded from it
with the stage-1 PyAV decoder (:func:`extract.decode.iter_frames`, frames selected by
presentation time at ``fps``, at their own displayed size: the ``native`` geometry). Either
way the frames, ``(n, H, W, 3)`` uint8 batch by batch, are resized **whole** (no crop) to the
input size of the size policy by the same torch resize, so a lossless video and the
folder of its frames give the same features. They go through
:meth:`Backbone.forward_dense` and into a regular feature store (zarr v3, one shard per
video so grids may differ between videos) whose markers record each video's geometry::

    {"frame_size": [H, W], "input_size": [Hi, Wi], "grid": [h, w], "frames": [names...]}

and whose header's ``feature_shape`` is ``[h, w, C]`` when every video has the same grid
(DAVIS, JHMDB), else ``[None, None, C]`` (VIP: each video's grid is in its geometry).
Timestamps (seconds): ``index / fps`` for frame files, the decoded presentation times for
a video file.

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
from extract.decode import Geometry, iter_frames
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
    "iter_video_frames",
    "frame_size",
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
        fps: frames per second: frame-folder timestamps are ``index / fps`` seconds; from a
            video file frames are selected at this rate by presentation time (as stage 1
            does), and there must be as many as the video's frame names.
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


#: the stage-1 decoder's geometry for dense extraction: whole frames at their displayed size
NATIVE = Geometry(mode="native")


def _decoded(video: DenseVideo, fps: float, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for chunk in iter_frames(video.video, geometry=NATIVE, fps=fps, chunk_size=chunk_size):
        yield chunk.frames, chunk.timestamps


def _from_folder(video: DenseVideo, fps: float, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    frames = read_frame_folder(video)
    for i in range(0, len(video.frames), chunk_size):
        batch = [next(frames) for _ in range(min(chunk_size, len(video.frames) - i))]
        if len({f.shape for f in batch}) > 1:
            raise DenseExtractError(f"{video.video_id}: frames {i}..{i + len(batch) - 1} differ in size")
        yield np.stack(batch), np.arange(i, i + len(batch), dtype=np.float64) / fps


def iter_video_frames(video: DenseVideo, fps: float, chunk_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``video``'s frames in order, ``chunk_size`` at a time: ``(n, H, W, 3)`` uint8 RGB and
    ``(n,)`` float64 seconds (decoded from ``video.video`` when set, else the frame files).

    Raises:
        DecodeError: the video file cannot be decoded (its stage says why).
        DenseExtractError: a frame file cannot be read.
    """
    return (_decoded if video.video else _from_folder)(video, fps, chunk_size)


def frame_size(video: DenseVideo, fps: float) -> tuple[int, int]:
    """``(H, W)`` of ``video``'s frames: the manifest's, else the first frame file's header, else
    the first decoded frame of its video file."""
    if video.video:
        frames, _ = next(iter(_decoded(video, fps, 1)))
        return int(frames.shape[1]), int(frames.shape[2])
    if video.size != (0, 0):
        return video.size
    try:
        with Image.open(video.frames[0]) as im:
            return im.height, im.width
    except (OSError, IndexError) as e:
        raise DenseExtractError(f"{video.video_id}: cannot read its first frame ({e})") from None


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


def _header(cfg: DenseExtractConfig, backbone: Backbone, videos: Sequence[DenseVideo], interpolation: str,
            grids: Sequence[tuple[int, int]]) -> dict:
    desc = backbone.describe()
    shared = set(grids)
    feature_shape = [*next(iter(shared)), backbone.channels] if len(shared) == 1 else [None, None, backbone.channels]
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
            "feature_shape": feature_shape,  # [None, None, C]: grids differ, see each video's geometry
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
        DenseExtractError: a frame cannot be read, the frames of a video differ in size, or a
            video file holds another number of frames (at ``fps``) than its frame names.
        DecodeError: a video file cannot be decoded.
    """
    bb = backbone or create_backbone(
        cfg.backbone, weights=cfg.weights, pretrained=not cfg.random_weights, dynamic_size=True
    )
    if not bb.dense_step:
        raise DenseExtractError(f"backbone {cfg.backbone!r} has no any-size forward")
    interp = cfg.interpolation or bb.preprocess.interpolation
    sizes = [frame_size(v, cfg.fps) for v in videos]
    inputs = [input_size(cfg.size_policy, hw, bb.dense_step) for hw in sizes]
    grids = [bb.dense_grid(*size) for size in inputs]
    root = Path(store_path)
    init_store(root, _header(cfg, bb, videos, interp, grids))
    device = torch.device(cfg.device)
    bb = bb.to(device)
    for k, video in enumerate(videos):
        name = shard_name(k)
        if marker_path(root, name).exists():
            continue
        (h, w), size, grid = sizes[k], inputs[k], grids[k]
        writer = ShardWriter.create(root, name, feature_shape=(*grid, bb.channels), dtype=cfg.dtype,
                                    frames_per_file=max(1, len(video.frames)))
        geometry = {"frame_size": [h, w], "input_size": list(size), "grid": list(grid),
                    "frames": list(video.frame_names)}
        writer.begin_video({"video_id": video.video_id, "split": video.split, "label": None,
                            "label_name": None, "geometry": geometry})
        count = 0
        with torch.inference_mode():
            for frames, ts in iter_video_frames(video, cfg.fps, cfg.batch_size):
                if frames.shape[1:3] != (h, w):
                    raise DenseExtractError(f"{video.video_id}: frame {count} is {frames.shape[2]}x{frames.shape[1]}, "
                                            f"the first {w}x{h}: every frame of a video must have one size")
                count += len(frames)
                if count > len(video.frames):
                    break
                x = prepare_frames(frames, bb, size, interp).to(device)
                writer.append(bb.forward_dense(x).cpu().numpy(), ts)
        if count != len(video.frames):
            n = len(video.frames)
            got = f"more than {n}" if count > n else str(count)
            raise DenseExtractError(f"{video.video_id}: {got} frames from {video.video or video.frames_dir} at "
                                    f"{cfg.fps:g} fps, but it has {n} frame names; give the rate the frames were "
                                    "taken at (--fps) or fix the manifest")
        writer.end_video()
        writer.finish()
        if progress is not None:
            progress(video.video_id, k + 1, len(videos))
    return root
