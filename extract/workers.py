"""Killable decode workers that run ahead of the model.

Videos are dealt round-robin to ``num_workers`` worker processes (spawned, so they share no
threads or CUDA state with the main process). Each worker decodes its videos in order and
hands frame chunks to a sender thread through a *bounded* queue, so decoding runs ahead of
the model by at most ``queue_chunks`` chunks per worker (memory stays bounded whatever a
video's length) while the main process consumes video i from one worker and the next videos
are being decoded by the others.

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
import queue
import select
import signal
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
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
_HEADER = 8  # bytes of the little-endian length that precedes each pickled message
_PIPE_BYTES = 1 << 20  # pipe buffer asked for (Linux F_SETPIPE_SZ): fewer wake-ups per chunk
_F_SETPIPE_SZ = 1031


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when the thread that started it (the pool's
    owner) dies, even while a native decoder hangs; the polling in :func:`_worker_main`
    covers the other systems."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Sender:
    """Worker side of the pipe: a thread writes queued messages, length-prefixed.

    ``put`` blocks while ``maxsize`` messages wait (the run-ahead bound). If the main process
    is gone the write fails (broken pipe) and the worker exits at once.
    """

    def __init__(self, fd: int, maxsize: int, orphaned: Any) -> None:
        self.fd, self.orphaned = fd, orphaned
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        threading.Thread(target=self._run, name="ff-decode-sender", daemon=True).start()

    def put(self, msg: tuple) -> None:
        while True:
            try:
                self.queue.put(msg, timeout=_POLL_S)
                return
            except queue.Full:
                if self.orphaned():
                    raise SystemExit(0) from None

    def _run(self) -> None:
        try:
            while True:
                data = pickle.dumps(self.queue.get(), protocol=pickle.HIGHEST_PROTOCOL)
                self._write(len(data).to_bytes(_HEADER, "little"))
                self._write(data)
                self.queue.task_done()
        except OSError:  # broken pipe: the main process is gone or gave up on this worker
            os._exit(0)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]


def _frame_crcs(frames: np.ndarray) -> np.ndarray:
    """CRC-32 of each frame's pixels: ``(n, S, S, 3)`` uint8 -> ``(n,)`` uint32."""
    return np.fromiter((zlib.crc32(np.ascontiguousarray(f)) for f in frames), dtype=np.uint32,
                       count=len(frames))


def _worker_main(jobs: Any, conn: Any, decode_kwargs: dict, queue_chunks: int) -> None:
    """Worker loop: decode each job and send ("chunk" | "done" | "failed") messages.

    Exits when it gets ``None`` or when the main process is gone (killed with SIGKILL, a
    worker blocked on its queues would otherwise live on as an orphan).
    """
    from extract.decode import DecodeError, iter_frames

    _die_with_parent()
    parent = mp.parent_process()

    def orphaned() -> bool:
        return parent is not None and not parent.is_alive()

    out = _Sender(conn.fileno(), queue_chunks, orphaned)
    out.put(("ready", -1, os.getpid()))  # imports done: from now on waiting counts against the timeout
    while True:
        try:
            job = jobs.get(timeout=_POLL_S)
        except queue.Empty:
            if orphaned():
                return
            continue
        if job is None:
            break
        n = 0
        try:
            for chunk in iter_frames(job.path, start=job.start, end=job.end, **decode_kwargs):
                out.put(("chunk", job.index, chunk.frames, chunk.timestamps, _frame_crcs(chunk.frames)))
                n += len(chunk.frames)
            out.put(("done", job.index, n))
        except DecodeError as e:
            out.put(("failed", job.index, e.stage, type(e).__name__, str(e)))
        except Exception as e:  # noqa: BLE001 - any decoder error is data about this video
            msg = f"{e} | {traceback.format_exc(limit=3).strip().splitlines()[-1]}"
            out.put(("failed", job.index, "decode", type(e).__name__, msg))
    out.queue.join()  # every message written before the process exits


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
    def __init__(self, ctx: Any, decode_kwargs: dict, queue_chunks: int) -> None:
        self.jobs = ctx.Queue()
        reader, writer = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_worker_main, args=(self.jobs, writer, decode_kwargs, queue_chunks),
                                daemon=True, name="ff-decode")
        self.proc.start()
        writer.close()  # the worker now holds the only write end: its death is an end-of-file here
        self.inbox = _Inbox(reader)
        self.videos_done = 0
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


class DecodePool:
    """A pool of decode workers; :meth:`run` yields events for jobs in job order.

    Args:
        num_workers: worker processes (>= 1).
        decode_kwargs: keyword arguments of ``extract.decode.iter_frames`` (geometry, fps,
            chunk_size, threads, min_frames, max_gap).
        timeout_s: total seconds a video may keep the consumer waiting (see module doc).
        startup_s: seconds a new worker may take to start (imports) before it is replaced.
        queue_chunks: chunks each worker may decode ahead.
        recycle_after: replace a worker after this many videos (caps slow leaks in native
            decoders, like ``maxtasksperchild``).
        retries: times a video is decoded again on a fresh worker after its worker died or
            stalled, before it is recorded as a failure.
    """

    def __init__(
        self,
        num_workers: int,
        decode_kwargs: dict,
        *,
        timeout_s: float = 120.0,
        startup_s: float = 300.0,
        queue_chunks: int = 4,
        recycle_after: int = 500,
        retries: int = 1,
    ) -> None:
        self.ctx = mp.get_context("spawn")
        self.decode_kwargs = decode_kwargs
        self.timeout_s = timeout_s
        self.startup_s = startup_s
        self.queue_chunks = queue_chunks
        self.recycle_after = recycle_after
        self.retries = retries
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
        attempt = _Attempt()
        replay: _Replay | None = None
        waited = 0.0
        while True:
            w = self.workers[k]
            t0 = time.monotonic()
            fault: _Fault | None = None
            try:
                msg = w.inbox.recv(timeout=min(1.0, max(self.timeout_s - waited, 0.01)))
            except EOFError:
                msg = None
                sig = w.death()
                fault = _Fault("worker_died", "WorkerDied", f"worker_died: {sig}", _DEATH_ADVICE)
            if w.ready:
                waited += time.monotonic() - t0
            if msg is None and fault is None:
                fault = self._stall(w, waited)
            if fault is not None:
                attempt.faults.append(fault)
                if len(attempt.faults) <= self.retries:  # again from the start on a fresh worker
                    self._replace(k, jobs, first=job.index)
                    replay, waited = attempt.replay(), 0.0
                    continue
                self._replace(k, jobs, first=job.index + 1)
                yield self._failed(job, attempt)
                return
            if msg is None:
                continue
            kind, index = msg[0], msg[1]
            if kind == "ready":
                w.ready = True
                continue
            if index != job.index:  # cannot happen: each worker serves its jobs in order
                raise RuntimeError(f"decode worker sent job {index}, expected {job.index}")
            if kind == "chunk":
                frames, times, crcs = msg[2], msg[3], msg[4]
                if replay is not None and replay.left:
                    drop, mismatch = replay.consume(times, crcs)
                    if mismatch is not None:
                        self._replace(k, jobs, first=job.index + 1)
                        yield self._failed(job, attempt, f"the retry on a fresh worker decoded other frames: "
                                                         f"{mismatch}")
                        return
                    frames, times, crcs = frames[drop:], times[drop:], crcs[drop:]
                    if not len(times):
                        continue
                attempt.delivered(times, crcs)
                yield ChunkEvent(index, frames, times)
            elif kind == "done":
                w.videos_done += 1
                if replay is not None and replay.left:
                    yield self._failed(job, attempt, f"the retry on a fresh worker decoded {msg[2]} frames, "
                                                     f"fewer than the {len(replay.times)} already delivered")
                    return
                yield DoneEvent(index, msg[2])
                return
            else:
                w.videos_done += 1
                yield FailedEvent(index, Failure(job.video_id, msg[2], msg[3], msg[4]))
                return

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

    def _failed(self, job: DecodeJob, attempt: _Attempt, mismatch: str | None = None) -> FailedEvent:
        """The failure of a video whose worker died or stalled on every try (``attempt.faults``,
        the last one gives the stage), or whose retry did not reproduce the frames already
        delivered (``mismatch``). The message starts with the reason, e.g. ``worker_died: SIGKILL``."""
        first, last = attempt.faults[0], attempt.faults[-1]
        if mismatch is not None:
            return FailedEvent(job.index, Failure(job.video_id, last.stage, "RetryMismatch",
                                                  f"{last.reason}, then {mismatch}; {last.advice}"))
        tries = "" if len(attempt.faults) == 1 else \
            f" on a fresh worker, after {first.reason} on the first try"
        return FailedEvent(job.index, Failure(job.video_id, last.stage, last.error_type,
                                              f"{last.reason}{tries}; {last.advice}"))

    def _replace(self, k: int, jobs: Sequence[DecodeJob], *, first: int) -> None:
        """Kill worker k, start a new one and give it k's jobs from index ``first`` on."""
        self.workers[k].kill()
        self.workers[k] = self._spawn()
        nw = len(self.workers)
        for later in jobs:
            if later.index >= first and later.index % nw == k:
                self.workers[k].jobs.put(later)
