"""Smoke test of ``bench.train`` (``make bench-train``): a ``--quick`` run end to end.

Runs the real thing at a tiny size (MobileNetV2 at 64 px, 2 videos of 2 s, 1 timed step per
regime, each regime in its own child process) through the CLI, and checks that every number
the benchmark reports exists, is finite and positive, and is consistent (speedup = cached
steps/s / online steps/s; the online regime saw the same frames as the store).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_bench_train_reports_positive_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench.train", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    for title in ("cached features vs backbone in the loop", "Peak memory", "Loader alone", "Where a step's time goes"):
        assert title in proc.stdout, proc.stdout
    res = json.loads(out.read_text())
    assert [b["backbone"] for b in res["backbones"]] == ["mobilenetv2-imagenet"]
    (b,) = res["backbones"]

    f = b["flops"]
    assert _positive(f["backbone_flops_per_clip"]) and _positive(f["tmm_train_flops_per_clip"])
    assert f["tmm_bwd_flops_per_clip"] > f["tmm_fwd_flops_per_clip"]  # backward costs more than forward
    assert f["tmm_fwd_flops_per_clip"] >= 2 * f["tmm_conv_macs_closed_form"]  # convs + head, 2 FLOPs per MAC
    assert f["compute_ratio"] == (f["backbone_flops_per_clip"] + f["tmm_train_flops_per_clip"]) \
        / f["tmm_train_flops_per_clip"]
    assert f["compute_ratio"] > 1

    g = b["regimes"]
    assert set(g) == {"cached-zarr", "cached-ram", "online"}
    for name, r in g.items():
        assert r["steps"] >= 1, name
        for key in ("steps_per_s", "peak_rss_mb", "loader_worker_peak_rss_mb", "final_loss"):
            assert _positive(r[key]), (name, key, r[key])
        assert _positive(r["loader"]["clips_per_s"]), name
    assert "backbone" in g["online"]["seconds_per_step"] and "backbone" not in g["cached-ram"]["seconds_per_step"]
    assert _positive(g["cached-ram"]["tmm_prebuilt"]["clips_per_s"])
    # the online regime decoded exactly the frames the store holds (same clips, same weights)
    assert g["online"]["store_match"]["cosine_min"] > 0.99

    for k in ("cached-zarr", "cached-ram"):
        assert _positive(b["speedup"][k]) and _positive(b["speedup_over_compute_ratio"][k])
        assert math.isclose(b["speedup"][k], g[k]["steps_per_s"] / g["online"]["steps_per_s"])
        assert math.isclose(b["speedup_over_compute_ratio"][k], b["speedup"][k] / f["compute_ratio"])
        assert _positive(b["loader_vs_tmm"][k])
    assert isinstance(b["target_met"], bool)
