"""Recipe presets (train/recipes/*.toml): the paper's and the released code's numbers, the
lr scaling convention of each (batch per rank vs global), every dataset config, and
``--print-config`` (prints the resolved config, runs nothing)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from train.config import CONFIG_DIR, render_config, resolve_train_config
from train.presets import PRESETS
from train.schema import peak_lr, per_rank_batch

DATASETS = ("ucf101", "hmdb51", "diving48", "ssv2", "kinetics400")


def test_both_presets_exist_and_datasets_default_to_paper() -> None:
    assert set(PRESETS.names()) == {"paper", "released"}
    for ds in DATASETS:
        assert (CONFIG_DIR / f"{ds}.toml").exists()
        for task in ("prp", "finetune"):
            assert resolve_train_config(task, ds, None, []).recipe == "paper"
    with pytest.raises(ConfigError, match="recipe"):
        resolve_train_config("prp", "ucf101", None, ["recipe=mine"])


def test_paper_preset_numbers() -> None:
    pre = resolve_train_config("prp", "ucf101", None, [])
    o = pre.optim
    assert (o.base_lr, o.weight_decay, o.epochs, o.min_lr, o.batch_scope) == (1e-2, 1e-6, 800, 0.0, "global")
    assert pre.amp is False  # TMM and head in float32
    k400 = resolve_train_config("prp", "kinetics400", None, [])
    assert k400.optim.epochs == 200 and k400.task_cfg.clips_per_video == 16
    ft = resolve_train_config("finetune", "ucf101", None, [])
    assert (ft.optim.epochs, ft.optim.base_lr, ft.optim.weight_decay) == (120, 1e-2, 5e-3)
    assert ft.task_cfg.num_frames == 16 and ft.eval_cfg["multiview"].num_clips == 10
    dv = resolve_train_config("finetune", "diving48", None, [])
    assert (dv.optim.epochs, dv.optim.base_lr, dv.optim.weight_decay) == (60, 3e-2, 5e-2)
    assert dv.eval_cfg["multiview"].num_clips == 10
    # the paper's lr rule: eta x global batch / 64, the same on 1 and on 4 ranks
    assert peak_lr(o, per_rank_batch(o, 1), 1) == peak_lr(o, per_rank_batch(o, 4), 4) == pytest.approx(1e-2 * 32 / 64)
    assert per_rank_batch(o, 4) == 8
    with pytest.raises(ConfigError, match="does not divide over 3 ranks"):
        per_rank_batch(o, 3)


def test_released_preset_numbers() -> None:
    cfg = resolve_train_config("prp", "ucf101", None, ["recipe=released"])
    t, o = cfg.model.tmm, cfg.optim
    assert (t.out_channels, t.blocks, t.temporal_kernel, t.hidden, cfg.model.mlp_dim) == (512, 4, 1, 256, 1024)
    assert (o.base_lr, o.batch_size, o.batch_scope, o.weight_decay, o.epochs) == (1e-3, 8, "per_rank", 1e-6, 800)
    assert cfg.amp is False
    # BASE_LR x BATCHSIZE_PER_GPU x world / 64: 5e-4 on the released 4 GPUs (not 4x that)
    assert peak_lr(o, per_rank_batch(o, 4), 4) == pytest.approx(5e-4)
    assert per_rank_batch(o, 4) == 8
    # the dataset's paper-only values do not leak into the released recipe
    k400 = resolve_train_config("prp", "kinetics400", None, ["recipe=released"])
    assert k400.optim.epochs == 800 and k400.task_cfg.clips_per_video == 4


def test_overrides_win_over_the_preset_and_synth_configs_name_none() -> None:
    cfg = resolve_train_config("finetune", "ucf101", None, ["optim.epochs=7", "amp=true"])
    assert cfg.optim.epochs == 7 and cfg.amp is True and cfg.optim.base_lr == 1e-2
    synth = resolve_train_config("finetune", "synth-motion", None, [])
    assert synth.recipe == "" and synth.optim.base_lr == 2e-3


def test_render_config_states_the_batch_scope_and_lr() -> None:
    text = render_config(resolve_train_config("prp", "ucf101", None, ["recipe=released"]), world_sizes=(4,))
    d = json.loads(text)
    body, notes = d, d["_notes"]
    assert body["optim"]["base_lr"] == 1e-3
    assert "per rank" in notes[0] and "peak lr 0.0005" in notes[1]


def test_print_config_command_runs_nothing(tmp_path) -> None:
    exe = Path(sys.executable).parent / "freezeframe"  # the console script, wherever the CLI module lives
    res = subprocess.run([str(exe), "finetune", "--dataset", "diving48", "--print-config",
                          "--run-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert '"epochs": 60' in res.stdout and "peak lr" in res.stdout
    assert not (tmp_path / "run").exists()
