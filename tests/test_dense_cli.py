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


def test_dense_extract_from_video_files_then_propagate(tmp_path):
    """`dense-extract --videos DIR`: each sequence decoded from DIR/<seq>.mp4 (lossless copies of its
    JPEG frames) gives the same scores as the frame folders."""
    import numpy as np
    import torch
    from PIL import Image

    from tests.videos import make_lossless_video

    d = tmp_path / "D"
    assert invoke(["synth-davis", str(d), "--sequences", "2", "--frames", "5", "--height", "96", "--width", "160"]).exit_code == 0
    (tmp_path / "vids").mkdir()
    for v in build_dense("davis2017", root=d):
        make_lossless_video(tmp_path / "vids" / f"{v.video_id}.mp4", np.stack([np.asarray(Image.open(f)) for f in v.frames]), 24)
    scores = {}
    for name, extra in (("folder", []), ("video", ["--videos", str(tmp_path / "vids")])):
        store = tmp_path / f"{name}.zarr"
        torch.manual_seed(0)  # --random-weights draws from the global RNG (in-process CLI): the same backbone twice
        r = invoke(["dense-extract", "--davis", str(d), "--store", str(store), "--random-weights",
                    "--size-policy", "native", "--dtype", "float32", *extra])
        assert r.exit_code == 0, r.output
        r = invoke(["propagate", "--store", str(store), "--davis", str(d), "--out", str(tmp_path / name), "--json"])
        assert r.exit_code == 0, r.output
        scores[name] = json.loads(r.stdout[r.stdout.index("{"):])
    assert scores["video"]["per_sequence"] == scores["folder"]["per_sequence"]
    r = invoke(["dense-extract", "--davis", str(d), "--store", str(tmp_path / "x.zarr"), "--random-weights",
                "--videos", str(tmp_path)])
    assert r.exit_code != 0 and "without exactly one video file" in r.output + str(r.exception)
