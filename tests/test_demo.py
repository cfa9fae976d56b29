"""`make demo` end to end, in its quick form (real weights, tiny benchmark, 2 epochs)."""
from __future__ import annotations

from pathlib import Path

import pytest

from extract.weights import mobilenet_checkpoint

pytestmark = pytest.mark.slow


@pytest.mark.skipif(mobilenet_checkpoint() is None, reason="MobileNetV2 weights not cached: run `make weights`")
def test_quick_demo_runs_every_stage_and_writes_the_report(tmp_path: Path) -> None:
    from freezeframe.demo import QUICK, run_demo
    from pipeline.store import open_store, verify_store

    report = run_demo(tmp_path / "demo", quick=True)
    text = report.read_text()
    for task in ("motion", "appearance"):
        store = tmp_path / "demo" / "stores" / f"{task}.zarr"
        assert verify_store(store) == []
        s = open_store(store)
        assert s.attrs["content"]["backbone"] == "mobilenetv2-imagenet"
        assert s.attrs["content"]["weights_sha256"]  # the real checkpoint, not random weights
        assert len(s) == 4 * (QUICK.synth.train_per_class + QUICK.synth.test_per_class)
        assert (tmp_path / "demo" / f"comparison-{task}.png").stat().st_size > 2000
        for run in QUICK.runs:
            assert (tmp_path / "demo" / "runs" / task / run.name / "summary.json").exists()
    for run in QUICK.runs:
        if run.task == "finetune":
            assert f"| {run.name} |" in text
    assert "chance" in text
    # rerunning is cheap: every step is found complete
    assert run_demo(tmp_path / "demo", quick=True) == report
