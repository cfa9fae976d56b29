"""Killable decode workers that run ahead of the model, several videos at once.

Videos are dealt to ``num_workers`` worker processes (spawned, so they share no threads or
CUDA state with the main process) as they finish earlier ones: each worker decodes one video
and has the next one queued, so ``num_workers`` videos are decoded at once. A worker hands
frame chunks to a sender thread through a *bounded* queue (``queue_chunks``) and its pipe.
The main process yields the events in job order: the oldest unfinished video streams
through, later ones wait in a reorder buffer bounded in bytes (``buffer_bytes``); when it is
full only the oldest video's worker is read and the others block, so memory stays bounded
whatever the videos' lengths (:class:`DecodePool`). Measured scaling: ``bench/decode.py``,
``docs/benchmarks.md``.

Transport: each worker writes length-prefixed pickled messages into its own pipe, whose
write end only the worker holds, so a worker that dies (any signal, an out-of-memory kill)
closes it and the main process reads end-of-file, even halfway through a message. The main
process never blocks on a read: it polls the pipe and reads what is there, keeping a
partial message until the rest arrives, so a worker that stalls halfway through sending a
chunk is caught by the timeout like one that sends nothing. (``multiprocessing.Queue``
cannot do this: its reader blocks until a whole message has arrived, forever if its writer
died, since the main process holds a copy of the write end.)

Timeout: a video may keep the main process waiting for its next message for at most
``timeout_s`` seconds in total. A new worker's start-up (its imports, seconds on a busy
machine) is not counted: the worker says when it is ready; a start-up longer than
``startup_s`` counts as a stall. A worker that exceeds it (a hung
native decoder, which can hold the GIL so no in-process alarm would fire, or a worker
stopped in the middle of a message) is killed. A video producing frames without end is
stopped in the worker by the decoder's frame cap (stage ``too_long``).

Retry: a worker that dies or stalls on a video is replaced by a fresh worker, which decodes
the video again from its beginning and then the dead worker's remaining videos. Frames the
consumer already received are not sent twice: the retry's first frames are checked against
them (presentation times and a CRC-32 of each frame's pixels; decoding is deterministic) and
dropped, so the consumer sees one uninterrupted video. A second death or stall on the same
video, or a retry that does not reproduce the frames already delivered, ends the video as a
:class:`FailedEvent`: stage ``worker_died`` with the signal as the reason (``worker_died:
SIGKILL``) or stage ``timeout``. A worker whose main process dies (even by SIGKILL) exits too.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import select
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from extract.decode_worker import _HEADER, DecodeJob, _worker_main
from pipeline.store import Failure


@dataclass
class ChunkEvent:
    index: int
    frames: np.ndarray  # (n, S, S, 3) uint8
    timestamps: np.ndarray  # (n,) float64 seconds


@dataclass
class DoneEvent:
    index: int
    num_frames: int
    retries: int = 0  # transient input errors retried (not failures)


@dataclass
class FailedEvent:
    index: int
    failure: Failure
    retries: int = 0  # transient input errors retried before the video failed


Event = ChunkEvent | DoneEvent | FailedEvent


_POLL_S = 1.0  # seconds between checks while the main process waits for messages
_PIPE_BYTES = 1 << 20  # pipe buffer asked for (Linux F_SETPIPE_SZ): fewer wake-ups per chunk
_F_SETPIPE_SZ = 1031


class _Inbox:
    """Main-process side of a worker's pipe: whole messages, read without ever blocking.

    A partial message is kept until its rest arrives; end-of-file (the worker exited, even
    halfway through a message) raises EOFError.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.fd = conn.fileno()
        os.set_blocking(self.fd, False)
        try:
            import fcntl

            fcntl.fcntl(self.fd, _F_SETPIPE_SZ, _PIPE_BYTES)
        except (ImportError, OSError):  # not Linux, or above the system's limit: default size
            pass
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        self.buf = bytearray(_HEADER)
        self.got = 0
        self.in_body = False

    def recv(self, timeout: float) -> tuple | None:
        """The next message, or None when none completed within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                k = os.readv(self.fd, [memoryview(self.buf)[self.got:]])
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.poller.poll(max(1, int(left * 1000)))
                continue
            if k == 0:
                raise EOFError("the decode worker closed its pipe"
                               + (f" {self.got} bytes into a message" if self.got or self.in_body else ""))
            self.got += k
            if self.got < len(self.buf):
                continue
            if not self.in_body:
                self.buf, self.got, self.in_body = bytearray(int.from_bytes(self.buf, "little")), 0, True
                continue
            msg = pickle.loads(self.buf)
            self.buf, self.got, self.in_body = bytearray(_HEADER), 0, False
            return msg

    def close(self) -> None:
        self.conn.close()


class _Worker:
    def __init__(self, ctx: Any, decoder: Any, decode_kwargs: dict, queue_chunks: int) -> None:
        self.jobs = ctx.Queue()
        reader, writer = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_worker_main, args=(self.jobs, writer, decoder, decode_kwargs, queue_chunks),
                                daemon=True, name="ff-decode")
        self.proc.start()
        writer.close()  # the worker now holds the only write end: its death is an end-of-file here
        self.inbox = _Inbox(reader)
        self.videos_done = 0
        self.assigned: deque[int] = deque()  # its unfinished jobs (indices), in the order it decodes them
        self.ready = False  # its first message, "ready", says its imports are done
        self.started = time.monotonic()

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.inbox.close()
        self.jobs.cancel_join_thread()
        self.jobs.close()

    def stop(self) -> None:
        try:
            self.jobs.put(None)
            self.proc.join(timeout=5)
        finally:
            self.kill()

    def death(self) -> str:
        """Why the worker process ended, e.g. ``SIGKILL`` or ``exit code 1`` (waits for it)."""
        self.proc.join(timeout=5)
        code = self.proc.exitcode
        if code is None:
            return "closed its pipe but is still running"
        if code < 0:
            try:
                return signal.Signals(-code).name
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"


@dataclass(frozen=True)
class _Fault:
    """A worker that died or stalled on a video: ``reason`` is the short form
    (``worker_died: SIGKILL``), ``advice`` what the user can do."""

    stage: str  # worker_died | timeout
    error_type: str
    reason: str
    advice: str


_DEATH_ADVICE = ("SIGKILL usually means the out-of-memory killer (see `dmesg`; use fewer --workers or "
                 "smaller chunks), SIGSEGV/SIGABRT a crash inside the native decoder (re-encode the file, "
                 "e.g. ffmpeg -i IN -c:v libx264 OUT.mp4, or drop it); then rerun with --retry-failed")


@dataclass
class _Attempt:
    """What the consumer has received of one job: presentation times and pixel CRCs of the
    frames delivered, to check (and drop) them when the video is decoded again by a retry."""

    times: list[np.ndarray] = field(default_factory=list)  # each (n,) float64 seconds
    crcs: list[np.ndarray] = field(default_factory=list)  # each (n,) uint32
    faults: list[_Fault] = field(default_factory=list)  # each death or stall, in order

    def delivered(self, times: np.ndarray, crcs: np.ndarray) -> None:
        self.times.append(np.asarray(times))
        self.crcs.append(np.asarray(crcs))

    def replay(self) -> "_Replay":
        cat = lambda xs, dt: np.concatenate(xs) if xs else np.empty(0, dt)  # noqa: E731
        return _Replay(cat(self.times, np.float64), cat(self.crcs, np.uint32))


@dataclass
class _Replay:
    """Frames a retry must reproduce before it delivers anything new."""

    times: np.ndarray
    crcs: np.ndarray
    pos: int = 0

    @property
    def left(self) -> int:
        return len(self.times) - self.pos

    def consume(self, times: np.ndarray, crcs: np.ndarray) -> tuple[int, str | None]:
        """Match the start of a retried chunk; returns (frames to drop, mismatch or None)."""
        n = min(self.left, len(times))
        want_t, want_c = self.times[self.pos:self.pos + n], self.crcs[self.pos:self.pos + n]
        bad = np.flatnonzero((times[:n] != want_t) | (crcs[:n] != want_c))
        if len(bad):
            i = int(bad[0])
            return n, (f"frame {self.pos + i} differs from the first attempt's "
                       f"(time {times[i]:.6f} s vs {want_t[i]:.6f} s, pixels "
                       f"{'equal' if crcs[i] == want_c[i] else 'differ'})")
        self.pos += n
        return n, None


@dataclass
class _JobState:
    """The consumer's view of one job: chunks received but not yet yielded (the reorder
    buffer), its end event once known, and what a retry must reproduce."""

    job: DecodeJob
    chunks: deque = field(default_factory=deque)  # ChunkEvent, in order
    nbytes: int = 0  # bytes of ``chunks``' frames
    end: "DoneEvent | FailedEvent | None" = None
    worker: int = -1  # the worker it is assigned to
    attempt: _Attempt = field(default_factory=_Attempt)
    replay: _Replay | None = None
    waited: float = 0.0  # seconds it kept the consumer waiting (as the head job), start-up excluded


class DecodePool:
    """A pool of decode workers; :meth:`run` yields events for jobs in job order.

    Several videos are decoded at once, one per worker, and each worker has its next video
    queued. Jobs are dealt to the worker with the fewest unfinished jobs, as workers finish
    them (a long video does not hold back the short ones behind it). Events come out in job
    order: the chunks of the oldest unfinished job (the *head*) stream through as they
    arrive, and the chunks of later jobs wait in a reorder buffer of at most
    ``buffer_bytes``. When it is full, the pool reads only the head's worker; the others
    block on their pipes (their run-ahead is ``queue_chunks`` chunks plus a pipe buffer), so
    memory stays bounded whatever the videos' lengths. The head job is always being decoded
    (a worker decodes its jobs in order, and every job before the head is finished), so the
    pool never deadlocks. A worker that dies is noticed when its pipe ends, a stall when its
    job is the head (see the module doc for the timeout).

    Args:
        num_workers: worker processes (>= 1).
        decode_kwargs: keyword arguments of ``extract.decode.iter_frames`` (geometry, fps,
            chunk_size, threads, min_frames, max_gap).
        decoder: a picklable decoder (:mod:`extract.decoders`); default PyAV.
        timeout_s: total seconds a video may keep the consumer waiting (see module doc).
        startup_s: seconds a new worker may take to start (imports) before it is replaced.
        queue_chunks: chunks each worker may decode ahead of its pipe.
        recycle_after: replace a worker after this many videos (caps slow leaks in native
            decoders, like ``maxtasksperchild``).
        retries: times a video is decoded again on a fresh worker after its worker died or
            stalled, before it is recorded as a failure.
        buffer_bytes: most bytes of decoded frames held for jobs after the head.
        jobs_per_worker: jobs queued on a worker at once (1: it idles between videos while
            the consumer hands it the next one).
    """

    def __init__(
        self,
        num_workers: int,
        decode_kwargs: dict,
        *,
        decoder: Any = None,
        timeout_s: float = 120.0,
        startup_s: float = 300.0,
        queue_chunks: int = 4,
        recycle_after: int = 500,
        retries: int = 1,
        buffer_bytes: int = 512 << 20,
        jobs_per_worker: int = 2,
    ) -> None:
        if decoder is None:
            from extract.decoders import PyAVDecoder  # lazy: the module imports the decode stack

            decoder = PyAVDecoder()
        self.ctx = mp.get_context("spawn")
        self.decoder = decoder
        self.decode_kwargs = decode_kwargs
        self.timeout_s = timeout_s
        self.startup_s = startup_s
        self.queue_chunks = queue_chunks
        self.recycle_after = recycle_after
        self.retries = retries
        self.buffer_bytes = buffer_bytes
        self.jobs_per_worker = max(1, jobs_per_worker)
        self.peak_buffer_bytes = 0  # most bytes the reorder buffer held (for tests and benchmarks)
        self.workers = [self._spawn() for _ in range(max(1, num_workers))]

    def _spawn(self) -> _Worker:
        return _Worker(self.ctx, self.decoder, self.decode_kwargs, self.queue_chunks)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers = []

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the run
    def run(self, jobs: Sequence[DecodeJob]) -> Iterator[Event]:
        """Decode ``jobs`` (with ``job.index == position``); yield events in job order.

        For each job: zero or more :class:`ChunkEvent`, then one :class:`DoneEvent` or one
        :class:`FailedEvent` (after which that job's earlier chunks must be discarded).
        """
        for k, w in enumerate(self.workers):  # recycle long-lived workers between runs
            if w.videos_done >= self.recycle_after:
                w.stop()
                self.workers[k] = self._spawn()
            w.assigned.clear()  # a run abandoned by its consumer leaves nothing behind
        self._states = [_JobState(job) for job in jobs]
        self._next = 0  # next job to deal
        self._buffered = 0  # bytes in the reorder buffer (jobs after the head)
        try:
            for head in range(len(jobs)):
                self._head = head
                st = self._states[head]
                while True:
                    self._deal()
                    while st.chunks:
                        ev = st.chunks.popleft()
                        st.nbytes -= ev.frames.nbytes
                        self._buffered -= ev.frames.nbytes
                        yield ev
                    if st.end is not None:
                        yield st.end
                        break
                    self._pump(head)
                self._states[head] = None  # type: ignore[call-overload]  # free it
        finally:
            if any(w.assigned for w in self.workers):  # the consumer stopped early: drop queued work
                for k, w in enumerate(self.workers):
                    if w.assigned:
                        w.kill()
                        self.workers[k] = self._spawn()

    def _deal(self) -> None:
        """Give the next jobs to the workers with the fewest unfinished jobs."""
        while self._next < len(self._states):
            k = min(range(len(self.workers)), key=lambda i: len(self.workers[i].assigned))
            w = self.workers[k]
            if len(w.assigned) >= self.jobs_per_worker:
                return
            st = self._states[self._next]
            st.worker = k
            w.assigned.append(self._next)
            w.jobs.put(st.job)
            self._next += 1

    def _pump(self, head: int) -> None:
        """Wait (at most 1 s) for messages; handle every complete one that arrived, from the
        head's worker and, while the buffer has room, from the others; then check the head's
        worker for a stall."""
        st = self._states[head]
        hk = st.worker
        listen = [k for k, w in enumerate(self.workers)
                  if k == hk or (w.assigned and self._buffered < self.buffer_bytes)]
        poller = select.poll()
        for k in listen:
            poller.register(self.workers[k].inbox.fd, select.POLLIN)
        t0 = time.monotonic()
        poller.poll(int(1000 * min(1.0, max(self.timeout_s - st.waited, 0.01))))
        if self.workers[hk].ready:
            st.waited += time.monotonic() - t0
        for k in listen:
            self._drain(k)
        if st.end is None and not st.chunks:
            fault = self._stall(self.workers[hk], st.waited)
            if fault is not None:
                self._fault(hk, fault)

    def _drain(self, k: int) -> None:
        """Handle the complete messages waiting in worker k's pipe (only one while the buffer
        is full: the head's chunks are yielded before more are read)."""
        while True:
            w = self.workers[k]
            try:
                msg = w.inbox.recv(timeout=0)
            except EOFError:
                self._fault(k, _Fault("worker_died", "WorkerDied", f"worker_died: {w.death()}", _DEATH_ADVICE))
                return
            if msg is None:
                return
            self._handle(k, msg)
            if self._buffered >= self.buffer_bytes:  # one message at a time while the buffer is full
                return

    def _handle(self, k: int, msg: tuple) -> None:
        w = self.workers[k]
        kind, index = msg[0], msg[1]
        if kind == "ready":
            w.ready = True
            return
        if not w.assigned or index != w.assigned[0]:  # cannot happen: a worker serves its jobs in order
            raise RuntimeError(f"decode worker sent job {index}, expected {list(w.assigned)[:1]}")
        st = self._states[index]
        if kind == "chunk":
            frames, times, crcs = msg[2], msg[3], msg[4]
            if st.replay is not None and st.replay.left:
                drop, mismatch = st.replay.consume(times, crcs)
                if mismatch is not None:
                    self._finish(k, self._failed(st, f"the retry on a fresh worker decoded other frames: "
                                                     f"{mismatch}"), kill=True)
                    return
                frames, times, crcs = frames[drop:], times[drop:], crcs[drop:]
                if not len(times):
                    return
            st.attempt.delivered(times, crcs)
            st.chunks.append(ChunkEvent(index, frames, times))
            st.nbytes += frames.nbytes
            self._buffered += frames.nbytes
            self.peak_buffer_bytes = max(self.peak_buffer_bytes, self._buffered)
            return
        w.videos_done += 1
        if kind == "done":
            n, retries = msg[2], msg[3]
            if st.replay is not None and st.replay.left:
                self._finish(k, self._failed(st, f"the retry on a fresh worker decoded {n} frames, fewer "
                                                 f"than the {len(st.replay.times)} already delivered"))
            else:
                self._finish(k, DoneEvent(index, n, retries))
        else:
            stage, etype, text, retries = msg[2], msg[3], msg[4], msg[5]
            self._finish(k, FailedEvent(index, Failure(st.job.video_id, stage, etype, text), retries))

    def _finish(self, k: int, end: DoneEvent | FailedEvent, *, kill: bool = False) -> None:
        """Record the end of worker k's current job; a failed job's buffered chunks are dropped
        (the consumer discards a failed video). ``kill``: the worker is still decoding it."""
        w = self.workers[k]
        index = w.assigned.popleft()
        st = self._states[index]
        st.end = end
        if isinstance(end, FailedEvent):
            self._buffered -= st.nbytes
            st.chunks.clear()
            st.nbytes = 0
        if kill:
            self._replace(k)

    def _fault(self, k: int, fault: _Fault) -> None:
        """Worker k died or stalled: its current job is tried again from the start on a fresh
        worker (frames already received are checked, then dropped), or fails after
        ``retries`` faults; the fresh worker then takes k's other jobs."""
        w = self.workers[k]
        if not w.assigned:  # died between jobs
            self._replace(k)
            return
        st = self._states[w.assigned[0]]
        st.attempt.faults.append(fault)
        if len(st.attempt.faults) <= self.retries:
            st.replay, st.waited = st.attempt.replay(), 0.0
            self._replace(k)
        else:
            self._finish(k, self._failed(st), kill=True)

    def _replace(self, k: int) -> None:
        """Kill worker k, start a new one and give it k's unfinished jobs, in order."""
        old = self.workers[k]
        old.kill()
        new = self.workers[k] = self._spawn()
        new.assigned = old.assigned
        for index in new.assigned:
            new.jobs.put(self._states[index].job)

    def _stall(self, w: _Worker, waited: float) -> _Fault | None:
        """A stall, if the video has waited ``timeout_s`` in total (``waited`` seconds, start-up
        excluded) or the worker's start-up has taken over ``startup_s``."""
        if waited >= self.timeout_s:
            return _Fault("timeout", "TimeoutError",
                          f"timeout: decoding made the pipeline wait over {self.timeout_s:g} s",
                          "the worker was killed (raise --decode-timeout for very long videos)")
        if not w.ready and time.monotonic() - w.started > self.startup_s:
            return _Fault("timeout", "TimeoutError",
                          f"timeout: the decode worker did not start within {self.startup_s:g} s",
                          "it was killed; check that the machine is not swapping or stuck on a network "
                          "file system")
        return None

    def _failed(self, st: _JobState, mismatch: str | None = None) -> FailedEvent:
        """The failure of a video whose worker died or stalled on every try (``faults``, the
        last one gives the stage), or whose retry did not reproduce the frames already
        delivered (``mismatch``). The message starts with the reason, e.g. ``worker_died: SIGKILL``."""
        job, faults = st.job, st.attempt.faults
        first, last = faults[0], faults[-1]
        if mismatch is not None:
            return FailedEvent(job.index, Failure(job.video_id, last.stage, "RetryMismatch",
                                                  f"{last.reason}, then {mismatch}; {last.advice}"))
        tries = "" if len(faults) == 1 else f" on a fresh worker, after {first.reason} on the first try"
        return FailedEvent(job.index, Failure(job.video_id, last.stage, last.error_type,
                                              f"{last.reason}{tries}; {last.advice}"))
