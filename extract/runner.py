"""Stage 1 orchestration: manifest -> store shards -> decode workers -> backbone -> zarr.

The unit of work is a store shard (``videos_per_shard`` consecutive manifest rows) with
exactly one writer. A process takes the shards ``k`` with ``k % world == rank`` where
(rank, world) come from ``--shard-index/--num-shards`` (independent jobs, e.g. a Slurm
array) or from torchrun's ``RANK``/``WORLD_SIZE``. Completed shards (marker present) are
skipped, incomplete ones are deleted and redone, so rerunning the same command resumes. A
shard is only touched under its lock (:func:`pipeline.store.shard_lock`): a second run
started on the same store by mistake skips the shards the first is writing.
"""
from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from extract.backbones import Backbone, create_backbone
from extract.config import ExtractConfig
from extract.decode import Geometry
from extract.workers import ChunkEvent, DecodeJob, DecodePool, DoneEvent, FailedEvent
from pipeline.config import config_hash, to_dict
from pipeline.errors import FreezeframeError
from pipeline.manifest import ManifestRow, manifest_sha256, read_manifest, validate_manifest
from pipeline.pooling import compress
from pipeline.provenance import environment
from pipeline.store import (
    STORAGE_DTYPES,
    Failure,
    FeatureStore,
    ShardWriter,
    init_store,
    lock_path,
    marker_path,
    read_markers,
    shard_lock,
    shard_name,
)


# --------------------------------------------------------------------------------------
# who does what
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rank:
    """This process's place among the extraction jobs."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    torchrun: bool = False


def discover_rank(cfg: ExtractConfig) -> Rank:
    """``--shard-index/--num-shards`` win; else torchrun's env vars; else a single process."""
    if cfg.shard_index is not None and cfg.num_shards is None:
        # every job would do every shard, and two writers would delete each other's work
        raise FreezeframeError(f"--shard-index {cfg.shard_index} needs --num-shards (the number of jobs)")
    if cfg.num_shards is not None:
        idx = cfg.shard_index or 0
        if not 0 <= idx < cfg.num_shards:
            raise FreezeframeError(f"--shard-index {idx} must be in [0, {cfg.num_shards})")
        return Rank(idx, cfg.num_shards)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return Rank(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", 0)), torchrun=True)
    return Rank()


def plan_shards(rows: Sequence[ManifestRow], videos_per_shard: int) -> list[list[ManifestRow]]:
    """Store shard k holds rows [k*V, (k+1)*V) in manifest order."""
    v = max(1, videos_per_shard)
    return [list(rows[i : i + v]) for i in range(0, len(rows), v)]


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


def local_cores() -> int:
    """CPU cores this process may use: those of its affinity mask (a Slurm or container
    cpuset, not the whole machine), shared evenly among torchrun's ranks on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def decode_workers(cfg: ExtractConfig) -> int:
    """``cfg.workers`` decode processes, or (0) one per local core but one, at least 1."""
    return cfg.workers or max(1, local_cores() - 1)


def thread_plan(cfg: ExtractConfig, device: torch.device) -> ThreadPlan:
    """``cfg.threads`` CPU threads (0 = this rank's cores, :func:`local_cores`) split into
    ``cfg.streams`` streams (0 = auto: 2 on CUDA; on CPU one per thread, at most 4, so a
    many-core machine gives each stream several threads instead of holding dozens of
    batches in memory)."""
    threads = cfg.threads if cfg.threads > 0 else local_cores()
    if cfg.streams > 0:
        streams = cfg.streams
    else:
        streams = 2 if device.type == "cuda" else min(threads, 4)
    return ThreadPlan(streams, max(1, threads // streams))


def resolve_device(name: str, rank: Rank) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", rank.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------
# store header
# --------------------------------------------------------------------------------------
def feature_shape(backbone: Backbone, cfg: ExtractConfig) -> tuple[int, int, int]:
    """(H, W, C) stored per frame after optional spatial/channel pooling."""
    h, w = backbone.grid()
    c = backbone.channels
    if cfg.channel_pool:
        c = cfg.channel_pool
    if cfg.spatial_pool:
        h = w = cfg.spatial_pool
    return (h, w, c)


def store_header(cfg: ExtractConfig, backbone: Backbone, rows: Sequence[ManifestRow],
                 geometry: Geometry) -> dict:
    """The header written into the store: ``content`` must match on every later run."""
    content = {
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "weights_source": "random" if cfg.random_weights else backbone.weights_source.split(":")[0],
        "preprocess": backbone.preprocess.to_dict(),
        "geometry": geometry.to_dict(),
        "fps": cfg.fps,
        "min_frames": cfg.min_frames,
        "dtype": cfg.dtype,
        "codec": cfg.codec,
        "spatial_pool": cfg.spatial_pool,
        "channel_pool": cfg.channel_pool,
        "feature_shape": list(feature_shape(backbone, cfg)),
        "videos_per_shard": cfg.videos_per_shard,
        "frames_per_file": cfg.frames_per_file,
        "manifest_sha256": manifest_sha256(rows),
        "num_videos": len(rows),
        "num_shards": len(plan_shards(rows, cfg.videos_per_shard)),
    }
    return {
        "content": content,
        "content_hash": config_hash(content),
        "config": to_dict(cfg),
        "backbone": backbone.describe(),
        "manifest_path": str(Path(cfg.manifest).resolve()),
        "environment": environment(),
    }


# --------------------------------------------------------------------------------------
# the backbone side: batches across videos, results back in video order
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


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
@dataclass
class ExtractSummary:
    store: str
    shards_done: int = 0
    shards_skipped: int = 0
    shards_busy: list[str] = field(default_factory=list)  # locked by another process: not done here
    videos_done: int = 0
    frames_done: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0  # from starting the decode workers to the last marker
    #: seconds until the first decoded frames arrived (worker start-up: spawn and imports),
    #: a fixed cost per run that a dataset-sized run amortises
    startup_seconds: float | None = None
    _t0: float = field(default_factory=time.monotonic, repr=False)

    @property
    def frames_per_s(self) -> float:
        return self.frames_done / self.seconds if self.seconds else 0.0

    @property
    def steady_frames_per_s(self) -> float:
        """frames/s after the start-up (what a long run tends to)."""
        busy = self.seconds - (self.startup_seconds or 0.0)
        return self.frames_done / busy if busy > 0 else 0.0


def _job_rows(cfg: ExtractConfig, rows: list[ManifestRow], store_root: Path
              ) -> list[tuple[str, list[ManifestRow]]]:
    """(shard name, rows) to do, in order. Normal runs: every planned shard; with
    ``retry_failed``: the retry shards of :func:`retry_plan` (only recorded failures)."""
    if not cfg.retry_failed:
        return [(shard_name(k), r) for k, r in enumerate(plan_shards(rows, cfg.videos_per_shard))]
    gen, video_ids = retry_plan(store_root, rows, cfg.videos_per_shard)
    by_id = {r.video_id: r for r in rows}
    retry_rows = [by_id[v] for v in video_ids]
    return [(shard_name(k, gen), r) for k, r in enumerate(plan_shards(retry_rows, cfg.videos_per_shard))]


def retry_plan(store_root: Path, rows: Sequence[ManifestRow], videos_per_shard: int) -> tuple[int, list[str]]:
    """The retry generation to work on and its videos (in manifest order).

    Every generation's video list is fixed once in ``STORE/retries/retryGG.json`` (created
    atomically by the first job), so ``--shard-index`` jobs and torchrun ranks that start at
    different times split the *same* retry shards, and a retry run that was killed is
    resumed like a normal one. A new generation (the recorded failures that are not stored)
    is planned only once every shard of the latest one is complete.
    """
    rdir = store_root / "retries"
    rdir.mkdir(exist_ok=True)
    markers = read_markers(store_root)
    plans = sorted(rdir.glob("retry[0-9][0-9].json"))
    if plans:
        latest = json.loads(plans[-1].read_text())
        gen, videos = int(latest["generation"]), list(latest["videos"])
        n_shards = -(-len(videos) // max(1, videos_per_shard))
        if any(shard_name(k, gen) not in markers for k in range(n_shards)):
            return gen, videos
    else:
        gen = 0
    failed = {f.video_id for f in FeatureStore(store_root).failures()}
    videos = [r.video_id for r in rows if r.video_id in failed]
    if not videos:
        return gen + 1, []
    target = rdir / f"retry{gen + 1:02d}.json"
    tmp = rdir / f".{target.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"generation": gen + 1, "videos": videos}, indent=1))
    try:
        os.link(tmp, target)  # atomic: a job that loses the race uses the winner's plan
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    plan = json.loads(target.read_text())
    return int(plan["generation"]), list(plan["videos"])


def run_extract(cfg: ExtractConfig, console: object | None = None) -> ExtractSummary:
    """Extract features of ``cfg.manifest`` into ``cfg.store`` (resumable, multi-process safe)."""
    from rich.console import Console

    con: Console = console or Console(stderr=True)  # type: ignore[assignment]
    rank = discover_rank(cfg)
    rows = read_manifest(cfg.manifest)
    if not rows:
        raise FreezeframeError(f"manifest {cfg.manifest} has no rows")
    # duplicate ids would make the finished store unreadable ("stored twice"): refuse them now
    validate_manifest(rows, check_files=False)
    backbone = build_backbone(cfg)
    geometry = Geometry(size=backbone.preprocess.size, mode=cfg.geometry,
                        interpolation=cfg.interpolation or backbone.preprocess.interpolation)
    STORAGE_DTYPES.get(cfg.dtype)  # refuse unknown names before any work
    header = store_header(cfg, backbone, rows, geometry)
    root = Path(cfg.store)
    init_store(root, header)  # refuses a mismatching store before any work
    shape = feature_shape(backbone, cfg)

    todo = [(name, r) for i, (name, r) in enumerate(_job_rows(cfg, rows, root)) if i % rank.world == rank.rank]
    done = set(read_markers(root))
    summary = ExtractSummary(store=str(root))
    pending = [(n, r) for n, r in todo if n not in done]
    summary.shards_skipped = len(todo) - len(pending)
    if not pending:
        con.print(f"[green]nothing to do[/]: {len(todo)} shard(s) of rank {rank.rank} already complete in {root}")
        return summary

    device = resolve_device(cfg.device, rank)
    encoder = FeatureEncoder(backbone, device, cfg)
    workers = decode_workers(cfg)
    plan = thread_plan(cfg, device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(plan.threads_per_stream)
    decode_kwargs = dict(geometry=geometry, fps=cfg.fps, chunk_size=cfg.chunk_size,
                         threads=cfg.decode_threads, min_frames=cfg.min_frames, max_gap=cfg.max_gap)
    total_videos = sum(len(r) for _, r in pending)
    t0 = summary._t0 = time.monotonic()
    try:
        with DecodePool(workers, decode_kwargs, timeout_s=cfg.decode_timeout) as pool, \
                ThreadPoolExecutor(plan.streams, thread_name_prefix="ff-stream") as streams, \
                _progress(cfg.progress, con) as progress:
            task = progress.add_task(f"rank {rank.rank}/{rank.world}", total=total_videos, frames=0, failed=0)
            for name, shard_rows in pending:
                with shard_lock(root, name) as mine:
                    if not mine or marker_path(root, name).exists():
                        # another run on this store is writing it (or finished it since we looked)
                        if mine:
                            summary.shards_skipped += 1
                        else:
                            summary.shards_busy.append(name)
                            con.log(f"shard {name}: being written by another process "
                                    f"({lock_path(root, name).read_text().strip()}); skipped")
                        progress.update(task, advance=len(shard_rows))
                        continue
                    sink = BatchingSink(encoder, ShardWriter.create(root, name, feature_shape=shape, dtype=cfg.dtype,
                                                                    codec=cfg.codec, frames_per_file=cfg.frames_per_file),
                                        cfg.batch_size, streams, max_in_flight=plan.streams)
                    try:
                        stats = _extract_shard(name, shard_rows, pool, sink, summary, progress, task)
                    except BaseException:
                        sink.cancel()
                        raise
                summary.shards_done += 1
                con.log(f"shard {name}: {stats['videos']} videos, {stats['frames']} frames, "
                        f"{stats['failures']} failed, {stats['frames_per_s']:.1f} frames/s")
    finally:
        torch.set_num_threads(threads)
    summary.seconds = time.monotonic() - t0
    return summary


def _extract_shard(name: str, rows: list[ManifestRow], pool: DecodePool, sink: BatchingSink,
                   summary: ExtractSummary, progress: object, task: object) -> dict:
    """Decode, encode and write one store shard; its marker is written last."""
    t0 = time.monotonic()
    jobs = [DecodeJob(i, r.video_id, r.path, r.start, r.end) for i, r in enumerate(rows)]
    failures: list[Failure] = []
    frames = videos = 0
    started: set[int] = set()
    for ev in pool.run(jobs):
        row = rows[ev.index]
        if isinstance(ev, ChunkEvent):
            if summary.startup_seconds is None:
                summary.startup_seconds = time.monotonic() - summary._t0
            if ev.index not in started:
                started.add(ev.index)
                sink.begin({"video_id": row.video_id, "split": row.split, "label": row.label,
                            "label_name": row.label_name})
            sink.add(ev.frames, ev.timestamps)
            progress.update(task, frames=summary.frames_done + frames + sink.pending)  # type: ignore[attr-defined]
        elif isinstance(ev, DoneEvent):
            if ev.index not in started:  # decoder reported success without frames
                failures.append(Failure(row.video_id, "empty", "EmptyVideo", "no frames decoded", name))
                progress.update(task, advance=1)  # type: ignore[attr-defined]
                continue
            sink.end()
            frames += ev.num_frames
            videos += 1
            progress.update(task, advance=1)  # type: ignore[attr-defined]
        elif isinstance(ev, FailedEvent):
            if ev.index in started:
                sink.abort()
            failures.append(Failure(**{**ev.failure.__dict__, "shard": name}))
            progress.update(task, advance=1, failed=len(summary.failures) + len(failures))  # type: ignore[attr-defined]
    sink.drain()
    secs = time.monotonic() - t0
    stats = {"videos": videos, "frames": frames, "failures": len(failures), "seconds": round(secs, 3),
             "frames_per_s": frames / secs if secs else 0.0}
    sink.writer.finish(failures, stats)
    summary.videos_done += videos
    summary.frames_done += frames
    summary.failures += failures
    return stats


def _progress(enabled: bool, console: object):
    """A rich progress bar with videos/s, frames/s and failures."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    class _Rates(TextColumn):
        def __init__(self) -> None:
            super().__init__("")

        def render(self, task):  # type: ignore[override]
            from rich.text import Text

            el = task.elapsed or 0.0
            vps = task.completed / el if el else 0.0
            fps = task.fields.get("frames", 0) / el if el else 0.0
            return Text(f"{vps:.2f} videos/s  {fps:.1f} frames/s  failed {task.fields.get('failed', 0)}")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rates(),
                    TimeElapsedColumn(), console=console, disable=not enabled, transient=False)
