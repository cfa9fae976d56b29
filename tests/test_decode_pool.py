"""extract/workers.py with several videos in flight: job order, exact frames, bounded buffer,
a failure in the middle of a shard (issue 12, deliverable 3). Real lossless PyAV videos."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from extract.decode import Geometry, decode_all
from extract.workers import ChunkEvent, DecodeJob, DecodePool, DoneEvent, FailedEvent
from tests.videos import make_lossless_video, make_non_video, make_truncated_video, pattern_frames

GEOM = Geometry(size=32, mode="squash")  # 32x32 sources: no resampling
KWARGS = dict(geometry=GEOM, fps=None, chunk_size=4, threads=1, min_frames=1)
CHUNK_BYTES = 4 * 32 * 32 * 3


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """8 lossless videos of 6 to 60 frames (long and short mixed, so workers finish out of order)."""
    folder = tmp_path_factory.mktemp("pool")
    lengths = [60, 6, 40, 10, 50, 8, 30, 12]
    return [make_lossless_video(folder / f"v{i}.mp4", pattern_frames(n, 32, 32, seed=i), 25)
            for i, n in enumerate(lengths)]


def _by_job(events: list) -> tuple[list[tuple[str, int]], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """(end events in order, job -> (frames, times)); checks that each job's events are contiguous."""
    ends, out, seen_done = [], {}, set()
    order = [e.index for e in events]
    for a, b in zip(order, order[1:]):
        assert b >= a, f"events of job {b} after job {a}: not in job order"
    for e in events:
        if isinstance(e, ChunkEvent):
            assert e.index not in seen_done
            f, t = out.get(e.index, (np.empty((0, 32, 32, 3), np.uint8), np.empty(0)))
            out[e.index] = (np.concatenate([f, e.frames]), np.concatenate([t, e.timestamps]))
        else:
            seen_done.add(e.index)
            ends.append((type(e).__name__, e.index))
    return ends, out


@pytest.mark.parametrize("workers", [1, 3])
def test_several_videos_in_flight_come_out_in_order_and_exact(clips: list[Path], workers: int) -> None:
    """With 3 workers the later videos are decoded while the first streams (the reorder buffer
    holds their chunks), yet every video comes out whole, in job order, frame for frame equal
    to a sequential decode in this process."""
    jobs = [DecodeJob(i, f"v{i}", str(p)) for i, p in enumerate(clips)]
    with DecodePool(workers, KWARGS, timeout_s=60.0) as pool:
        events = list(pool.run(jobs))
        peak = pool.peak_buffer_bytes
    ends, got = _by_job(events)
    assert ends == [("DoneEvent", i) for i in range(len(clips))]
    for i, p in enumerate(clips):
        want = decode_all(p, **KWARGS)
        np.testing.assert_array_equal(got[i][0], want.frames)
        np.testing.assert_array_equal(got[i][1], want.timestamps)
        done = next(e for e in events if isinstance(e, DoneEvent) and e.index == i)
        assert done.num_frames == len(want.frames) and done.retries == 0
    if workers > 1:  # later videos were decoded ahead and held: several in flight
        assert peak > 2 * CHUNK_BYTES


def test_the_reorder_buffer_is_bounded(clips: list[Path]) -> None:
    """A buffer of two chunks: the other workers block instead of piling frames up; the
    output is still exact. The bound is the budget plus one chunk per worker (a message
    read while the buffer was just under it)."""
    jobs = [DecodeJob(i, f"v{i}", str(p)) for i, p in enumerate(clips)]
    budget = 2 * CHUNK_BYTES
    with DecodePool(3, KWARGS, timeout_s=60.0, buffer_bytes=budget) as pool:
        events = list(pool.run(jobs))
        peak = pool.peak_buffer_bytes
    ends, got = _by_job(events)
    assert ends == [("DoneEvent", i) for i in range(len(clips))]
    for i, p in enumerate(clips):
        np.testing.assert_array_equal(got[i][0], decode_all(p, **KWARGS).frames)
    assert 0 < peak <= budget + 3 * CHUNK_BYTES


def test_a_failure_in_the_middle_is_quarantined_while_the_others_complete(clips: list[Path],
                                                                          tmp_path: Path) -> None:
    """A truncated file (fails after some chunks) and a non-video in the middle of the jobs:
    each ends as one FailedEvent with its stage, its partial chunks are not interleaved with
    other videos, and every other video is exact."""
    bad = {2: make_truncated_video(tmp_path / "cut.mp4"), 4: make_non_video(tmp_path / "text.mp4")}
    paths = [str(bad.get(i, p)) for i, p in enumerate(clips)]
    jobs = [DecodeJob(i, f"v{i}", p) for i, p in enumerate(paths)]
    with DecodePool(3, dict(KWARGS, geometry=Geometry(size=32)), timeout_s=60.0) as pool:
        events = list(pool.run(jobs))
    ends, got = _by_job(events)
    assert ends == [("FailedEvent" if i in bad else "DoneEvent", i) for i in range(len(clips))]
    stages = {e.index: e.failure.stage for e in events if isinstance(e, FailedEvent)}
    assert stages == {2: "decode", 4: "open"}
    fail = next(e for e in events if isinstance(e, FailedEvent) and e.index == 2).failure
    assert fail.video_id == "v2" and "corrupt" in fail.message
    for i, p in enumerate(paths):
        if i not in bad:
            np.testing.assert_array_equal(got[i][0], decode_all(p, **dict(KWARGS, geometry=Geometry(size=32))).frames)


def test_a_consumer_that_stops_early_leaves_a_usable_pool(clips: list[Path]) -> None:
    """Breaking out of a run (an encoder error) drops the queued work; the next run is exact."""
    jobs = [DecodeJob(i, f"v{i}", str(p)) for i, p in enumerate(clips)]
    with DecodePool(2, KWARGS, timeout_s=60.0) as pool:
        for ev in pool.run(jobs):
            if isinstance(ev, ChunkEvent):
                break
        events = list(pool.run(jobs[:3]))
    ends, got = _by_job(events)
    assert ends == [("DoneEvent", i) for i in range(3)]
    np.testing.assert_array_equal(got[1][0], decode_all(clips[1], **KWARGS).frames)
