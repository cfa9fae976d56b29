"""Train independent chains of runs side by side on one machine.

A *chain* is a list of resolved run configs trained in order in one process (a pre-training
and the fine-tuning that starts from it, or a single run); chains share nothing. With
``workers`` > 1 each chain trains in a spawned worker process on exactly ``threads`` torch
intra-op threads, its log in ``<run_dir>.log`` beside its run directory; the parent shows one
progress bar over the runs and a line per finished run. With ``workers`` <= 1 the chains train
one after another in this process, on the same ``threads``.

Why: the light stage-2 models are small (the demo's TMM has 0.35 M parameters), so one run
spread over two threads spends much of its step in OpenMP hand-overs, and on a loaded machine
far more (an AdamW step of that model: 2.4 ms on 1 thread, 21 ms on 2 threads at a load of 7);
two one-thread runs side by side keep both cores busy. A run's result does not depend on the
schedule: it trains alone in its process on a fixed thread count, so a table is the same
whatever ``workers`` is (``tests/test_runpool.py``).
"""
from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.dist import local_cores
from pipeline.errors import FreezeframeError
from train.loop import RunResult, fit
from train.schema import TrainConfig

__all__ = ["ChainFailed", "auto_workers", "log_path", "torch_threads", "train_chains"]


class ChainFailed(FreezeframeError):
    """A run of a chain raised in its worker process; the message names the run and its log."""


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (0: leave the count alone), then restore it."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def auto_workers(threads: int) -> int:
    """Chains that fit side by side on this process's cores with ``threads`` threads each (>= 1)."""
    return max(1, local_cores() // max(1, threads))


def log_path(cfg: TrainConfig) -> Path:
    """Where a run trained in a worker process writes its log: ``<run_dir>.log``."""
    run_dir = Path(cfg.run_dir)
    return run_dir.with_name(run_dir.name + ".log")


@dataclass(frozen=True)
class _Done:
    """What a worker sends back for one chain: its results, or the failed run and the traceback."""

    results: list[RunResult]
    seconds: float
    failed_run: str | None = None
    error: str | None = None


def _train_chain(chain: Sequence[TrainConfig], threads: int) -> _Done:
    """Worker side: train ``chain`` in order on ``threads`` threads, each run logging to its file."""
    t0 = time.monotonic()
    results: list[RunResult] = []
    with torch_threads(threads):
        for cfg in chain:
            path = log_path(cfg)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as log:
                try:
                    results.append(fit(cfg, Console(file=log, width=120, force_terminal=False)))
                except BaseException as err:  # noqa: BLE001  (sent back whole: a worker's exception may not pickle)
                    log.write(traceback.format_exc())
                    return _Done(results, time.monotonic() - t0, str(cfg.run_dir), f"{type(err).__name__}: {err}")
    return _Done(results, time.monotonic() - t0)


def train_chains(chains: Sequence[Sequence[TrainConfig]], *, workers: int = 0, threads: int = 1,
                 console: Console | None = None, description: str = "runs") -> list[list[RunResult]]:
    """Train every chain (``workers``: 0 = :func:`auto_workers`); results in chain order.

    ``threads``: torch threads of every run (0: the caller's count in this process, cores /
    workers in worker processes).

    Raises :class:`ChainFailed` for the first chain whose run failed, once the chains already
    running have finished (finished runs are kept: a rerun resumes or skips them)."""
    con = console or Console(stderr=True)
    workers = auto_workers(threads) if workers <= 0 else workers
    if workers > 1 and threads <= 0:
        threads = max(1, local_cores() // workers)
    if workers <= 1 or len(chains) <= 1:
        with torch_threads(threads):
            return [[fit(cfg, con) for cfg in chain] for chain in chains]
    out: list[list[RunResult] | None] = [None] * len(chains)
    failures: list[str] = []
    total = sum(len(c) for c in chains)
    columns = (TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=con) as bar, \
            ProcessPoolExecutor(max_workers=min(workers, len(chains)), mp_context=mp.get_context("spawn")) as pool:
        task = bar.add_task(description, total=total)
        con.log(f"{len(chains)} chains ({total} runs) on {min(workers, len(chains))} worker processes x "
                f"{threads} thread(s); each run logs to <run_dir>.log")
        pending: dict[Future, int] = {pool.submit(_train_chain, list(c), threads): k for k, c in enumerate(chains)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                k = pending.pop(fut)
                res: _Done = fut.result()
                bar.advance(task, len(res.results))
                for r in res.results:
                    top1 = "" if r.top1 is None else f", top-1 {100 * r.top1:.1f} %"
                    con.log(f"{Path(r.run_dir).name}: done ({r.steps} steps{top1})")
                if res.error is not None:
                    failures.append(f"run {res.failed_run} failed: {res.error} (log: {res.failed_run}.log)")
                    continue
                out[k] = res.results
    if failures:
        raise ChainFailed(failures[0] + (f"; and {len(failures) - 1} other run(s)" if len(failures) > 1 else ""))
    return [r for r in out if r is not None]

