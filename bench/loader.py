"""The stage-2 loader against the work it cannot avoid: decompressing the same chunks.

Part of ``make bench-train`` (``python -m bench.train --loader-only`` runs only this part).
A synthetic store with CLIP ViT-B/16 geometry (14 x 14 x 768 tokens per frame, float16, the
default codec: zstd level 1 in zarr v3 shard files of ``frames_per_file`` frames, one frame
per chunk, chunk checksums) is written the way ``tests/stores.py`` writes its stores
(:func:`pipeline.store.init_store` + :class:`pipeline.store.ShardWriter`); features are
seeded Gaussian noise (float16 mantissas of real features compress about as little).

The clips are those :class:`train.data.ClipDataset` draws (``num_frames`` frames ``stride``
apart, one per video per epoch, item rng ``(seed, epoch, index)``). Measured side by side,
interleaved round by round so that a loaded machine slows every method alike (the median
round of each is reported):

* **decompress**: the compressed bytes of exactly those frames' chunks, read from the shard
  files into RAM beforehand (crc32c stripped), zstd-decoded straight into a ``(T, H, W, C)`` float16
  clip: the floor of any reader of this store, per core;
* **decompress + cast**: the same, then cast to float32 (what the old loader handed out);
* **item**: ``ClipDataset.__getitem__`` in this process (reads the shard files, checks
  checksums and finiteness, returns the float16 tensor the loop casts on the device);
* **loader, 1 worker**: a ``DataLoader`` with one worker process (fork), configured as
  ``train.loop.fit`` configures it: batches of ``batch`` clips read by ``__getitems__`` straight
  into one shared-memory tensor (:func:`train.data.collate` hands it over): clips/s per worker.

Target: loader clips/s per worker >= 0.7 x (decompress + cast) clips/s per core.

From the measured rates, the step time of a CUDA run **on paper** (nothing here runs on a
GPU): with prefetching workers, pinned memory and asynchronous copies the three stages
overlap, so a step takes the slowest of

    loader  = B / (workers x loader clips/s per worker)
    copy    = B x bytes per float16 clip / host-to-device bandwidth
    compute = B x 3 x 2 x TMM MACs per clip / sustained FLOP/s   (forward + backward ~ 3 forwards)

with the GPU's figures (bandwidth, sustained FLOP/s, workers per GPU) stated as assumptions
in the output; the cast to float32 on the GPU reads 2 and writes 4 bytes per value at HBM
speed (microseconds per batch) and is left out.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from numcodecs import Zstd
from torch.utils.data import DataLoader

from pipeline.config import config_hash
from pipeline.store import ShardWriter, init_store, open_store
from pipeline.store.integrity import shard_file_key
from pipeline.store.layout import shards_dir
from train.data import ClipConfig, ClipDataset, collate
from train.sampling import random_clip
from train.stats import tmm_stats

TARGET_FRACTION = 0.7  # loader clips/s per worker >= this x (decompress + cast) clips/s per core


@dataclass(frozen=True)
class LoaderBench:
    """Geometry and sizes (frames, tokens, channels); GPU figures are assumptions on paper."""

    grid: int = 14  # CLIP ViT-B/16 at 224 px: 14 x 14 patch tokens
    channels: int = 768
    videos: int = 12
    frames_per_video: int = 48  # stored frames per video
    frames_per_file: int = 256  # the extraction default (ExtractConfig.frames_per_file)
    videos_per_shard: int = 4
    num_frames: int = 8  # clip length T
    stride: int = 2
    batch: int = 8  # clips per DataLoader batch
    rounds: int = 5  # interleaved rounds (median reported)
    seconds_per_method: float = 0.6  # per method per round, at least one pass over the clips
    seed: int = 0
    # on paper (assumptions, not measured): an H100 SXM node
    gpu_workers: int = 8  # loader workers per GPU (a 96-core node with 8 GPUs, 12 cores each)
    gpu_h2d_gb_s: float = 25.0  # pinned host-to-device, PCIe Gen5 x16 in practice
    gpu_tflops: float = 100.0  # sustained float32/TF32 FLOP/s of the TMM's 3D convolutions
    gpu_batch: int = 256  # clips per step
    tmm_hidden: int = 256
    tmm_out: int = 512
    tmm_kt: int = 3


QUICK_LOADER = dict(videos=4, frames_per_video=24, frames_per_file=16, rounds=2, seconds_per_method=0.05,
                    grid=4, channels=64)


def write_store(path: Path, b: LoaderBench) -> None:
    """A float16 + zstd store of ``b.videos`` videos of Gaussian features (one split, ``train``)."""
    content = {"backbone": "synthetic-clip-vit-b16-geometry", "dtype": "float16", "codec": "zstd",
               "feature_shape": [b.grid, b.grid, b.channels], "videos_per_shard": b.videos_per_shard,
               "frames_per_file": b.frames_per_file, "num_videos": b.videos,
               "num_shards": -(-b.videos // b.videos_per_shard), "seed": b.seed}
    init_store(path, {"content": content, "content_hash": config_hash(content)})
    rng = np.random.default_rng(b.seed)
    for s in range(content["num_shards"]):
        w = ShardWriter.create(path, f"{s:05d}", feature_shape=(b.grid, b.grid, b.channels), dtype="float16",
                               codec="zstd", frames_per_file=b.frames_per_file)
        for v in range(s * b.videos_per_shard, min(b.videos, (s + 1) * b.videos_per_shard)):
            w.begin_video({"video_id": f"v{v:04d}", "split": "train", "label": v % 2, "label_name": f"c{v % 2}"})
            x = rng.standard_normal((b.frames_per_video, b.grid, b.grid, b.channels), dtype=np.float32)
            w.append(x, np.arange(b.frames_per_video, dtype=np.float64) / 8.0)
            w.end_video()
        w.finish()


def clip_chunks(store: Any, ds: ClipDataset, epoch: int) -> list[list[bytes]]:
    """The compressed bytes (crc32c stripped) of the chunks of every clip ``ds`` draws in
    ``epoch``, read from the shard files with the files' own chunk index."""
    out = []
    for index, vid in enumerate(ds.video_ids):
        e = store.meta(vid)
        idx = random_clip(int(ds.lengths[index]), np.random.default_rng((ds.seed, epoch, index)),
                          ds.cfg.num_frames, ds.cfg.stride, ds.cfg.short_video)
        array = store._arrays(e.shard)["features"]
        per = int(array.shards[0])
        chunks = []
        for row in idx + e.offset:
            path = shards_dir(store.path) / e.shard / "features" / shard_file_key(array, int(row) // per)
            data = path.read_bytes()
            index_table = np.frombuffer(data[-(per * 16 + 4):-4], dtype="<u8").reshape(per, 2)
            offset, nbytes = (int(v) for v in index_table[int(row) % per])
            chunks.append(data[offset : offset + nbytes - 4])
        out.append(chunks)
    return out


def _decompress(chunks: list[bytes], shape: tuple[int, ...], codec: Zstd) -> np.ndarray:
    clip = np.empty((len(chunks), *shape), dtype=np.float16)
    for i, c in enumerate(chunks):
        codec.decode(c, out=clip[i])  # straight into the clip: no copy
    return clip


def _rate(run_once: Callable[[], int], seconds: float) -> float:
    """Clips/s of repeated ``run_once()`` calls (each returns the clips it made) over >= ``seconds``."""
    n, t0 = 0, time.perf_counter()
    while True:
        n += run_once()
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n / dt


def measure(b: LoaderBench, tmp: Path, log: Callable[[str], None] = print) -> dict:
    """Every rate of the module docstring, plus the on-paper CUDA step; JSON-ready."""
    path = tmp / "clip-geometry.zarr"
    t0 = time.perf_counter()
    write_store(path, b)
    log(f"loader bench: store of {b.videos} videos x {b.frames_per_video} frames of {b.grid}x{b.grid}x{b.channels} "
        f"float16 written in {time.perf_counter() - t0:.1f} s")
    store = open_store(path)
    # not loaded into RAM: the loader reads the shard files (the large-store case)
    ds = ClipDataset(store, "train", ClipConfig(num_frames=b.num_frames, stride=b.stride), seed=b.seed)
    shape = (b.grid, b.grid, b.channels)
    chunks = clip_chunks(store, ds, epoch=0)
    codec = Zstd()
    # the decompressed clips are exactly the item's values (same chunks)
    first, _ = ds[0]
    assert np.array_equal(_decompress(chunks[0], shape, codec), first.numpy())

    def decompress() -> int:
        for c in chunks:
            _decompress(c, shape, codec)
        return len(chunks)

    def decompress_cast() -> int:
        for c in chunks:
            _decompress(c, shape, codec).astype(np.float32)
        return len(chunks)

    def item() -> int:
        for i in range(len(ds)):
            ds[i]
        return len(ds)

    # the DataLoader start (fork + first batch) is part of an epoch; many epochs amortise it, so
    # the loader is timed over a long sampler (the clips repeated) after its first batch
    order = list(range(len(ds))) * max(1, int(np.ceil(64 * b.batch / len(ds))))

    def loader() -> int:
        dl = DataLoader(ds, batch_size=b.batch, sampler=order, num_workers=1, prefetch_factor=4,
                        multiprocessing_context="fork", collate_fn=collate)  # as train.loop.fit
        it = iter(dl)
        next(it)  # start-up: fork + the first batch, not steady state
        n = 0
        t_start = time.perf_counter()
        for x, _ in it:
            n += len(x)
        loader.seconds = time.perf_counter() - t_start  # type: ignore[attr-defined]
        return n

    methods: dict[str, Callable[[], int]] = {"decompress": decompress, "decompress_cast": decompress_cast,
                                             "item": item}
    rates: dict[str, list[float]] = {k: [] for k in [*methods, "loader_1_worker"]}
    load = []
    for r in range(b.rounds):
        load.append(os.getloadavg()[0])
        for name, fn in methods.items():
            rates[name].append(_rate(fn, b.seconds_per_method))
        n = loader()
        rates["loader_1_worker"].append(n / loader.seconds)  # type: ignore[attr-defined]
        log(f"  round {r + 1}/{b.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items())
            + f" clips/s (load {load[-1]:.1f})")
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["loader_1_worker"] / med["decompress_cast"]
    clip_bytes = b.num_frames * b.grid * b.grid * b.channels * 2
    stats = tmm_stats(b.channels, b.tmm_out, b.tmm_hidden, 1, b.tmm_kt, b.num_frames, b.grid)
    flops_per_clip = 3 * 2 * stats.tmm_macs
    loader_s = b.gpu_batch / (b.gpu_workers * med["loader_1_worker"])
    copy_s = b.gpu_batch * clip_bytes / (b.gpu_h2d_gb_s * 1e9)
    compute_s = b.gpu_batch * flops_per_clip / (b.gpu_tflops * 1e12)
    step = max(loader_s, copy_s, compute_s)
    return {
        "config": asdict(b), "clip_bytes_float16": clip_bytes,
        "clips_per_s": med, "clips_per_s_rounds": rates, "load_average_per_round": load,
        "loader_over_decompress": med["loader_1_worker"] / med["decompress"],
        "loader_over_decompress_cast": ratio, "item_over_decompress_cast": med["item"] / med["decompress_cast"],
        "target_fraction": TARGET_FRACTION, "target_met": ratio >= TARGET_FRACTION,
        "cuda_on_paper": {
            "tmm_macs_per_clip": stats.tmm_macs, "train_flops_per_clip": flops_per_clip,
            "loader_s": loader_s, "copy_s": copy_s, "compute_s": compute_s, "step_s": step,
            "bound_by": {loader_s: "loader", copy_s: "host-to-device copy", compute_s: "compute"}[step],
            "clips_per_s": b.gpu_batch / step,
        },
    }


def print_loader(res: dict, console: Any) -> None:
    """The loader table and the on-paper CUDA step."""
    from rich.table import Table

    r, c = res["clips_per_s"], res["cuda_on_paper"]
    b = res["config"]
    t = Table(title=f"Loader vs decompression, {b['grid']}x{b['grid']}x{b['channels']} float16 zstd, "
                    f"{b['num_frames']}-frame clips (clips/s per core, median of {b['rounds']} interleaved rounds)")
    for col in ("decompress", "decompress + cast", "item (in process)", "loader, 1 worker",
                "loader / decompress", "loader / (decompress + cast)", f"target {res['target_fraction']}"):
        t.add_column(col, justify="right")
    t.add_row(f"{r['decompress']:.1f}", f"{r['decompress_cast']:.1f}", f"{r['item']:.1f}",
              f"{r['loader_1_worker']:.1f}", f"{res['loader_over_decompress']:.2f}",
              f"{res['loader_over_decompress_cast']:.2f}", "met" if res["target_met"] else "NOT met")
    console.print(t)
    console.print(
        f"CUDA step on paper (batch {b['gpu_batch']} clips, {b['gpu_workers']} workers/GPU, {b['gpu_h2d_gb_s']} GB/s "
        f"H2D, {b['gpu_tflops']} TFLOP/s sustained): loader {1e3 * c['loader_s']:.1f} ms, copy "
        f"{1e3 * c['copy_s']:.1f} ms, compute {1e3 * c['compute_s']:.1f} ms -> step {1e3 * c['step_s']:.1f} ms "
        f"({c['clips_per_s']:.0f} clips/s, bound by the {c['bound_by']})")
