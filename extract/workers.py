"""Killable decode workers that run ahead of the model.

Videos are dealt round-robin to ``num_workers`` worker processes (spawned, so they share no
threads or CUDA state with the main process). Each worker decodes its videos in order and
puts frame chunks into its own *bounded* queue, so decoding runs ahead of the model by at
most ``queue_chunks`` chunks per worker (memory stays bounded whatever a video's length)
while the main process consumes video i from one worker and the next videos are being
decoded by the others.

Timeout: a video may keep the main process waiting for its next chunk for at most
``timeout_s`` seconds in total. A new worker's start-up (its imports, seconds on a busy
machine) is not counted: the worker says when it is ready. A worker that exceeds it (a hung
native decoder, which can hold the GIL so no in-process alarm would fire) is killed and
replaced; the video is recorded as a failure at stage ``timeout`` and the worker's remaining
videos are re-queued. A worker that dies (e.g. segfault in a decoder) is handled the same way
(stage ``decode``). A worker whose main process dies (even by SIGKILL) exits too.
"""
from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.store import Failure


@dataclass(frozen=True)
class DecodeJob:
    """What a worker needs to decode one video (picklable)."""

    index: int  # position in the current batch of jobs
    video_id: str
    path: str
    start: float | None = None  # seconds
    end: float | None = None  # seconds


@dataclass
class ChunkEvent:
    index: int
    frames: np.ndarray  # (n, S, S, 3) uint8
    timestamps: np.ndarray  # (n,) float64 seconds


@dataclass
class DoneEvent:
    index: int
    num_frames: int


@dataclass
class FailedEvent:
    index: int
    failure: Failure


Event = ChunkEvent | DoneEvent | FailedEvent


_POLL_S = 1.0  # how often a waiting worker checks that the main process is still alive


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when the thread that started it (the pool's
    owner) dies, even while a native decoder hangs; the polling in :func:`_worker_main`
    covers the other systems."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_main(jobs: Any, out: Any, decode_kwargs: dict) -> None:
    """Worker loop: decode each job and stream ("chunk" | "done" | "failed") messages.

    Exits when it gets ``None`` or when the main process is gone (killed with SIGKILL, a
    worker blocked on its queues would otherwise live on as an orphan).
    """
    from extract.decode import DecodeError, iter_frames

    _die_with_parent()
    parent = mp.parent_process()

    def orphaned() -> bool:
        return parent is not None and not parent.is_alive()

    def put(msg: tuple) -> None:
        while True:
            try:
                out.put(msg, timeout=_POLL_S)
                return
            except queue.Full:
                if orphaned():
                    raise SystemExit(0) from None

    put(("ready", -1))  # imports done: from now on the consumer's wait counts against the timeout
    while True:
        try:
            job = jobs.get(timeout=_POLL_S)
        except queue.Empty:
            if orphaned():
                return
            continue
        if job is None:
            return
        n = 0
        try:
            for chunk in iter_frames(job.path, start=job.start, end=job.end, **decode_kwargs):
                put(("chunk", job.index, chunk.frames, chunk.timestamps))
                n += len(chunk.frames)
            put(("done", job.index, n))
        except DecodeError as e:
            put(("failed", job.index, e.stage, type(e).__name__, str(e)))
        except Exception as e:  # noqa: BLE001 - any decoder error is data about this video
            msg = f"{e} | {traceback.format_exc(limit=3).strip().splitlines()[-1]}"
            put(("failed", job.index, "decode", type(e).__name__, msg))


class _Worker:
    def __init__(self, ctx: Any, decode_kwargs: dict, queue_chunks: int) -> None:
        self.jobs = ctx.Queue()
        self.out = ctx.Queue(maxsize=queue_chunks)
        self.proc = ctx.Process(target=_worker_main, args=(self.jobs, self.out, decode_kwargs), daemon=True)
        self.proc.start()
        self.videos_done = 0
        self.ready = False  # its first message, "ready", says its imports are done

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        for q in (self.jobs, self.out):
            q.cancel_join_thread()
            q.close()

    def stop(self) -> None:
        try:
            self.jobs.put(None)
            self.proc.join(timeout=5)
        finally:
            self.kill()


class DecodePool:
    """A pool of decode workers; :meth:`run` yields events for jobs in job order.

    Args:
        num_workers: worker processes (>= 1).
        decode_kwargs: keyword arguments of ``extract.decode.iter_frames`` (geometry, fps,
            chunk_size, threads, min_frames).
        timeout_s: total seconds a video may keep the consumer waiting (see module doc).
        queue_chunks: chunks each worker may decode ahead.
        recycle_after: replace a worker after this many videos (caps slow leaks in native
            decoders, like ``maxtasksperchild``).
    """

    def __init__(
        self,
        num_workers: int,
        decode_kwargs: dict,
        *,
        timeout_s: float = 120.0,
        queue_chunks: int = 4,
        recycle_after: int = 500,
    ) -> None:
        self.ctx = mp.get_context("spawn")
        self.decode_kwargs = decode_kwargs
        self.timeout_s = timeout_s
        self.queue_chunks = queue_chunks
        self.recycle_after = recycle_after
        self.workers = [self._spawn() for _ in range(max(1, num_workers))]

    def _spawn(self) -> _Worker:
        return _Worker(self.ctx, self.decode_kwargs, self.queue_chunks)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers = []

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, jobs: Sequence[DecodeJob]) -> Iterator[Event]:
        """Decode ``jobs`` (with ``job.index == position``); yield events in job order.

        For each job: zero or more :class:`ChunkEvent`, then one :class:`DoneEvent` or one
        :class:`FailedEvent` (after which that job's earlier chunks must be discarded).
        """
        nw = len(self.workers)
        # recycle long-lived workers between runs
        for k, w in enumerate(self.workers):
            if w.videos_done >= self.recycle_after:
                w.stop()
                self.workers[k] = self._spawn()
        for job in jobs:
            self.workers[job.index % nw].jobs.put(job)
        for job in jobs:
            k = job.index % nw
            yield from self._consume(job, k, jobs)

    def _consume(self, job: DecodeJob, k: int, jobs: Sequence[DecodeJob]) -> Iterator[Event]:
        waited = 0.0
        while True:
            w = self.workers[k]
            t0 = time.monotonic()
            try:
                msg = w.out.get(timeout=min(1.0, max(self.timeout_s - waited, 0.01)))
            except queue.Empty:
                if w.ready:
                    waited += time.monotonic() - t0
                if not w.proc.is_alive():
                    yield self._replace(k, job, jobs, "decode", "WorkerDied",
                                        f"decode worker exited with code {w.proc.exitcode}")
                    return
                if waited >= self.timeout_s:
                    yield self._replace(k, job, jobs, "timeout", "TimeoutError",
                                        f"decoding made the pipeline wait over {self.timeout_s:g} s; "
                                        "the worker was killed (raise --decode-timeout for very long videos)")
                    return
                continue
            if w.ready:
                waited += time.monotonic() - t0
            kind, index = msg[0], msg[1]
            if kind == "ready":
                w.ready = True
                continue
            if index != job.index:  # cannot happen: each worker serves its jobs in order
                raise RuntimeError(f"decode worker sent job {index}, expected {job.index}")
            if kind == "chunk":
                yield ChunkEvent(index, msg[2], msg[3])
            elif kind == "done":
                w.videos_done += 1
                yield DoneEvent(index, msg[2])
                return
            else:
                w.videos_done += 1
                yield FailedEvent(index, Failure(job.video_id, msg[2], msg[3], msg[4]))
                return

    def _replace(self, k: int, job: DecodeJob, jobs: Sequence[DecodeJob], stage: str,
                 error_type: str, message: str) -> FailedEvent:
        """Kill worker k, start a new one and give it k's remaining jobs."""
        self.workers[k].kill()
        self.workers[k] = self._spawn()
        nw = len(self.workers)
        for later in jobs:
            if later.index > job.index and later.index % nw == k:
                self.workers[k].jobs.put(later)
        return FailedEvent(job.index, Failure(job.video_id, stage, error_type, message))
