"""A store that failed is not ok (issue 12): ``extract`` exits 1 when every video of the run
failed, naming the most common reason; ``status`` and ``verify`` report the failure count,
rate and reasons and exit 1 above ``--max-failure-rate`` (default 0: any failure). Real
truncated / non-video files (tests/videos.py), real extraction into a real zarr store."""
from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner, Result

from pipeline.manifest import ManifestRow, write_manifest
from pipeline.store import check_store, failure_verdict, store_status
from tests.videos import make_h264_video, make_non_video, make_truncated_video, pattern_frames

FLAGS = ["--random-weights", "--image-size", "64", "--videos-per-shard", "2", "--batch-size", "8",
         "--workers", "1", "--device", "cpu", "--no-progress"]


def invoke(args: list[str]) -> Result:
    from freezeframe.cli import app

    return CliRunner().invoke(app, args)


def flat(text: str) -> str:
    return " ".join(re.sub(r"[│┃]", " ", text).split())


def extract(tmp: Path, rows: list[ManifestRow]) -> tuple[Path, Result]:
    manifest = write_manifest(rows, tmp / "manifest.jsonl")
    store = tmp / "store"
    return store, invoke(["extract", "--manifest", str(manifest), "--store", str(store), *FLAGS])


def test_a_run_where_every_video_failed_exits_1_with_the_most_common_reason(tmp_path: Path) -> None:
    rows = [ManifestRow(f"cut{i}", str(make_truncated_video(tmp_path / f"cut{i}.mp4"))) for i in range(3)]
    rows.append(ManifestRow("text", str(make_non_video(tmp_path / "text.mp4"))))
    store, r = extract(tmp_path, rows)
    assert r.exit_code == 1, r.output
    out = flat(r.stdout)
    m = re.search(r"error: all 4 videos failed: 3 x decode: (\w+)", out)
    assert m, out
    assert "4 failed video(s)" in out and "--retry-failed" in out  # the failure table still printed
    st = store_status(store)
    assert (st.videos_stored, st.failures, st.failure_rate) == (0, 4, 1.0)
    assert st.failure_reasons == [(f"decode: {m.group(1)}", 3), ("open: DecodeError", 1)]
    # the store is complete and consistent, but not ok, whatever failure rate is allowed
    for cmd in ("verify", "status"):
        for allow in ("0", "1"):
            r = invoke([cmd, str(store), "--max-failure-rate", allow])
            assert r.exit_code == 1, (cmd, allow, r.output)
            assert f"all 4 videos failed: 3 x decode: {m.group(1)}" in flat(r.stdout)
            assert "failed 4 of 4 videos (100.0%)" in flat(r.stdout)
    rep = check_store(store)
    assert rep.problems == [] and rep.failure_verdict(1.0) is not None


def test_threshold_on_a_store_with_some_failures(tmp_path: Path) -> None:
    good = [ManifestRow(f"v{i}", str(make_h264_video(tmp_path / f"v{i}.mp4", pattern_frames(12, 48, 64, seed=i),
                                                     10, gop=5))) for i in range(3)]
    rows = [good[0], ManifestRow("cut", str(make_truncated_video(tmp_path / "cut.mp4"))), good[1], good[2]]
    store, r = extract(tmp_path, rows)
    assert r.exit_code == 0, r.output  # some videos were stored: the run itself is not a failure
    assert "failed: decode:" in flat(r.stdout)  # the summary says why
    for cmd in ("verify", "status"):
        r = invoke([cmd, str(store)])
        assert r.exit_code == 1, r.output
        assert "1 of 4 videos failed (25.0% > 0% allowed); most common: 1 x decode:" in flat(r.stdout)
        assert invoke([cmd, str(store), "--max-failure-rate", "0.2"]).exit_code == 1
        r = invoke([cmd, str(store), "--max-failure-rate", "0.25"])
        assert r.exit_code == 0 and "failed 1 of 4 videos (25.0%)" in flat(r.stdout), r.output
    # the verdict itself
    assert failure_verdict(0, 5, [], 0.0) is None
    assert failure_verdict(1, 3, [("decode: X", 1)], 0.25) is None
    assert failure_verdict(1, 3, [("decode: X", 1)], 0.2).startswith("1 of 4 videos failed (25.0% > 20% allowed)")
    assert failure_verdict(2, 0, [("open: Y", 2)], 1.0).startswith("all 2 videos failed: 2 x open: Y")
