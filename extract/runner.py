"""Stage 1 scheduling: manifest -> store shards -> decode workers -> :mod:`extract.encode` -> zarr.

The unit of work is a store shard (``videos_per_shard`` consecutive manifest rows) with
exactly one writer, who holds the shard's claim (:func:`pipeline.store.shard_claim`: a
``flock`` on a local store, a lease on a remote one, docs/storage.md). Ranks of one job
(torchrun, srun: :func:`pipeline.dist.discover_rank`) claim shards *dynamically*: each walks
its own shards (``k % world == rank``) first, then the others' from the end of the list, and
takes every shard that is neither complete nor claimed, so ranks that finish early take
more work; on a remote store a shard whose lease runs out (a dead rank) is taken over.
Independent jobs (``--shard-index/--num-shards``, e.g. a Slurm array whose tasks may not run at
the same time) do exactly their own shards. Completed shards (marker present) are skipped,
incomplete ones are deleted and redone, so rerunning the same command resumes; a second run
started on the same local store by mistake skips the shards the first is writing.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from extract.backbones import Backbone
from extract.config import ExtractConfig, wants_test_crops
from extract.decode import Geometry
from extract.decoders import make_decoder
from extract.encode import (
    BatchingSink,
    FeatureEncoder,
    build_backbone,
    check_pea,
    feature_shape,
    pea_header,
    test_crops_header,
    thread_plan,
)
from extract.workers import ChunkEvent, DecodeJob, DecodePool, DoneEvent, FailedEvent
from pipeline.config import config_hash, to_dict
from pipeline.dist import RankInfo, discover_rank, local_cores, resolve_device
from pipeline.errors import FreezeframeError
from pipeline.manifest import ManifestRow, manifest_sha256, read_manifest, validate_manifest
from pipeline.provenance import environment
from pipeline.remote import require_fs_libraries
from pipeline.store import (
    Failure,
    FeatureStore,
    LeaseLost,
    ShardWriter,
    StoreFS,
    create_once,
    init_store,
    job_totals,
    marker_key,
    read_markers,
    shard_claim,
    shard_name,
    store_fs,
)


# --------------------------------------------------------------------------------------
# who does what
# --------------------------------------------------------------------------------------
def job_rank(cfg: ExtractConfig) -> RankInfo:
    """This process's (rank, world) among the extraction jobs: ``--shard-index/--num-shards``
    win (independent jobs, e.g. a Slurm array); else the launcher's
    (:func:`pipeline.dist.discover_rank`: torchrun, srun); else a single process."""
    if cfg.shard_index is not None and cfg.num_shards is None:
        # every job would do every shard, and two writers would delete each other's work
        raise FreezeframeError(f"--shard-index {cfg.shard_index} needs --num-shards (the number of jobs)")
    if cfg.num_shards is not None:
        idx = cfg.shard_index or 0
        if not 0 <= idx < cfg.num_shards:
            raise FreezeframeError(f"--shard-index {idx} must be in [0, {cfg.num_shards})")
        return RankInfo(idx, cfg.num_shards, launcher="shard-index")
    return discover_rank()


def plan_shards(rows: Sequence[ManifestRow], videos_per_shard: int) -> list[list[ManifestRow]]:
    """Store shard k holds rows [k*V, (k+1)*V) in manifest order."""
    v = max(1, videos_per_shard)
    return [list(rows[i : i + v]) for i in range(0, len(rows), v)]


def claim_order(num_shards: int, rank: RankInfo) -> list[int]:
    """The shard indices this process tries, in order: its own (``k % world == rank``) first,
    then, for ranks of one job (not ``--shard-index`` jobs), the other ranks' shards from the
    end of the list (where their owners get last, so stealing rarely collides with them)."""
    own = [k for k in range(num_shards) if k % rank.world == rank.rank]
    if rank.launcher == "shard-index":
        return own
    return own + [k for k in reversed(range(num_shards)) if k % rank.world != rank.rank]


def decode_workers(cfg: ExtractConfig) -> int:
    """``cfg.workers`` decode processes, or (0) one per local core but one, at least 1."""
    return cfg.workers or max(1, local_cores() - 1)


# --------------------------------------------------------------------------------------
# store header
# --------------------------------------------------------------------------------------
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
        "max_gap": cfg.max_gap,
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
    if cfg.decoder != "pyav":  # absent for the default decoder: earlier stores keep their content
        content["decoder"] = cfg.decoder
    pea = pea_header(backbone, cfg)
    if pea is not None:  # absent without PEA views: stores made before this option keep their content
        content["pea"] = pea
    crops = test_crops_header(cfg)
    if crops is not None:  # absent with the centre crop only: stores made before this option keep their content
        content["test_crops"] = {**crops, "num_videos": sum(wants_test_crops(cfg, r.split) for r in rows)}
    return {
        "content": content,
        "content_hash": config_hash(content),
        # storage options may hold credentials: only their names are recorded
        "config": {**to_dict(cfg), "storage_options": sorted(cfg.storage_options)},
        "backbone": backbone.describe(),
        "manifest_path": str(Path(cfg.manifest).resolve()),
        "environment": environment(),
    }


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
    retries: int = 0  # transient input errors (network) retried, apart from failures
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0  # from starting the decode workers to the last marker
    #: seconds until the first decoded frames arrived (worker start-up: spawn and imports),
    #: a fixed cost per run that a dataset-sized run amortises
    startup_seconds: float | None = None
    #: the job this run belongs to (:func:`pipeline.dist.job_id`, recorded in its markers), this
    #: process's rank in it, and every shard the job as a whole works on (all ranks)
    job: str = ""
    rank: RankInfo = field(default_factory=RankInfo)
    job_shards: list[str] = field(default_factory=list)
    _t0: float = field(default_factory=time.monotonic, repr=False)

    @property
    def frames_per_s(self) -> float:
        return self.frames_done / self.seconds if self.seconds else 0.0

    @property
    def steady_frames_per_s(self) -> float:
        """frames/s after the start-up (what a long run tends to)."""
        busy = self.seconds - (self.startup_seconds or 0.0)
        return self.frames_done / busy if busy > 0 else 0.0


def _job_rows(cfg: ExtractConfig, rows: list[ManifestRow], store_root: StoreFS
              ) -> list[tuple[str, list[ManifestRow]]]:
    """(shard name, rows) to do, in order. Normal runs: every planned shard; with
    ``retry_failed``: the retry shards of :func:`retry_plan` (only recorded failures)."""
    if not cfg.retry_failed:
        return [(shard_name(k), r) for k, r in enumerate(plan_shards(rows, cfg.videos_per_shard))]
    gen, video_ids = retry_plan(store_root, rows, cfg.videos_per_shard)
    by_id = {r.video_id: r for r in rows}
    retry_rows = [by_id[v] for v in video_ids]
    return [(shard_name(k, gen), r) for k, r in enumerate(plan_shards(retry_rows, cfg.videos_per_shard))]


def retry_plan(store_root: StoreFS, rows: Sequence[ManifestRow], videos_per_shard: int) -> tuple[int, list[str]]:
    """The retry generation to work on and its videos (in manifest order).

    Every generation's video list is fixed once in ``STORE/retries/retryGG.json`` (created
    atomically by the first job), so ``--shard-index`` jobs and torchrun ranks that start at
    different times split the *same* retry shards, and a retry run that was killed is
    resumed like a normal one. A new generation (the recorded failures that are not stored)
    is planned only once every shard of the latest one is complete.
    """
    store_root.makedirs("retries")
    markers = read_markers(store_root)
    plans = [n for n in store_root.list("retries")
             if len(n) == len("retry00.json") and n.startswith("retry") and n[5:7].isdigit() and n.endswith(".json")]
    if plans:
        latest = store_root.read_json(f"retries/{plans[-1]}")
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
    target = f"retries/retry{gen + 1:02d}.json"
    # created once: a job that loses the race uses the winner's plan
    create_once(store_root, target, {"generation": gen + 1, "videos": videos}, indent=1)
    plan = store_root.read_json(target)
    return int(plan["generation"]), list(plan["videos"])


def run_extract(cfg: ExtractConfig, console: object | None = None, *, job: str = "") -> ExtractSummary:
    """Extract features of ``cfg.manifest`` into ``cfg.store`` (resumable, multi-process safe).

    ``job``: the id of the job this process is a rank of (:func:`pipeline.dist.job_id`),
    recorded in every marker it writes so rank 0 can add up the job
    (:func:`pipeline.store.job_totals`). Ranks other than 0 log and show a progress bar only
    with ``cfg.verbose``; rank 0's bar counts the whole job's videos."""
    from rich.console import Console

    con: Console = console or Console(stderr=True)  # type: ignore[assignment]
    cfg.validate()
    root = store_fs(cfg.store, cfg.storage_options or None)  # a missing s3fs/gcsfs is refused before any work
    rank = job_rank(cfg)
    device = resolve_device(cfg.device, rank)  # a bad name is refused before the store is touched
    rows = read_manifest(cfg.manifest)
    if not rows:
        raise FreezeframeError(f"manifest {cfg.manifest} has no rows")
    # duplicate ids would make the finished store unreadable ("stored twice"): refuse them now
    validate_manifest(rows, check_files=False)
    require_fs_libraries(r.path for r in rows)  # s3:// without s3fs: one line with the pip command
    decoder = make_decoder(cfg.decoder)  # an optional decoder library that is missing: said now
    backbone = build_backbone(cfg)
    geometry = Geometry(size=backbone.preprocess.size, mode=cfg.geometry,
                        interpolation=cfg.interpolation or backbone.preprocess.interpolation)
    check_pea(backbone, cfg)  # before the store exists
    header = store_header(cfg, backbone, rows, geometry)
    init_store(root, header)  # refuses a mismatching store before any work
    shape = feature_shape(backbone, cfg)

    jobs = _job_rows(cfg, rows, root)
    own = {k for k in range(len(jobs)) if k % rank.world == rank.rank}
    done = set(read_markers(root))
    summary = ExtractSummary(store=str(root), job=job, rank=rank, job_shards=[n for n, _ in jobs])
    talk = rank.is_main or cfg.verbose  # other ranks: errors only
    # (name, rows, is one of this rank's own shards), in the order they are tried
    pending = [(*jobs[k], k in own) for k in claim_order(len(jobs), rank) if jobs[k][0] not in done]
    summary.shards_skipped = sum(1 for k in own if jobs[k][0] in done)
    if not pending:
        if talk:
            con.print(f"[green]nothing to do[/]: {len(own)} shard(s) of rank {rank.rank} already complete in {root}")
        return summary

    encoder = FeatureEncoder(backbone, device, cfg)
    workers = decode_workers(cfg)
    plan = thread_plan(cfg, device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(plan.threads_per_stream)
    decode_kwargs = dict(geometry=geometry, fps=cfg.fps, chunk_size=cfg.chunk_size,
                         threads=cfg.decode_threads, min_frames=cfg.min_frames, max_gap=cfg.max_gap)
    total_videos = sum(len(r) for _, r, mine in pending if mine)
    # rank 0 of several shows the job's bar: every rank's videos, the others' read from their markers
    job_bar = rank.world > 1 and rank.is_main and bool(job) and cfg.progress
    if job_bar:
        total_videos = sum(len(r) for _, r, _ in pending)
    t0 = summary._t0 = time.monotonic()
    try:
        with DecodePool(workers, decode_kwargs, decoder=decoder, timeout_s=cfg.decode_timeout,
                        buffer_bytes=cfg.decode_buffer_mb << 20) as pool, \
                ThreadPoolExecutor(plan.streams, thread_name_prefix="ff-stream") as streams, \
                _progress(cfg.progress and talk, con) as progress, \
                _rank_task(progress, total_videos, rank, root, job, job_bar) as task:
            queue = deque(pending)
            leased: dict[str, tuple[str, list[ManifestRow], bool, float]] = {}  # held by another's lease
            while queue or leased:
                if not queue:
                    # every shard left is under another process's lease: look again when the
                    # soonest may have run out (a dead holder's shard is then taken over)
                    soonest = min(e for *_, e in leased.values())
                    time.sleep(min(max(soonest - time.time() + 0.05, 0.1), cfg.lease_seconds / 4))
                    queue.extend((n, r, m) for n, r, m, _ in leased.values() if not root.exists(marker_key(n)))
                    leased.clear()
                    continue
                name, shard_rows, mine = queue.popleft()
                with shard_claim(root, name, lease_s=cfg.lease_seconds) as claim:
                    if root.exists(marker_key(name)):  # finished by another process since we looked
                        summary.shards_skipped += int(mine)
                        progress.update(task, advance=len(shard_rows) if mine else 0)
                        continue
                    if not claim.held:
                        if claim.expires is not None:  # a lease: look again once it may have run out
                            leased[name] = (name, shard_rows, mine, claim.expires)
                        elif mine:  # a live local writer (flock): it will finish the shard
                            summary.shards_busy.append(name)
                            if talk:
                                con.log(f"shard {name}: being written by another process ({claim.holder}); skipped")
                            progress.update(task, advance=len(shard_rows))
                        continue  # (another rank's shard that its rank is writing: nothing to say)
                    if not mine and not job_bar:  # (the job's bar counts every shard already)
                        progress.update(task, total=progress.tasks[0].total + len(shard_rows))
                    sink = BatchingSink(encoder, ShardWriter.create(root, name, feature_shape=shape, dtype=cfg.dtype,
                                                                    codec=cfg.codec, frames_per_file=cfg.frames_per_file,
                                                                    pea_views=cfg.pea_views, test_crops=cfg.test_crops,
                                                                    claim=claim),
                                        cfg.batch_size, streams, max_in_flight=plan.streams)
                    try:
                        stats = _extract_shard(name, shard_rows, pool, sink, summary, progress, task,
                                               crops=lambda r: wants_test_crops(cfg, r.split),
                                               crop_geometry=replace(geometry, mode="short_side"))
                    except LeaseLost as e:  # our heartbeats came too late: the new holder's copy counts
                        sink.cancel()
                        summary.shards_busy.append(name)
                        if talk:
                            con.log(f"shard {name}: {e}; left to it")
                        continue
                    except BaseException:
                        sink.cancel()
                        raise
                summary.shards_done += 1
                if talk:
                    con.log(f"shard {name}: {stats['videos']} videos, {stats['frames']} frames, "
                            f"{stats['failures']} failed, {stats['frames_per_s']:.1f} frames/s")
    finally:
        torch.set_num_threads(threads)
    summary.seconds = time.monotonic() - t0
    return summary


def _extract_shard(name: str, rows: list[ManifestRow], pool: DecodePool, sink: BatchingSink,
                   summary: ExtractSummary, progress: object, task: object, *,
                   crops: Callable[[ManifestRow], bool] = lambda r: False,
                   crop_geometry: Geometry | None = None) -> dict:
    """Decode, encode and write one store shard; its marker is written last. ``crops(row)``:
    the row gets the spatial test crops (decoded with ``crop_geometry``, the whole
    short-side-scaled frame, and recorded in its marker entry)."""
    t0, started_at = time.monotonic(), time.time()
    with_crops = [crops(r) for r in rows]
    jobs = [DecodeJob(i, r.video_id, r.path, r.start, r.end, crop_geometry if c else None)
            for i, (r, c) in enumerate(zip(rows, with_crops))]
    failures: list[Failure] = []
    frames = videos = retries = 0
    started: set[int] = set()
    for ev in pool.run(jobs):
        row = rows[ev.index]
        if not isinstance(ev, ChunkEvent):
            retries += ev.retries
        if isinstance(ev, ChunkEvent):
            if summary.startup_seconds is None:
                summary.startup_seconds = time.monotonic() - summary._t0
            if ev.index not in started:
                started.add(ev.index)
                entry = {"video_id": row.video_id, "split": row.split, "label": row.label,
                         "label_name": row.label_name}
                if sink.writer.test_crops > 1:  # absent without crops: markers as before
                    entry["crops"] = with_crops[ev.index]
                sink.begin(entry)
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
    stats = {"videos": videos, "frames": frames, "failures": len(failures), "retries": retries,
             "seconds": round(secs, 3), "frames_per_s": frames / secs if secs else 0.0,
             # who did it and when (Unix s): rank 0 adds up its job's markers (pipeline.store.totals)
             "job": summary.job, "rank": summary.rank.rank, "started": started_at, "finished": time.time()}
    sink.writer.finish(failures, stats)
    summary.videos_done += videos
    summary.frames_done += frames
    summary.retries += retries
    summary.failures += failures
    return stats


@contextmanager
def _rank_task(progress: Any, total: int, rank: RankInfo, root: StoreFS, job: str, job_bar: bool,
               every_s: float = 2.0) -> Iterator[Any]:
    """This rank's progress task (``rank r/w``). For rank 0 of a job (``job_bar``) it is the
    job's: ``total`` counts every rank's videos and a thread adds what the other ranks finish,
    read from their markers every ``every_s`` seconds (:func:`pipeline.store.job_totals`)."""
    task = progress.add_task(f"job of {rank.world} ranks" if job_bar else f"rank {rank.rank}/{rank.world}",
                             total=total, frames=0, failed=0, others_frames=0, others_failed=0)
    if not job_bar:
        yield task
        return
    stop = threading.Event()

    def follow() -> None:
        counted = 0
        while not stop.wait(every_s):
            t = job_totals(root, job)
            others = [r for r in t.tried_by_rank if r != rank.rank]
            tried = sum(t.tried_by_rank[r] for r in others)
            progress.update(task, advance=tried - counted, others_frames=sum(t.frames_by_rank[r] for r in others),
                            others_failed=sum(t.failed_by_rank[r] for r in others))
            counted = tried

    thread = threading.Thread(target=follow, name="ff-job-bar", daemon=True)
    thread.start()
    try:
        yield task
    finally:
        stop.set()
        thread.join()


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
            f = task.fields
            fps = (f.get("frames", 0) + f.get("others_frames", 0)) / el if el else 0.0
            failed = f.get("failed", 0) + f.get("others_failed", 0)
            return Text(f"{vps:.2f} videos/s  {fps:.1f} frames/s  failed {failed}")

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rates(),
                    TimeElapsedColumn(), console=console, disable=not enabled, transient=False)
