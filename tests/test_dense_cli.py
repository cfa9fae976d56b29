"""The dense commands end to end on the synthetic DAVIS-layout data."""
from __future__ import annotations

import json


from manifests.dense import build_dense
from tests.test_cli_extract import invoke
from train.dense.results import read_ground_truth, write_video_labels


def test_synth_extract_propagate_and_eval(tmp_path):
    d, store, res = tmp_path / "D", tmp_path / "s.zarr", tmp_path / "res"
    r = invoke(["synth-davis", str(d), "--sequences", "2", "--frames", "5", "--height", "96", "--width", "160"])
    assert r.exit_code == 0, r.output
    r = invoke(["dense-extract", "--davis", str(d), "--store", str(store), "--random-weights",
                "--size-policy", "native", "--dtype", "float32"])
    assert r.exit_code == 0, r.output
    r = invoke(["propagate", "--store", str(store), "--davis", str(d), "--out", str(res), "--json"])
    assert r.exit_code == 0, r.output
    scores = json.loads(r.stdout[r.stdout.index("{"):])
    assert {"J_mean", "F_mean", "JF_mean", "per_sequence"} <= set(scores)
    assert set(scores["per_sequence"]) == {"synth000", "synth001"}
    assert (res / "synth001" / "00004.png").is_file()
    # davis-eval scores any folder: the ground truth itself scores 1
    videos = build_dense("davis2017", root=d)
    for v in videos:
        write_video_labels(tmp_path / "gt", v, read_ground_truth(v))
    r = invoke(["davis-eval", "--davis", str(d), "--results", str(tmp_path / "gt"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout[r.stdout.index("{"):])["JF_mean"] == 1.0
    r = invoke(["davis-eval", "--davis", str(d), "--results", str(tmp_path / "nothing")])
    assert r.exit_code != 0
