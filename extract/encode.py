"""Stage 1, the backbone side: frozen backbone, CPU thread plan, batches across videos.

Decoded uint8 frames of consecutive videos are gathered into model batches
(:class:`BatchingSink`), encoded on ``streams`` inference threads (:class:`FeatureEncoder`,
then cast to the storage dtype on the same thread) and handed to the shard's
:class:`~pipeline.store.ShardWriter` in video order. Scheduling (which shards, ranks, locks,
resume) is in :mod:`extract.runner`.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Executor, Future
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from extract.backbones import Backbone, create_backbone
from extract.config import ExtractConfig
from extract.decode import test_crop_boxes
from extract.pea import PEAError, frame_offsets, pea_forward, pea_supported, upsampled_size
from pipeline.dist import local_cores
from pipeline.pooling import compress
from pipeline.store import ShardWriter, encode_crops, encode_pea


# --------------------------------------------------------------------------------------
# the backbone and how it uses the CPU
# --------------------------------------------------------------------------------------
#: Seed of random-init backbones (``random_weights``), so that every rank, every resumed run
#: and a direct forward in a test all compute features with the same weights.
RANDOM_INIT_SEED = 0


def build_backbone(cfg: ExtractConfig) -> Backbone:
    """The run's frozen backbone. A random init is seeded with :data:`RANDOM_INIT_SEED` (in a
    forked RNG, the caller's global RNG state is untouched): an unseeded init would differ
    per process, and a resumed or multi-rank store would mix features of different networks
    under one header."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return create_backbone(cfg.backbone, weights=cfg.weights, pretrained=not cfg.random_weights,
                               image_size=cfg.image_size)


def feature_shape(backbone: Backbone, cfg: ExtractConfig) -> tuple[int, int, int]:
    """(H, W, C) stored per frame after optional spatial/channel pooling."""
    h, w = backbone.grid()
    c = backbone.channels
    if cfg.channel_pool:
        c = cfg.channel_pool
    if cfg.spatial_pool:
        h = w = cfg.spatial_pool
    return (h, w, c)


@dataclass(frozen=True)
class ThreadPlan:
    """How the backbone uses the CPU: ``streams`` batches in flight at once, each forward
    running on ``threads_per_stream`` intra-op threads.

    On a CPU, small-batch convolutions scale poorly across intra-op threads (MobileNetV2 at
    112 px runs 1.3x faster on 2 threads than on 1), while independent batches on
    single-threaded streams scale almost linearly, and a stream never waits at a thread
    barrier for a core the decoder took. On CUDA, two streams overlap one batch's host-side
    work (uint8 upload, float16 download) with the other's kernels.
    """

    streams: int
    threads_per_stream: int


def thread_plan(cfg: ExtractConfig, device: torch.device) -> ThreadPlan:
    """``cfg.threads`` CPU threads (0 = this rank's cores, :func:`pipeline.dist.local_cores`)
    split into ``cfg.streams`` streams (0 = auto: 2 on CUDA; on CPU one per thread, at most 4, so a
    many-core machine gives each stream several threads instead of holding dozens of
    batches in memory)."""
    threads = cfg.threads if cfg.threads > 0 else local_cores()
    if cfg.streams > 0:
        streams = cfg.streams
    else:
        streams = 2 if device.type == "cuda" else min(threads, 4)
    return ThreadPlan(streams, max(1, threads // streams))


# --------------------------------------------------------------------------------------
# batches across videos, results back in video order
# --------------------------------------------------------------------------------------
def check_pea(backbone: Backbone, cfg: ExtractConfig) -> None:
    """Refuse ``pea_views`` for a backbone without a positional embedding (before any work)."""
    if cfg.pea_views and not pea_supported(backbone):
        raise PEAError(
            f"--pea-views {cfg.pea_views}: backbone {backbone.name!r} has no positional embedding, so it has no "
            f"PEA return view; extract without --pea-views and train Co-Settle with the plain return view "
            f"(A' = A, `--set cosettle.return_view=plain`)")


def pea_header(backbone: Backbone, cfg: ExtractConfig) -> dict | None:
    """The store header's ``content.pea`` (None without PEA views): views, ratio, seed and the
    largest window offset ``(up_h - H, up_w - W)`` (what ``verify`` checks stored offsets against)."""
    if not cfg.pea_views:
        return None
    grid = backbone.grid()
    up = upsampled_size(grid, cfg.pea_ratio)
    return {"views": cfg.pea_views, "ratio": float(cfg.pea_ratio), "seed": cfg.pea_seed,
            "max_offset": [up[0] - grid[0], up[1] - grid[1]]}


def test_crops_header(cfg: ExtractConfig) -> dict | None:
    """The store header's ``content.test_crops`` (None with ``test_crops=1``): crops per frame,
    the manifest splits that get them and how they are cut (the markers say which videos have them)."""
    if cfg.test_crops == 1:
        return None
    return {"crops": cfg.test_crops, "splits": sorted(cfg.test_crop_splits),
            "layout": "short side scaled to the input size; centre crop = features, side crops (left/right, "
                      "top/bottom for portrait) = crop_features"}


def cut_test_crops(frames: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole short-side-scaled frames ``(n, h, w, 3)`` uint8 (``h`` or ``w`` = ``size``) ->
    the centre crops ``(n, size, size, 3)`` (pixel for pixel the ``short_side_crop`` frames) and
    the side crops ``(n, 2, size, size, 3)`` (left/right, or top/bottom for portrait), from
    :func:`extract.decode.test_crop_boxes`."""
    n, h, w = frames.shape[:3]
    boxes = test_crop_boxes(w, h, size)
    crops = [frames[:, t:b, l:r] for l, t, r, b in boxes]
    return np.ascontiguousarray(crops[1]), np.ascontiguousarray(np.stack([crops[0], crops[2]], axis=1))


class FeatureEncoder:
    """Runs the frozen backbone on uint8 frame batches; returns float32 numpy features.

    (N, S, S, 3) uint8 -> (N, H, W, C) float32, after optional pooling. With ``pea_views`` K
    (:meth:`encode`), also the K PEA return views of every frame (N, K, H, W, C), pooled the
    same way, with their window offsets (N, K, 2). On CUDA it uses pinned host memory,
    non-blocking copies and autocast. Safe to call from several threads at once (inference
    only: no module state changes).
    """

    def __init__(self, backbone: Backbone, device: torch.device, cfg: ExtractConfig) -> None:
        check_pea(backbone, cfg)
        self.backbone = backbone.to(device).eval()
        self.device = device
        self.cfg = cfg
        self.cuda = device.type == "cuda"

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        return self.encode(frames)["features"]

    @torch.inference_mode()
    def encode(self, frames: np.ndarray, frame_ids: list[tuple[str, int]] | None = None) -> dict[str, np.ndarray]:
        """``{"features": (N, H, W, C)}`` float32, plus ``pea_views`` (N, K, H, W, C) and
        ``pea_offsets`` (N, K, 2) when the config asks for PEA views; ``frame_ids`` gives each
        frame's ``(video_id, index in the video)``, which seeds its window offsets."""
        x = torch.from_numpy(frames)
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if (self.cuda and self.cfg.amp) else nullcontext()
        cfg = self.cfg
        out: dict[str, np.ndarray] = {}
        with amp:
            x = self.backbone.prepare(x)
            out["features"] = compress(self.backbone(x).float(), cfg.spatial_pool, cfg.channel_pool).cpu().numpy()
            if cfg.pea_views:
                if frame_ids is None or len(frame_ids) != len(frames):
                    raise PEAError("PEA views need the (video_id, frame index) of every frame")
                grid = self.backbone.grid()
                offsets = torch.cat([frame_offsets(cfg.pea_seed, v, [j], cfg.pea_views, grid, cfg.pea_ratio)
                                     for v, j in frame_ids])  # (N, K, 2)
                views = [compress(pea_forward(self.backbone, x, offsets[:, k], cfg.pea_ratio).float(),
                                  cfg.spatial_pool, cfg.channel_pool) for k in range(cfg.pea_views)]
                out["pea_views"] = torch.stack(views, dim=1).cpu().numpy()
                out["pea_offsets"] = offsets.numpy()
        return out


class BatchingSink:
    """Collects frames of consecutive videos into model batches and writes results in order.

    Videos are begun/ended on the writer in job order; frames are encoded ``batch_size`` at
    a time even across video boundaries, so short videos still fill the batch. A full batch
    is handed to ``executor`` (the inference streams) and the caller goes back to receiving
    decoded frames; up to ``max_in_flight`` batches are being encoded at once, and a batch's
    results (already cast to the storage dtype on the stream) reach the writer (compression,
    zarr writes: done here, while the streams compute) only after every earlier batch's did.
    """

    def __init__(self, encoder: FeatureEncoder, writer: ShardWriter, batch_size: int,
                 executor: Executor, max_in_flight: int = 2) -> None:
        self.encoder, self.writer, self.batch_size = encoder, writer, batch_size
        self.executor, self.max_in_flight = executor, max(1, max_in_flight)
        # ("begin", entry) | ("frames", frames, ts, ids, side crops (n, 2, S, S, 3) or None) | ("end",)
        self.ops: list[tuple] = []
        self.in_flight: deque[tuple[list[tuple], Future | None]] = deque()
        self.pending = 0
        self.frames_encoded = 0
        self._video: tuple[str, int] = ("", 0)  # (video_id, frames added) of the open video
        self._crops = False  # the open video gets its side crops (entry "crops")

    def begin(self, entry: dict) -> None:
        """Open a video; ``entry["crops"]`` True: its frames come whole (``short_side``
        geometry) and its 3 test crops are cut here (the writer must declare them)."""
        self._crops = bool(entry.get("crops"))
        if self._crops and self.writer.test_crops == 1:
            raise ValueError(f"video {entry['video_id']!r} asks for test crops but the shard declares none")
        self.ops.append(("begin", entry))
        self._video = (str(entry["video_id"]), 0)

    def add(self, frames: np.ndarray, timestamps: np.ndarray) -> None:
        """Frames ``(n, S, S, 3)`` uint8 of the open video (``(n, S, L, 3)`` / ``(n, L, S, 3)``
        whole short-side-scaled frames for a video with test crops) and their timestamps (s)."""
        vid, start = self._video
        self._video = (vid, start + len(frames))
        sides = None
        if self._crops:
            frames, sides = cut_test_crops(frames, self.encoder.backbone.preprocess.size)
        self.ops.append(("frames", frames, timestamps, [(vid, start + i) for i in range(len(frames))], sides))
        self.pending += len(frames)
        if self.pending >= self.batch_size:
            self.submit()

    def end(self) -> None:
        self.ops.append(("end",))

    def abort(self) -> None:
        """Drop the current video (its pending frames are not encoded)."""
        while self.ops and self.ops[-1][0] == "frames":
            self.pending -= len(self.ops.pop()[1])
        if self.ops and self.ops[-1][0] == "begin":
            self.ops.pop()
        else:  # part of the video was already submitted: let it reach the writer, roll back
            self.drain()
            self.writer.abort_video()

    def _encode(self, frames: np.ndarray, ids: list[tuple[str, int]],
                sides: list[tuple[int, np.ndarray | None]] | None = None) -> dict[str, np.ndarray]:
        """On a stream: (n, S, S, 3) uint8 -> the storage arrays of (n, H, W, C) features (and
        of the PEA views when the store has them). ``sides``: per group of frames (the ops'
        order), its frame count n and its side crops ``(n, 2, S, S, 3)`` or None; the shard's
        ``crop_*`` arrays get their features, zeros for the frames without crops. The side
        crops go through the backbone in a forward of their own, so the main features are
        those of a store without crops, bit for bit."""
        if not self.writer.pea_views:
            arrays = self.writer.dtype.encode(self.encoder(frames))
        else:
            out = self.encoder.encode(frames, ids)
            arrays = self.writer.dtype.encode(out["features"])
            arrays.update(encode_pea(self.writer.dtype, out["pea_views"], out["pea_offsets"]))
        if self.writer.test_crops > 1:
            side_feats = np.zeros((len(frames), 2, *self.writer.feature_shape), dtype=np.float32)
            rows, pos = [], 0
            for n, group in sides or []:
                if group is not None:
                    rows.append(np.arange(pos, pos + n))
                pos += n
            have = [g for _, g in (sides or []) if g is not None]
            if have:
                cut = np.concatenate(have)  # (m, 2, S, S, 3)
                feats = self.encoder(cut.reshape(-1, *cut.shape[2:]))
                side_feats[np.concatenate(rows)] = feats.reshape(len(cut), 2, *feats.shape[1:])
            arrays.update(encode_crops(self.writer.dtype, side_feats))
        return arrays

    def submit(self) -> None:
        """Send the pending frames to the streams as one batch (blocks while too many are in flight)."""
        frames = [op[1] for op in self.ops if op[0] == "frames"]
        ids = [i for op in self.ops if op[0] == "frames" for i in op[3]]
        sides = [(len(op[1]), op[4]) for op in self.ops if op[0] == "frames"]
        fut = self.executor.submit(self._encode, np.concatenate(frames), ids, sides) if frames else None
        self.in_flight.append((self.ops, fut))
        self.ops, self.pending = [], 0
        while len(self.in_flight) > self.max_in_flight:
            self._retire()

    def drain(self) -> None:
        """Submit what is pending and write every batch's results."""
        if self.ops:
            self.submit()
        while self.in_flight:
            self._retire()

    def _retire(self) -> None:
        ops, fut = self.in_flight.popleft()
        arrays = fut.result() if fut is not None else {}
        pos = 0
        for op in ops:
            if op[0] == "begin":
                self.writer.begin_video(op[1])
            elif op[0] == "frames":
                n = len(op[1])
                self.writer.append_encoded({k: a[pos : pos + n] for k, a in arrays.items()}, op[2])
                pos += n
            else:
                self.writer.end_video()
        self.frames_encoded += pos

    def cancel(self) -> None:
        """After an error: wait for the batches in flight, write nothing."""
        for _, fut in self.in_flight:
            if fut is not None and not fut.cancel():
                fut.exception()  # a batch already running: wait for it, drop its result
        self.in_flight.clear()
        self.ops, self.pending = [], 0
