"""The Co-Settle commands end to end through the ``freezeframe`` console script:
``pretrain --task cosettle``, ``represent [--projection] --json``, ``project``, ``status``,
and their one-line refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.manifest import ManifestRow, write_manifest
from tests.stores import write_synthetic_store
from tests.videos import make_lossless_video, pattern_frames

FREEZEFRAME = str(Path(sys.executable).parent / "freezeframe")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "220", "NO_COLOR": "1"}
KEYS = {"d_intra", "d_inter", "ratio", "effective_rank", "cycle_accuracy", "d_intra_norm90", "d_intra_norm95",
        "d_intra_norm100", "d_inter_norm90", "d_inter_norm95", "d_inter_norm100", "ratio_norm90", "ratio_norm95",
        "ratio_norm100"}


def ff(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([FREEZEFRAME, *args], env=ENV, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_train_measure_and_apply_a_projection_from_the_command_line(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "s.zarr", splits={"train": 6}, grid=(4, 4), channels=16,
                                  lengths=(10, 14)).path
    run = tmp_path / "run"
    res = ff("pretrain", "--task", "cosettle", "--store", str(store), "--run-dir", str(run), "--epochs", "2",
             "--set", "cosettle.return_view=plain", "--set", "optim.batch_size=3", "--set", "data.workers=0",
             cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "run " in res.stdout and json.loads((run / "config.json").read_text())["task"] == "cosettle"

    raw = ff("represent", str(store), "--json", cwd=tmp_path)
    assert raw.returncode == 0, raw.stderr
    raw_js = json.loads(raw.stdout)
    assert KEYS <= set(raw_js) and raw_js["videos"] == 6
    proj = ff("represent", str(store), "--projection", str(run), "--videos", "4", "--json", cwd=tmp_path)
    assert proj.returncode == 0, proj.stderr
    proj_js = json.loads(proj.stdout)
    assert proj_js["videos"] == 4 and proj_js["d_intra"] != raw_js["d_intra"]
    table = ff("represent", str(store), cwd=tmp_path)
    assert table.returncode == 0 and "cycle_accuracy" in table.stdout and "d_intra" in table.stdout

    out = tmp_path / "g.zarr"
    res = ff("project", str(store), "--projection", str(run), "--out", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert ff("verify", str(out), cwd=tmp_path).returncode == 0
    again = ff("represent", str(out), "--videos", "4", "--json", cwd=tmp_path)
    assert json.loads(again.stdout)["d_intra"] == pytest.approx(proj_js["d_intra"], rel=2e-3)  # float16 store


def test_refusals_are_one_line_errors(tmp_path: Path) -> None:
    store = write_synthetic_store(tmp_path / "s.zarr", splits={"train": 4}, grid=(4, 4), channels=16).path
    res = ff("pretrain", "--task", "cosettle", "--store", str(store), "--run-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert res.returncode != 0
    assert "no PEA views" in res.stderr and "Traceback" not in res.stderr
    res = ff("represent", str(store), "--videos", "1", cwd=tmp_path)
    assert res.returncode != 0 and "at least 2" in res.stderr and "Traceback" not in res.stderr
    # --pea-views on the CNN: refused before the store exists
    video = make_lossless_video(tmp_path / "v.mp4", pattern_frames(4, 48, 64), 10)
    manifest = write_manifest([ManifestRow("v", str(video), "train")], tmp_path / "m.jsonl")
    res = ff("extract", "--manifest", str(manifest), "--store", str(tmp_path / "cnn.zarr"), "--random-weights",
             "--image-size", "64", "--pea-views", "1", "--device", "cpu", "--workers", "1", cwd=tmp_path)
    assert res.returncode != 0 and "no positional embedding" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "cnn.zarr").exists()
