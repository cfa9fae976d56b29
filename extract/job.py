"""One extraction job of one or many ranks, and its one summary.

:func:`run_job` is what ``freezeframe extract`` runs in every process: it finds this
process's rank (:func:`extract.runner.job_rank`), joins the job's process group when the ranks
can meet (torchrun; ``srun`` with ``MASTER_ADDR``/``MASTER_PORT`` exported), agrees on a job id
(:func:`pipeline.dist.job_id`, recorded in every marker the job writes), runs
:func:`extract.runner.run_extract`, and on rank 0 waits for the other ranks (a barrier, or
without a process group the store's markers: :func:`pipeline.store.wait_for_shards`) and adds
up the whole job from the markers (:func:`pipeline.store.job_totals`). The other ranks return
their own summary only; the caller prints rank 0's.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import torch.distributed as dist

from extract.config import ExtractConfig
from extract.runner import ExtractSummary, job_rank, run_extract
from pipeline.dist import RankInfo, job_id, join_process_group
from pipeline.store import JobTotals, job_totals, scan_markers, wait_for_shards

#: how long a rank waits at the end for the others (gloo's default, 30 min, is shorter than the
#: imbalance between the ranks of a long job with static shards)
JOB_TIMEOUT = datetime.timedelta(days=7)


@dataclass
class JobResult:
    """What one process of a job did (``summary``) and, on rank 0 of a job of several ranks,
    what the whole job did (``totals``; None elsewhere)."""

    rank: RankInfo
    summary: ExtractSummary
    totals: JobTotals | None = None
    #: job shards already complete before this job (rank 0 of several ranks)
    skipped: int = 0
    #: job shards still incomplete after the wait: a rank died or never started (rank 0, no
    #: process group)
    missing: list[str] = field(default_factory=list)

    @property
    def several(self) -> bool:
        """A job of several ranks (torchrun, srun), not one process or a --shard-index job."""
        return self.rank.launcher in ("torchrun", "slurm") and self.rank.world > 1


def run_job(cfg: ExtractConfig, console: object | None = None) -> JobResult:
    """Run this process's part of the extraction job (module docstring)."""
    rank = job_rank(cfg)
    result = JobResult(rank, ExtractSummary(store=cfg.store))
    grouped = result.several and join_process_group(rank, "gloo", timeout=JOB_TIMEOUT)
    try:
        job = job_id(rank)
        result.summary = run_extract(cfg, console, job=job)
        if grouped:
            dist.barrier()  # every rank's markers are written
        elif result.several and rank.is_main:
            result.missing = wait_for_shards(cfg.store, result.summary.job_shards)
    finally:
        if grouped:
            dist.destroy_process_group()
    if result.several and rank.is_main:
        result.totals = job_totals(cfg.store, job)
        complete = set(scan_markers(cfg.store)[0]) & set(result.summary.job_shards)
        result.skipped = len(complete) - len(result.totals.shards)
    return result
