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
from pipeline.dist import local_cores
from pipeline.pooling import compress
from pipeline.store import ShardWriter


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
class FeatureEncoder:
    """Runs the frozen backbone on uint8 frame batches; returns float32 numpy features.

    (N, S, S, 3) uint8 -> (N, H, W, C) float32, after optional pooling. On CUDA it uses
    pinned host memory, non-blocking copies and autocast. Safe to call from several threads
    at once (inference only: no module state changes).
    """

    def __init__(self, backbone: Backbone, device: torch.device, cfg: ExtractConfig) -> None:
        self.backbone = backbone.to(device).eval()
        self.device = device
        self.cfg = cfg
        self.cuda = device.type == "cuda"

    @torch.inference_mode()
    def __call__(self, frames: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(frames)
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if (self.cuda and self.cfg.amp) else nullcontext()
        with amp:
            feats = self.backbone(self.backbone.prepare(x))
        feats = compress(feats.float(), self.cfg.spatial_pool, self.cfg.channel_pool)
        return feats.cpu().numpy()


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
        self.ops: list[tuple] = []  # ("begin", entry) | ("frames", frames, ts) | ("end",)
        self.in_flight: deque[tuple[list[tuple], Future | None]] = deque()
        self.pending = 0
        self.frames_encoded = 0

    def begin(self, entry: dict) -> None:
        self.ops.append(("begin", entry))

    def add(self, frames: np.ndarray, timestamps: np.ndarray) -> None:
        self.ops.append(("frames", frames, timestamps))
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

    def _encode(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """On a stream: (n, S, S, 3) uint8 -> the storage arrays of (n, H, W, C) features."""
        return self.writer.dtype.encode(self.encoder(frames))

    def submit(self) -> None:
        """Send the pending frames to the streams as one batch (blocks while too many are in flight)."""
        frames = [op[1] for op in self.ops if op[0] == "frames"]
        fut = self.executor.submit(self._encode, np.concatenate(frames)) if frames else None
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
