"""The demo's Co-Settle section: per-video parts and paired bootstrap intervals of the
representation metrics, the section's measurement + report on a tiny store, and (slow, real
weights) the quick section end to end with ``--only cosettle``."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from extract.weights import mobilenet_checkpoint
from tests.stores import write_synthetic_store
from train.represent import RepresentationAccumulator
from train.represent_bootstrap import METRIC_KEYS, bootstrap_metrics, split_half_ranks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _videos(n: int, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(12 + (i % 3), 4, 4, 8, generator=g).cumsum(0) / 3 for i in range(n)]


def _acc(videos: list[torch.Tensor]) -> RepresentationAccumulator:
    acc = RepresentationAccumulator(keep_middle=True)
    for v in videos:
        acc.add(v)
    return acc


def test_per_video_parts_add_up_to_the_metrics() -> None:
    videos = _videos(10, 0)
    acc = _acc(videos)
    res, pv = acc.result(), acc.per_video()
    assert pv.sampled.shape == (10, 8, 8) and pv.middle.shape == (10, 16, 8)
    assert float(pv.d_intra.mean()) == pytest.approx(res.d_intra, rel=1e-12)
    assert float(pv.d_intra_normalized[95].mean()) == pytest.approx(res.d_intra_normalized[95], rel=1e-12)
    assert float(pv.cycle_accuracy.mean()) == pytest.approx(res.cycle_accuracy, rel=1e-12)  # 10 < 32: one batch
    # the bootstrap's statistic on the identity resample is the point estimate itself
    from train.represent_bootstrap import _Parts

    stats = _Parts(pv).stats(np.arange(10))
    point = res.to_json()
    for key in METRIC_KEYS:
        assert stats[key] == pytest.approx(point[key], rel=1e-6), key


def test_bootstrap_intervals_cover_the_estimate_and_pair_the_resamples() -> None:
    raw = _acc(_videos(24, 1))
    scaled = _acc([2 * v for v in _videos(24, 1)])  # every distance doubles, ratios and ranks do not change
    other = _acc(_videos(24, 2))
    ivs = bootstrap_metrics({"raw": raw.per_video(), "scaled": scaled.per_video(), "other": other.per_video()},
                            resamples=200, seed=0)
    point = raw.result().to_json()
    for key in METRIC_KEYS:
        iv = ivs["raw"][key]
        assert iv.low <= iv.high and iv.resamples == 200
        if key != "cycle_accuracy":  # the point estimate is a mean of batch means; the resamples use video means
            assert iv.low - 1e-9 <= point[key] <= iv.high + 1e-9, key
    # paired: the same resamples for every representation, so an exact transform gives a degenerate difference
    for key in ("ratio", "ratio_norm95", "cycle_accuracy"):
        d = ivs["scaled - raw"][key]
        assert abs(d.low) < 1e-9 and abs(d.high) < 1e-9, key
    halves = split_half_ranks(raw.per_video(), seed=1)
    assert halves == pytest.approx(split_half_ranks(scaled.per_video(), seed=1), rel=1e-9)
    assert halves[0] != halves[1] and all(0 < h <= 1 for h in halves)
    d = ivs["scaled - raw"]["d_intra"]
    assert d.low > 0  # doubled
    assert ivs["other - raw"]["d_intra"].high > ivs["other - raw"]["d_intra"].low  # independent videos: a spread
    with pytest.raises(ValueError, match="different numbers of videos"):
        bootstrap_metrics({"a": raw.per_video(), "b": _acc(_videos(5, 3)).per_video()}, resamples=5)


def test_section_measures_and_reports_raw_vs_projected_on_a_tiny_store(tmp_path: Path) -> None:
    """Train g (plain return view) on a tiny synthetic store, then the section's measurement
    (cached on rerun) and report: a table row per metric with intervals, a PNG, a claim."""
    from freezeframe.demo.cosettle import QUICK, ROWS, _measure, _report
    from freezeframe.demo.section import DemoContext
    from train.config import resolve_train_config
    from train.loop import fit

    store = write_synthetic_store(tmp_path / "s.zarr", splits={"train": 8, "test": 6}, lengths=(10, 12),
                                  grid=(4, 4), channels=16)
    run = tmp_path / "out" / "cosettle" / "runs" / "g"
    fit(resolve_train_config("cosettle", None, None, [
        f'data.store="{store.path}"', f'run_dir="{run}"', 'cosettle.return_view="plain"', "optim.epochs=2",
        "optim.batch_size=4", "data.workers=0", "seed=0"]), Console(quiet=True))
    ctx = DemoContext(out=tmp_path / "out", quick=True, console=Console(quiet=True))
    m = _measure(ctx, store.path, run, QUICK)
    assert m["videos"] == 6 and set(m["points"]) == {"raw", "projected"}
    for rep in ("raw", "projected", "projected - raw"):
        for key, _, _ in ROWS:
            if key == "effective_rank":  # split halves instead of an interval
                assert all(0 < h <= 1 for h in m["rank_halves"][rep.split(" ")[0]])
                continue
            iv = m["intervals"][rep][key]
            assert math.isfinite(iv["low"]) and iv["low"] <= iv["high"]
    assert len(m["per_video"]["projected"]["d_intra"]) == 6
    again = _measure(ctx, store.path, run, QUICK)  # cached: the same JSON, not recomputed
    assert again == json.loads((tmp_path / "out" / "cosettle" / "metrics.json").read_text())
    md, (claim, held) = _report(ctx, m, run, store.path, QUICK)
    for _, label, _ in ROWS:
        assert f"| {label} |" in md
    assert "A' = A" in md and "held-out test videos" in md and ("holds" in claim) == held
    assert (tmp_path / "out" / "cosettle" / "metrics.png").stat().st_size > 2000


@pytest.mark.slow
@pytest.mark.skipif(mobilenet_checkpoint() is None, reason="MobileNetV2 weights not cached: run `make weights`")
def test_quick_cosettle_section_runs_alone_and_exposes_its_projection(tmp_path: Path) -> None:
    """``--only cosettle --quick`` without the advise section: it extracts its own store, trains
    g, reports; ``projection_run`` returns a run that ``load_projection`` reads; a rerun is cheap."""
    from freezeframe.demo import run_demo
    from freezeframe.demo.cosettle import projection_run
    from freezeframe.demo.section import DemoContext
    from pipeline.store import open_store
    from train.project import load_projection

    out = tmp_path / "demo"
    report = run_demo(out, quick=True, only=["cosettle"])
    text = report.read_text()
    assert "Co-Settle" in text and "](cosettle/metrics.png)" in text and "A' = A" in text
    assert not (out / "advise").exists()  # it did not write into the advise section's folder
    store = open_store(out / "cosettle" / "stores" / "motion.zarr")
    assert store.content["backbone"] == "mobilenetv2-imagenet" and store.feature_shape == (4, 4, 1280)
    run = projection_run(DemoContext(out=out, quick=True, console=Console(quiet=True)))
    assert run == out / "cosettle" / "runs" / "projection-plain"
    g = load_projection(run)
    assert g.provenance["dim"] == 1280 and g.provenance["arch"] == "linear"
    mtime = (out / "cosettle" / "metrics.json").stat().st_mtime
    run_demo(out, quick=True, only=["cosettle"])
    assert (out / "cosettle" / "metrics.json").stat().st_mtime == mtime
