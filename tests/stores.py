"""Tiny feature stores for the stage-2 tests (never the demo's).

Two kinds:

* :func:`write_synthetic_store` writes a store directly with :func:`pipeline.store.init_store`
  + :class:`pipeline.store.ShardWriter` from numpy features ``(T, H, W, C)`` float32. By
  default channel 0 of every token holds the frame index and channel 1 the video number, so
  a test can read back which frames an item gathered; the other channels are seeded noise.
* :func:`make_real_store` writes tiny lossless videos with PyAV (``tests.videos``), then runs
  the real extraction (:func:`extract.runner.run_extract`) with a random-weight MobileNetV2
  saved to a local weights file, so a test can rebuild the exact same backbone.

Frame counts are in frames, times in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from pipeline.config import config_hash
from pipeline.store import ShardWriter, init_store

#: ``features(rng, video_number, label, length) -> (length, H, W, C) float32``.
FeatureFn = Callable[[np.random.Generator, int, int, int], np.ndarray]


@dataclass(frozen=True)
class SynthVideo:
    """One video of a synthetic store: id, split, label, number of stored frames."""

    video_id: str
    split: str
    label: int
    length: int


@dataclass(frozen=True)
class SynthStore:
    """What :func:`write_synthetic_store` wrote: the path, the videos and their features."""

    path: Path
    videos: list[SynthVideo]
    features: dict[str, np.ndarray] = field(repr=False)  # video_id -> (T, H, W, C) float32
    grid: tuple[int, int]
    channels: int

    def split(self, name: str) -> list[SynthVideo]:
        return [v for v in self.videos if v.split == name]


def indexed_features(grid: tuple[int, int] = (2, 2), channels: int = 16) -> FeatureFn:
    """Noise features whose channel 0 is the frame index and channel 1 the video number."""

    def make(rng: np.random.Generator, number: int, label: int, length: int) -> np.ndarray:
        x = rng.standard_normal((length, *grid, channels)).astype(np.float32)
        x[..., 0] = np.arange(length, dtype=np.float32)[:, None, None]
        x[..., 1] = float(number)
        return x

    return make


def ramp_features(grid: tuple[int, int] = (2, 2), channels: int = 16, noise: float = 0.05) -> FeatureFn:
    """Class encoded only in the temporal order of the features.

    Every token is ``a(t) * d + noise`` with a fixed random direction ``d`` (C,), and
    ``a(t) = 2 * t / (L - 1) - 1`` rising from -1 to 1 for class 0, falling for class 1. Any
    single frame (or the average of a clip at a random place) has the same distribution in
    both classes; only the order of frames tells them apart.
    """
    direction = np.random.default_rng(1234).standard_normal(channels).astype(np.float32)

    def make(rng: np.random.Generator, number: int, label: int, length: int) -> np.ndarray:
        a = np.linspace(-1.0, 1.0, length, dtype=np.float32)
        if label == 1:
            a = a[::-1]
        x = a[:, None, None, None] * direction
        x = x + noise * rng.standard_normal((length, *grid, channels)).astype(np.float32)
        return np.broadcast_to(x, (length, *grid, channels)).astype(np.float32)

    return make


#: The tiny model and clips of the stage-2 tests, as config overrides (on the default store,
#: 8 train videos at 2 per step: 4 steps per epoch); a module adds what it varies
#: (``test.num_clips``, epochs, seeds, ...).
TINY_TRAIN = (
    "model.tmm.in_channels=16", "model.tmm.hidden=8", "model.tmm.out_channels=16", "model.mlp_dim=16",
    "prp.num_frames=4", "prp.clips_per_video=2", "clip.num_frames=4", "clip.stride=2",
    "test.num_frames=4", "test.stride=2",
    "optim.batch_size=2", "optim.warmup_epochs=1", "data.workers=0", "log_every=1", "checkpoint_every=1",
)


def train_config(task: str, store: SynthStore | str | Path, run_dir: str | Path, *overrides: str) -> Any:
    """The resolved stage-2 config of ``task`` (``train.config.resolve_train_config``, no file)
    training on ``store`` into ``run_dir`` with the given ``key=value`` overrides."""
    from train.config import resolve_train_config  # lazy: store-only tests do not import torch

    path = store.path if isinstance(store, SynthStore) else store
    return resolve_train_config(task, None, None, [f'data.store="{path}"', f'run_dir="{run_dir}"', *overrides])


def write_synthetic_store(
    path: str | Path,
    *,
    splits: dict[str, int] | None = None,
    num_classes: int = 3,
    lengths: tuple[int, int] = (20, 40),
    video_lengths: Sequence[int] | None = None,
    grid: tuple[int, int] = (2, 2),
    channels: int = 16,
    dtype: str = "float32",
    codec: str = "zstd",
    videos_per_shard: int = 5,
    seed: int = 0,
    features: FeatureFn | None = None,
    label_names: Sequence[str] | None = None,
) -> SynthStore:
    """Write a tiny store: ``splits`` maps split -> number of videos (default 8 train, 4 test).

    ``lengths``: (min, max) frames per video, inclusive, drawn per video; ``video_lengths``:
    explicit lengths in frames instead, one per video in split order. Labels cycle
    ``0..num_classes-1`` within each split.
    Videos are written ``videos_per_shard`` per store shard, in order (so several shards).
    """
    root = Path(path)
    splits = dict(splits or {"train": 8, "test": 4})
    n = sum(splits.values())
    rng = np.random.default_rng(seed)
    if video_lengths is None:
        lens = [int(v) for v in rng.integers(lengths[0], lengths[1], size=n, endpoint=True)]
    else:
        lens = [int(v) for v in video_lengths]
        if len(lens) != n:
            raise ValueError(f"{len(lens)} video_lengths for {n} videos")
    make = features or indexed_features(grid, channels)
    videos: list[SynthVideo] = []
    k = 0
    for split, count in splits.items():
        for i in range(count):
            videos.append(SynthVideo(f"{split}-{i:03d}", split, i % num_classes, lens[k]))
            k += 1
    num_shards = -(-n // videos_per_shard)
    content = {
        "backbone": "synthetic", "dtype": dtype, "codec": codec, "feature_shape": [*grid, channels],
        "videos_per_shard": videos_per_shard, "frames_per_file": 16, "num_videos": n,
        "num_shards": num_shards, "seed": seed,
    }
    init_store(root, {"content": content, "content_hash": config_hash(content)})
    feats: dict[str, np.ndarray] = {}
    for s in range(num_shards):
        w = ShardWriter.create(root, f"{s:05d}", feature_shape=(*grid, channels), dtype=dtype,
                               codec=codec, frames_per_file=16)
        for number in range(s * videos_per_shard, min(n, (s + 1) * videos_per_shard)):
            v = videos[number]
            x = np.ascontiguousarray(make(rng, number, v.label, v.length), dtype=np.float32)
            feats[v.video_id] = x
            w.begin_video({"video_id": v.video_id, "split": v.split, "label": v.label,
                           "label_name": label_names[v.label] if label_names else f"class{v.label}"})
            w.append(x, np.arange(v.length, dtype=np.float64) / 10.0)
            w.end_video()
        w.finish()
    return SynthStore(root, videos, feats, grid, channels)


# --------------------------------------------------------------------------------------
# a real store: real videos -> real decode -> random-weight backbone -> zarr
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RealStore:
    """A store made by the real extraction, and what is needed to redo it by hand."""

    path: Path
    manifest: Path
    weights: Path  # the random MobileNetV2 state_dict used by the extraction
    video_paths: dict[str, Path]  # video_id -> file
    backbone: str
    image_size: int
    geometry: str


def make_real_store(
    tmp: str | Path,
    *,
    num_videos: int = 4,
    frames: Sequence[int] = (24, 30, 18, 27),
    size_hw: tuple[int, int] = (48, 64),
    image_size: int = 64,
    fps: int = 10,
    geometry: str = "short_side_crop",
    dtype: str = "float32",
    seed: int = 0,
    backbone: str = "mobilenetv2-imagenet",
) -> RealStore:
    """Extract ``num_videos`` lossless :func:`tests.videos.pattern_frames` videos (H x W =
    ``size_hw``, all in split "train", labels 0/1) with a random-weight ``backbone`` at
    ``image_size`` px (MobileNetV2: 2 x 2 x 1280 features at 64 px; ``dinov2-vits14``:
    2 x 2 x 384 at 28 px) into ``tmp/store.zarr``, stored as ``dtype``."""
    import torch

    from extract.backbones import create_backbone
    from extract.config import ExtractConfig
    from extract.runner import run_extract
    from pipeline.manifest import ManifestRow, write_manifest
    from tests.videos import make_lossless_video, pattern_frames

    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = create_backbone(backbone, pretrained=False, image_size=image_size)
    # non-trivial BatchNorm statistics so eval-mode features are not a near-identity of init
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
            elif name.endswith("running_var"):
                buf.copy_(0.5 + torch.rand(buf.shape, generator=g))
    weights = tmp / f"random-{backbone}.pt"
    inner = getattr(net, "model", None)
    torch.save((inner if isinstance(inner, torch.nn.Module) else net).state_dict(), weights)

    rows, paths = [], {}
    for i in range(num_videos):
        vid = f"vid{i:02d}"
        pix = pattern_frames(int(frames[i % len(frames)]), *size_hw, seed=seed + i)
        p = make_lossless_video(tmp / f"{vid}.mp4", pix, fps)
        paths[vid] = p
        rows.append(ManifestRow(vid, str(p), "train", i % 2, f"class{i % 2}"))
    manifest = write_manifest(rows, tmp / "manifest.jsonl")
    store = tmp / "store.zarr"
    run_extract(ExtractConfig(manifest=str(manifest), store=str(store), backbone=backbone,
                              weights=str(weights), image_size=image_size, geometry=geometry, dtype=dtype,
                              videos_per_shard=2, frames_per_file=16, batch_size=7, workers=1,
                              device="cpu", progress=False))
    return RealStore(store, manifest, weights, paths, backbone, image_size, geometry)
