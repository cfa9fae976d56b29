"""What one extraction job did, added up from the store's completion markers, and the wait
for the other ranks of a job.

Every shard a job completes records the job's id (:func:`pipeline.dist.job_id`), the rank
that wrote it and the wall-clock span of its work in ``marker["stats"]`` (``job``, ``rank``,
``started``, ``finished``: Unix seconds). Rank 0 adds up the markers of its job
(:func:`job_totals`) once the other ranks are done, so a job prints one summary whatever
the number of ranks and whichever rank took which shard.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from pipeline.store.checks import failure_reasons
from pipeline.store.layout import scan_markers, shard_locked


@dataclass
class JobTotals:
    """The shards one job completed, with their videos, frames and failures. ``seconds``:
    from the first shard's start to the last shard's end (any rank)."""

    job: str
    shards: list[str] = field(default_factory=list)
    #: per rank: shards written, videos tried (stored + failed), frames, failed videos
    shards_by_rank: dict[int, int] = field(default_factory=dict)
    tried_by_rank: dict[int, int] = field(default_factory=dict)
    frames_by_rank: dict[int, int] = field(default_factory=dict)
    failed_by_rank: dict[int, int] = field(default_factory=dict)
    videos: int = 0
    frames: int = 0
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    @property
    def failure_reasons(self) -> list[tuple[str, int]]:
        """("stage: ErrorType", count), most common first."""
        return failure_reasons(self.failures)


def job_totals(root: str | os.PathLike, job: str) -> JobTotals:
    """Add up the completion markers whose ``stats.job`` is ``job`` (unreadable markers are
    skipped: ``verify`` reports them)."""
    markers, _ = scan_markers(root)
    out = JobTotals(job)
    starts, ends = [], []
    for name, m in markers.items():
        st = m.get("stats") or {}
        if not isinstance(st, dict) or st.get("job") != job:
            continue
        out.shards.append(name)
        rank = int(st.get("rank", 0))
        videos, frames = len(m.get("videos", [])), int(m.get("num_frames", 0))
        failures = [f for f in m.get("failures", []) if isinstance(f, dict)]
        for per_rank, n in ((out.shards_by_rank, 1), (out.tried_by_rank, videos + len(failures)),
                            (out.frames_by_rank, frames), (out.failed_by_rank, len(failures))):
            per_rank[rank] = per_rank.get(rank, 0) + n
        out.videos += videos
        out.frames += frames
        out.failures += failures
        if "started" in st and "finished" in st:
            starts.append(float(st["started"]))
            ends.append(float(st["finished"]))
    out.seconds = max(ends) - min(starts) if starts else 0.0
    return out


def wait_for_shards(root: str | os.PathLike, shards: Iterable[str], *, poll_s: float = 5.0,
                    idle_s: float = 120.0, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Wait until every shard in ``shards`` has its completion marker, or until none of the
    missing ones has been written for ``idle_s`` seconds (no marker appeared and none of them
    is locked by a writer: their rank died or never started). Returns the shards still
    missing (empty: all complete). For jobs without a process group (``srun`` without
    ``MASTER_ADDR``); with one, a barrier says when the ranks are done."""
    want = set(shards)
    last_change, missing = clock(), None
    while True:
        markers, _ = scan_markers(root)
        now_missing = sorted(want - set(markers))
        if not now_missing:
            return []
        if now_missing != missing or any(shard_locked(root, s) for s in now_missing):
            missing, last_change = now_missing, clock()
        elif clock() - last_change >= idle_s:
            return now_missing
        sleep(poll_s)
