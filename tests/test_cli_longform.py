"""The long-form commands through typer: synth-longform, pretext-online (real H.264, resumed), pretext."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from freezeframe.cli.longform import app
from tests.stores import write_synthetic_store

TINY = """
[common]
data.workers = 0
model.tmm.in_channels = {c}
model.tmm.hidden = 8
model.tmm.out_channels = 16
model.mlp_dim = 16
log_every = 1
checkpoint_every = 2

[longform]
optim.batch_size = 3
moco.proj_hidden = 16
moco.proj_dim = 8
moco.queue_size = 12
moco.stream.clip_frames = 8
mfm.decoder_hidden = 8
mfm.stream.clip_frames = 8
mfm.stream.stride_frames = 8
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _app() -> typer.Typer:
    return app


def test_synth_then_online_pretext_resumes(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(_app(), ["synth-longform", str(tmp_path / "lf"), "--seconds", "12", "--size", "32",
                                 "--pretrain-videos", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "lf" / "pretrain.jsonl").is_file() and (tmp_path / "lf" / "actions.jsonl").is_file()
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY.format(c=1280))
    args = ["pretext-online", "mfm", "--manifest", str(tmp_path / "lf" / "pretrain.jsonl"),
            "--extract-set", "random_weights=true", "--extract-set", "image_size=64", "--extract-set", "fps=8.0",
            "--config", str(cfg), "--run-dir", str(tmp_path / "run")]
    res = runner.invoke(_app(), [*args, "--set", "max_steps=2"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    res = runner.invoke(_app(), args)  # the rest of the stream: 96 frames = 12 clips = 4 batches
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["clips"] == 12 and summary["online"]


def test_pretext_on_a_store(tmp_path: Path) -> None:
    st = write_synthetic_store(tmp_path / "s.zarr", splits={"train": 3}, video_lengths=[30, 26, 34])
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY.format(c=16))
    res = CliRunner().invoke(_app(), ["pretext", "moco", "--config", str(cfg), "--store", str(st.path), "--run-dir",
                                      str(tmp_path / "run"), "--order", "random", "--stride", "8", "--set", "optim.epochs=1"])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task_cfg"]["stream"] == {**config["task_cfg"]["stream"], "order": "random", "stride_frames": 8}
    res = CliRunner().invoke(_app(), ["pretext", "moco", "--config", str(cfg), "--store", str(st.path), "--run-dir",
                                      str(tmp_path / "run2"), "--order", "shuffled"])
    assert res.exit_code == 2 and "unknown clip order 'shuffled'" in res.output  # one-line error
    assert not (tmp_path / "run2").exists()  # refused when the config is parsed, before any work
