"""The demo's long-form section in its quick form (real weights, tiny benchmark, 1-2 epochs)."""
from __future__ import annotations

from pathlib import Path

import pytest

from extract.weights import mobilenet_checkpoint


@pytest.mark.slow
@pytest.mark.skipif(mobilenet_checkpoint() is None, reason="MobileNetV2 weights not cached: run `make weights`")
def test_quick_longform_section_runs_every_stage_and_reports(tmp_path: Path) -> None:
    from freezeframe.demo import run_demo
    from freezeframe.demo.longform import QUICK
    from pipeline.store import open_store, verify_store

    report = run_demo(tmp_path / "demo", quick=True, only=["longform"])
    text = report.read_text()
    lf = tmp_path / "demo" / "longform"
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["longform", "report.md"]  # writes only there
    pre, ft = open_store(lf / "stores" / "longform.zarr"), open_store(lf / "stores" / "actions.zarr")
    for s in (pre, ft):
        assert verify_store(s.path) == []
        assert s.attrs["content"]["weights_sha256"]  # the real checkpoint, not random weights
    assert len(pre) == QUICK.bench.pretrain_videos and set(ft.splits()) == {"train", "test"}
    n_test = len(ft.split_ids("test"))
    assert (lf / "runs" / "top1.png").read_bytes()[:4] == b"\x89PNG"
    rows = [line for line in text.splitlines() if line.startswith("| ") and "Wilson" not in line]
    assert len(rows) == 1 + len(QUICK.arms)  # scratch + one row per arm
    assert all(f" | {n_test} | " in line for line in rows)  # every number with its sample size
    assert rows[0].startswith("| none (scratch)") and "McNemar" in text and "Wilson 95 %" in text
    assert "](longform/runs/top1.png)" in text and "- longform:" in text and "What it shows" in text
    # rerunning is cheap: every run is found complete (no summary rewritten)
    stamps = {p: p.stat().st_mtime_ns for p in lf.glob("runs/*/*/summary.json")}
    assert len(stamps) == 2 * len(QUICK.arms) + 1
    assert run_demo(tmp_path / "demo", quick=True, only=["longform"]) == report
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
