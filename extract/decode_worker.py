"""The decode worker process: decode jobs with a decoder, send chunks through a pipe.

Only this module (and the decoder's) is imported by a spawned worker before it says it is
ready, so that a worker starts fast (no zarr, no store code); the main-process side is
:mod:`extract.workers`. Message format: 8-byte little-endian length + pickled tuple:
``("ready", -1, pid)``, ``("chunk", job, frames, timestamps, crcs)``,
``("done", job, num_frames, retries)``, ``("failed", job, stage, error_type, message, retries)``.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
import traceback
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DecodeJob:
    """What a worker needs to decode one video (picklable)."""

    index: int  # position in the current batch of jobs
    video_id: str
    path: str
    start: float | None = None  # seconds
    end: float | None = None  # seconds
    # this video's ``extract.decode.Geometry`` instead of the pool's (test videos with spatial
    # test crops are decoded as whole short-side-scaled frames: ``short_side``); None: the pool's
    geometry: Any = None


_POLL_S = 1.0  # how often a waiting worker checks that the main process is still alive
_HEADER = 8  # bytes of the little-endian length that precedes each pickled message


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


def _worker_main(jobs: Any, conn: Any, decoder: Any, decode_kwargs: dict, queue_chunks: int) -> None:
    """Worker loop: decode each job with ``decoder`` and send ("chunk" | "done" | "failed")
    messages; "done" and "failed" carry the transient-error retries the video needed.

    Exits when it gets ``None`` or when the main process is gone (killed with SIGKILL, a
    worker blocked on its queues would otherwise live on as an orphan).
    """
    from extract.decode import DecodeError
    from extract.inputs import take_retries

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
        take_retries()
        try:
            kwargs = decode_kwargs if job.geometry is None else {**decode_kwargs, "geometry": job.geometry}
            for chunk in decoder.iter_frames(job.path, start=job.start, end=job.end, **kwargs):
                out.put(("chunk", job.index, chunk.frames, chunk.timestamps, _frame_crcs(chunk.frames)))
                n += len(chunk.frames)
            out.put(("done", job.index, n, take_retries()))
        except DecodeError as e:
            out.put(("failed", job.index, e.stage, type(e).__name__, str(e), take_retries()))
        except Exception as e:  # noqa: BLE001 - any decoder error is data about this video
            msg = f"{e} | {traceback.format_exc(limit=3).strip().splitlines()[-1]}"
            out.put(("failed", job.index, "decode", type(e).__name__, msg, take_retries()))
    out.queue.join()  # every message written before the process exits
