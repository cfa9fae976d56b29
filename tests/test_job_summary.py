"""One job, one summary (issue 12): what the markers record about the job and its ranks
(:func:`pipeline.store.job_totals`), rank 0's wait for the other ranks without a process group
(:func:`pipeline.store.wait_for_shards`), and the other ranks staying quiet unless --verbose.
Real videos, real extraction, real zarr stores. (The launchers end to end: tests/test_extract.py,
torchrun and srun.)"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from extract.config import ExtractConfig
from extract.runner import run_extract
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.store import job_totals, read_markers, store_status, wait_for_shards
from pipeline.store.layout import file_lock, lock_path
from tests.videos import make_h264_video, make_non_video, pattern_frames

FLAGS = ["--random-weights", "--image-size", "64", "--videos-per-shard", "2", "--batch-size", "8",
         "--workers", "1", "--device", "cpu", "--no-progress"]


def invoke(args: list[str]) -> Result:
    from freezeframe.cli import app

    return CliRunner().invoke(app, args)


def extract(tmp: Path, rows: list[ManifestRow]) -> tuple[Path, Result]:
    manifest = write_manifest(rows, tmp / "manifest.jsonl")
    store = tmp / "store"
    return store, invoke(["extract", "--manifest", str(manifest), "--store", str(store), *FLAGS])


def test_job_totals_and_the_wait_for_other_ranks(tmp_path: Path) -> None:
    rows = [ManifestRow(f"v{i}", str(make_h264_video(tmp_path / f"v{i}.mp4", pattern_frames(10, 48, 64, seed=i),
                                                     10, gop=5))) for i in range(2)]
    rows.append(ManifestRow("text", str(make_non_video(tmp_path / "text.mp4"))))
    store, r = extract(tmp_path, rows)
    assert r.exit_code == 0, r.output
    markers = read_markers(store)
    (job,) = {m["stats"]["job"] for m in markers.values()}
    t = job_totals(store, job)
    assert t.shards == ["00000", "00001"] and t.shards_by_rank == {0: 2}
    assert (t.videos, t.frames, len(t.failures)) == (2, store_status(store).frames_stored, 1)
    assert t.failure_reasons == [("open: DecodeError", 1)] and t.frames_per_s > 0
    assert job_totals(store, "another job").shards == []
    # complete shards: no wait; a missing one nobody writes: given up after the idle time
    assert wait_for_shards(store, ["00000", "00001"], poll_s=0.01, idle_s=0.05) == []
    assert wait_for_shards(store, ["00000", "00002"], poll_s=0.01, idle_s=0.05) == ["00002"]
    # while a writer holds its lock the wait goes on (fake clock: 3 polls of 10 s, idle limit 15 s)
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s
        if now[0] >= 30:
            raise TimeoutError("still waiting")

    with file_lock(lock_path(store, "00002")) as held:
        assert held
        with pytest.raises(TimeoutError):
            wait_for_shards(store, ["00002"], poll_s=10, idle_s=15, clock=lambda: now[0], sleep=sleep)


@pytest.mark.parametrize("verbose", [False, True])
def test_other_ranks_are_quiet_unless_verbose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              verbose: bool) -> None:
    rows = [ManifestRow(f"v{i}", str(make_h264_video(tmp_path / f"v{i}.mp4", pattern_frames(8, 48, 64, seed=i),
                                                     10, gop=4))) for i in range(4)]
    manifest = write_manifest(rows, tmp_path / "m.jsonl")
    cfg = ExtractConfig(manifest=str(manifest), store=str(tmp_path / "store"), backbone="mobilenetv2-imagenet",
                        random_weights=True, image_size=64, videos_per_shard=2, batch_size=8, workers=1,
                        device="cpu", progress=True, verbose=verbose)
    # rank 1 of a 2-rank torchrun job, alone (no process group is needed to run a rank)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    buf = io.StringIO()
    s = run_extract(dataclasses.replace(cfg), Console(file=buf, width=200), job="job-a")
    assert s.shards_done >= 1 and s.rank.rank == 1 and s.job_shards == ["00000", "00001"]
    if verbose:
        assert "rank 1/2" in buf.getvalue() and "shard 00001:" in buf.getvalue()
    else:
        assert buf.getvalue() == ""  # errors only
    t = job_totals(cfg.store, "job-a")
    assert set(t.shards_by_rank) == {1} and sum(t.shards_by_rank.values()) == s.shards_done
    assert t.frames == sum(m["num_frames"] for m in read_markers(cfg.store).values())
    # rank 0 (of another job, on a fresh store): the job's bar and its shard lines
    monkeypatch.setenv("RANK", "0")
    buf = io.StringIO()
    s = run_extract(dataclasses.replace(cfg, store=str(tmp_path / "store0")), Console(file=buf, width=200),
                    job="job-b")
    assert s.shards_done >= 1
    assert "job of 2 ranks" in buf.getvalue() and "shard 00000:" in buf.getvalue()
    assert "rank 0/2" not in buf.getvalue()
    assert job_totals(tmp_path / "store0", "job-b").videos == s.videos_done
