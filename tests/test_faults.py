"""Fault injection: nothing hangs, nothing is silently wrong (issue 14, stage-1 part).

Decode workers are killed (SIGKILL, SIGSEGV) or stopped (SIGSTOP) by pid from the test while
they send a chunk of a real H.264 video, halfway through the message (the pipe is full and
each chunk is larger than the pipe); a tiny VFR file with a 100,000 s timestamp gap and a
file whose header understates its duration are capped; ``plan`` meets a FIFO; a manifest
with wrongly typed values is refused with every problem listed.
"""
from __future__ import annotations

import fcntl
import os
import signal
import struct
import termios
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from extract.config import ExtractConfig
from extract.decode import DecodeError, Geometry, decode_all, frame_cap, iter_frames, probe
from extract.plan import make_plan
from extract.runner import run_extract
from extract.workers import ChunkEvent, DecodeJob, DecodePool, DoneEvent, FailedEvent
from pipeline.errors import ManifestError
from pipeline.manifest import ManifestRow, read_manifest, write_manifest
from pipeline.store import open_store, verify_store
from tests.videos import make_h264_video, make_vfr_video, pattern_frames

#: Upscaled output so that one chunk (16 x 224 x 224 x 3 = 2.4 MB) is larger than the pipe.
BIG = Geometry(size=224, mode="squash")
F_GETPIPE_SZ = 1032


@pytest.fixture(scope="module", autouse=True)
def no_core_files() -> None:
    """Workers killed with SIGSEGV inherit this: no core file is written."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("faults")
    return {
        "long": make_h264_video(folder / "long.mp4", pattern_frames(160, 48, 64, seed=1), 20, gop=12),
        "short": make_h264_video(folder / "short.mp4", pattern_frames(20, 48, 64, seed=2), 10, gop=6),
        # the probe: a few frames, then a 100,000 s timestamp gap (a few kB)
        "gap": make_vfr_video(folder / "gap.mp4", [0.0, 0.1, 100000.0, 100000.1], 32, 32),
    }


def pipe_bytes(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def wait_until_mid_message(pool: DecodePool, k: int = 0, timeout: float = 60.0) -> int:
    """Block until worker ``k``'s pipe is (nearly) full and stays so: its sender is then stuck
    halfway through a chunk message (each is larger than the pipe). Returns the worker's pid."""
    w = pool.workers[k]
    capacity = fcntl.fcntl(w.inbox.fd, F_GETPIPE_SZ)
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        n = pipe_bytes(w.inbox.fd)
        if n != last:
            last, since = n, time.monotonic()
        elif n > capacity // 2 and time.monotonic() - since > 0.3:
            return w.pid
        assert time.monotonic() < deadline, f"the worker never filled its pipe ({n} of {capacity} bytes)"
        time.sleep(0.01)


def collect(events: list, index: int) -> tuple[np.ndarray, np.ndarray]:
    chunks = [e for e in events if isinstance(e, ChunkEvent) and e.index == index]
    return np.concatenate([c.frames for c in chunks]), np.concatenate([c.timestamps for c in chunks])


# ------------------------------------------------------------------------------ worker faults
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=lambda s: s.name)
def test_worker_killed_mid_message_is_retried_and_the_video_is_exact(videos: dict[str, Path],
                                                                     sig: signal.Signals) -> None:
    """The worker dies (or freezes) with a chunk half written into its pipe, after the consumer
    already got two chunks. The main process sees it (end-of-file, or the timeout for SIGSTOP),
    redoes the video on a fresh worker, drops the frames it already delivered, and the video
    comes out exactly as an uninterrupted decode; the next video follows on the new worker."""
    kwargs = dict(geometry=BIG, fps=None, chunk_size=16, threads=1, min_frames=1)
    jobs = [DecodeJob(0, "long", str(videos["long"])), DecodeJob(1, "short", str(videos["short"]))]
    events: list = []
    victim = None
    t0 = time.monotonic()
    with DecodePool(1, kwargs, timeout_s=3.0) as pool:
        for ev in pool.run(jobs):
            events.append(ev)
            if victim is None and sum(isinstance(e, ChunkEvent) for e in events) == 2:
                victim = wait_until_mid_message(pool)
                os.kill(victim, sig)
        assert victim is not None and pool.workers[0].pid != victim  # replaced
    ends = [(type(e).__name__, e.index) for e in events if not isinstance(e, ChunkEvent)]
    assert ends == [("DoneEvent", 0), ("DoneEvent", 1)]
    for i, name in enumerate(("long", "short")):
        frames, times = collect(events, i)
        want = decode_all(videos[name], **kwargs)
        np.testing.assert_array_equal(times, want.timestamps)
        np.testing.assert_array_equal(frames, want.frames)
        assert next(e for e in events if isinstance(e, DoneEvent) and e.index == i).num_frames == len(frames)
    assert time.monotonic() - t0 < 40


def test_a_worker_stuck_in_its_start_up_is_replaced(videos: dict[str, Path]) -> None:
    """Start-up (imports) is not charged to the video, but is bounded by ``startup_s``.

    The test controls both sides, so machine load cannot decide the outcome: the first worker
    is stopped (SIGSTOP) before it can say it is ready, and its start-up clock is set back by
    ``startup_s`` (as if it had been starting for that long); the limit itself is generous, so
    the fresh worker, which really imports torch, is never replaced however loaded the machine
    is. ``timeout_s`` is far larger still: a replacement within ``startup_s`` can only come from
    the start-up check, not from the decode timeout."""
    kwargs = dict(geometry=Geometry(size=32), fps=None, chunk_size=8, threads=1, min_frames=1)
    startup_s, timeout_s = 120.0, 600.0
    with DecodePool(1, kwargs, timeout_s=timeout_s, startup_s=startup_s) as pool:
        first = pool.workers[0]
        stuck = first.pid
        os.kill(stuck, signal.SIGSTOP)
        assert not first.inbox.conn.poll(0), "the worker said it was ready before it was stopped"
        first.started -= startup_s  # its start-up has now taken startup_s, and it is stuck
        t0 = time.monotonic()
        events = list(pool.run([DecodeJob(0, "short", str(videos["short"]))]))
        elapsed = time.monotonic() - t0
        assert pool.workers[0].pid != stuck and pool.workers[0].ready
    assert elapsed < startup_s < timeout_s  # replaced by the start-up check; the fresh worker was not
    assert isinstance(events[-1], DoneEvent)
    np.testing.assert_array_equal(collect(events, 0)[0], decode_all(videos["short"], **kwargs).frames)


def test_a_video_whose_worker_dies_twice_is_quarantined_with_the_signal(videos: dict[str, Path]) -> None:
    """Killed on the first try (SIGKILL, as the out-of-memory killer does) and again on the
    fresh worker (SIGSEGV, as a crashing decoder does): the video fails at stage
    ``worker_died`` naming both signals, and the run goes on with the next video."""
    kwargs = dict(geometry=BIG, fps=None, chunk_size=16, threads=1, min_frames=1)
    jobs = [DecodeJob(0, "long", str(videos["long"])), DecodeJob(1, "short", str(videos["short"]))]
    events: list = []
    killed: list[int] = []
    with DecodePool(1, kwargs, timeout_s=30.0) as pool:
        for ev in pool.run(jobs):
            events.append(ev)
            # after the 2nd chunk of the first try, then after the 1st new chunk of the retry
            if isinstance(ev, ChunkEvent) and ev.index == 0 and pool.workers[0].pid not in killed:
                if killed or sum(isinstance(e, ChunkEvent) for e in events) == 2:
                    killed.append(wait_until_mid_message(pool))
                    os.kill(killed[-1], signal.SIGSEGV if killed[:-1] else signal.SIGKILL)
    assert len(killed) == 2 and killed[0] != killed[1]
    failed = [e for e in events if isinstance(e, FailedEvent)]
    assert [e.index for e in failed] == [0]
    f = failed[0].failure
    assert (f.video_id, f.stage, f.error_type) == ("long", "worker_died", "WorkerDied")
    assert f.message.startswith("worker_died: SIGSEGV on a fresh worker, after worker_died: SIGKILL on the first try")
    assert "out-of-memory" in f.message and "--retry-failed" in f.message  # what to do
    assert isinstance(events[-1], DoneEvent) and events[-1].index == 1
    np.testing.assert_array_equal(collect(events, 1)[0], decode_all(videos["short"], geometry=BIG).frames)


def test_a_retry_that_decodes_other_frames_fails_the_video(videos: dict[str, Path], tmp_path: Path) -> None:
    """The frames already delivered are checked, not trusted: if the file changed between the
    try and the retry, the video fails (``RetryMismatch``) instead of mixing two videos."""
    path = tmp_path / "changing.mp4"
    path.write_bytes(videos["long"].read_bytes())
    other = make_h264_video(tmp_path / "other.mp4", pattern_frames(160, 48, 64, seed=9), 20, gop=12)
    kwargs = dict(geometry=BIG, fps=None, chunk_size=16, threads=1, min_frames=1)
    events: list = []
    with DecodePool(1, kwargs, timeout_s=30.0) as pool:
        for ev in pool.run([DecodeJob(0, "changing", str(path)), DecodeJob(1, "short", str(videos["short"]))]):
            events.append(ev)
            if sum(isinstance(e, ChunkEvent) for e in events) == 2 and len(events) == 2:
                pid = wait_until_mid_message(pool)
                os.replace(other, path)
                os.kill(pid, signal.SIGKILL)
    (failed,) = [e for e in events if isinstance(e, FailedEvent)]
    f = failed.failure
    assert (failed.index, f.stage, f.error_type) == (0, "worker_died", "RetryMismatch")
    # same timestamps, other pixels: caught by the CRC of the very first frame re-decoded
    assert f.message.startswith("worker_died: SIGKILL, then the retry on a fresh worker decoded other frames: "
                                "frame 0 differs from the first attempt's (time 0.000000 s vs 0.000000 s, "
                                "pixels differ)")
    assert isinstance(events[-1], DoneEvent) and events[-1].index == 1


def _decoding(path: Path) -> list[int]:
    """Pids of this process's children that have ``path`` open (they are decoding it)."""
    kids: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            kids |= {int(x) for x in (task / "children").read_text().split()}
        except OSError:
            continue
    out = []
    for pid in kids:
        try:
            if any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir()):
                out.append(pid)
        except OSError:  # exited meanwhile
            continue
    return out


def test_extraction_goes_on_after_a_worker_sigkill_and_caps_the_vfr_gap(videos: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """End to end: the decode worker is SIGKILLed while it decodes a long video (found by the
    file it has open; at 40 fps its 3.9 MB of frames cannot all wait in the pipe, so it is
    still decoding), the VFR-gap probe is quarantined at once, and the extraction finishes:
    the killed video is stored whole, with the timestamps of an uninterrupted decode."""
    rows = [ManifestRow("long", str(videos["long"]), label=0), ManifestRow("gap", str(videos["gap"]), label=1),
            ManifestRow("short", str(videos["short"]), label=0)]
    manifest = write_manifest(rows, tmp_path / "manifest.jsonl")
    cfg = ExtractConfig(manifest=str(manifest), store=str(tmp_path / "store"), backbone="mobilenetv2-imagenet",
                        random_weights=True, image_size=64, dtype="float32", fps=40, videos_per_shard=3,
                        batch_size=8, chunk_size=4, workers=1, decode_timeout=30.0, device="cpu",
                        progress=False)
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:  # SIGKILL the first worker seen decoding the long video for 0.2 s
        seen: dict[int, float] = {}
        while not stop.is_set() and not killed:
            for pid in _decoding(videos["long"].resolve()):
                if time.monotonic() - seen.setdefault(pid, time.monotonic()) > 0.2:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    break
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    t0 = time.monotonic()
    try:
        summary = run_extract(cfg)
    finally:
        stop.set()
        thread.join()
    assert time.monotonic() - t0 < 60
    assert len(killed) == 1, "the worker was never seen decoding the long video"
    assert [(f.video_id, f.stage) for f in summary.failures] == [("gap", "too_long")]
    assert "100000" in summary.failures[0].message or "99999" in summary.failures[0].message
    store = open_store(cfg.store)
    assert store.video_ids == ["long", "short"]
    for vid in ("long", "short"):
        want = decode_all(videos[vid], geometry=Geometry(size=64), fps=40)
        np.testing.assert_array_equal(store.timestamps(vid), want.timestamps)
        assert store.features(vid).shape[0] == len(want.frames)
    assert verify_store(cfg.store) == []


# ------------------------------------------------------------------------------ unbounded work
def test_vfr_gap_file_is_refused_before_any_repeat(videos: dict[str, Path]) -> None:
    """The issue's probe: at 8 fps the 100,000 s gap would repeat one frame 800,000 times."""
    t0 = time.monotonic()
    out: list = []
    with pytest.raises(DecodeError) as info:
        for chunk in iter_frames(videos["gap"], geometry=Geometry(size=32), fps=8, chunk_size=4, max_gap=60.0):
            out.append(chunk)
    assert time.monotonic() - t0 < 5
    e = info.value
    assert e.stage == "too_long" and "max_gap=60 s" in e.reason and "799,999 times" in e.reason
    assert sum(len(c) for c in out) <= 4  # the frames before the gap, never its repeats
    # a gap within max_gap is filled as before (ffmpeg's fps rule)
    ok = decode_all(videos["gap"], geometry=Geometry(size=32), fps=8, end=50.0, max_gap=60.0)
    assert len(ok.frames) == 400


def test_timestamps_past_the_header_duration_hit_the_frame_cap(tmp_path: Path) -> None:
    """An MP4 whose header says 2.5 s while its frames run for 10 s: at a set fps the stored
    frames are capped at ``frame_cap`` of the header's duration, with the reason."""
    path = make_h264_video(tmp_path / "lying.mp4", pattern_frames(100, 48, 64), 10, gop=10)
    data = bytearray(path.read_bytes())
    for box, off in ((b"mvhd", 20), (b"mdhd", 20), (b"tkhd", 24)):  # version-0 duration fields
        i = data.find(box) + off
        (d,) = struct.unpack(">I", data[i:i + 4])
        data[i:i + 4] = struct.pack(">I", d // 4)
    path.write_bytes(data)
    duration = probe(path).duration
    assert duration is not None and 2.4 < duration < 2.6
    assert len(decode_all(path, geometry=Geometry(size=32)).frames) == 100  # native rate: no cap
    cap = frame_cap(duration, 10.0)
    assert cap == int(np.ceil(10.0 * (1.25 * duration + 1.0)))
    with pytest.raises(DecodeError) as info:
        decode_all(path, geometry=Geometry(size=32), fps=10)
    assert info.value.stage == "too_long" and f"more than {cap} frames" in info.value.reason
    assert frame_cap(None, 8.0) is None and frame_cap(None, 8.0, start=1.0, end=3.0) == 28  # 8 * (1.25 * 2 + 1)


# ------------------------------------------------------------------------------ plan, manifest
def test_plan_reports_a_fifo_instead_of_blocking_on_it(videos: dict[str, Path], tmp_path: Path) -> None:
    fifo = tmp_path / "stream.mp4"
    os.mkfifo(fifo)
    rows = [ManifestRow("fifo", str(fifo)), ManifestRow("short", str(videos["short"])),
            ManifestRow("dir", str(tmp_path))]
    result: list = []
    thread = threading.Thread(target=lambda: result.append(make_plan(rows, ExtractConfig(fps=10), (2, 2, 8))),
                              daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():  # unblock the probe so the test process can exit, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("plan blocked on the FIFO")
    plan = result[0]
    assert [v for v, _ in plan.unreadable] == ["fifo", "dir"]
    assert "a FIFO, not a regular file" in plan.unreadable[0][1]
    assert "a directory" in plan.unreadable[1][1]
    assert plan.frames == probe(videos["short"]).estimate_frames(fps=10) == 20


def test_manifest_type_errors_are_listed_together(tmp_path: Path) -> None:
    lines = [
        '{"video_id": "a", "path": "/v/a.mp4", "label": 1.7}',
        '{"video_id": "b", "path": "/v/b.mp4", "label": true, "split": ["train"]}',
        '{"video_id": null, "path": "", "start": 5, "end": 2}',
        '{"video_id": "d", "path": "/v/d.mp4", "start": Infinity, "label_name": 3}',
        '{"video_id": "ok", "path": "/v/ok.mp4", "label": 2, "start": 0, "end": 2.5}',
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert info.value.problems == [
        "line 1: label: expected int or none, got 1.7",
        "line 2: split: expected a string, got ['train']",
        "line 2: label: expected int or none, got True",
        "line 3: video_id: expected a string, got None",
        "line 3: path: expected a non-empty string, got ''",
        "line 3: start 5.0 s must be before end 2.0 s",
        "line 4: label_name: expected str or none, got 3",
        "line 4: start: expected a finite number of seconds, got inf",
    ]
    # the valid line parses with its types (int seconds become float)
    path.write_text(lines[-1] + "\n")
    (row,) = read_manifest(path)
    assert row == ManifestRow("ok", "/v/ok.mp4", label=2, start=0.0, end=2.5)
    assert isinstance(row.start, float) and isinstance(row.label, int)
    with pytest.raises(ManifestError, match="video_id: missing"):
        ManifestRow.from_dict({"path": "/v/x.mp4"})
