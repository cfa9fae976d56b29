"""The long-form experiment in one call (train/longform_experiment.py) on tiny stores."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.config import load_toml
from pipeline.errors import FreezeframeError
from tests.stores import write_synthetic_store
from train.config import CONFIG_DIR, resolve_train_config
from train.longform_experiment import LongformExperiment, load_experiment, plan_runs, read_results, run_experiment
from train.rundir import RunDir

TOML = """
[common]
data.workers = 0
model.tmm.in_channels = 16
model.tmm.hidden = 8
model.tmm.out_channels = 16
model.mlp_dim = 16
optim.warmup_epochs = 0
checkpoint_every = 1000
log_every = 1

[longform]
data.store = "{pre}"
optim.epochs = 1
optim.batch_size = 4
moco.proj_hidden = 16
moco.proj_dim = 8
moco.queue_size = 16
moco.stream.clip_frames = 6
mfm.decoder_hidden = 8
mfm.stream.clip_frames = 6
distill.stream.clip_frames = 6

[finetune]
data.store = "{ft}"
model.num_classes = 3
optim.epochs = 1
optim.batch_size = 2
clip.num_frames = 4
clip.stride = 2
test.num_clips = 2
test.num_frames = 4
test.stride = 2
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_experiment_runs_every_cell_and_reports(tmp_path: Path) -> None:
    pre = write_synthetic_store(tmp_path / "long.zarr", splits={"train": 3}, video_lengths=[40, 30, 36])
    ft = write_synthetic_store(tmp_path / "short.zarr", splits={"train": 6, "test": 3}, num_classes=3)
    cfg_file = tmp_path / "tiny.toml"
    cfg_file.write_text(TOML.format(pre=pre.path, ft=ft.path))
    exp = LongformExperiment(out=str(tmp_path / "out"), pretrain_dataset=str(cfg_file), finetune_dataset=str(cfg_file),
                             strides=(4,), chance=1 / 3)
    runs = run_experiment(exp)
    assert len(runs) == 1 + 3 * 2 and [r.label for r in runs][:2] == ["scratch", "moco sequential s=4"]
    assert all(r.top1 is not None and 0.0 <= r.top1 <= 1.0 for r in runs)
    for r in runs[1:]:
        ft_cfg = RunDir(r.finetune_dir).read_config()
        assert ft_cfg["init"] == str(r.pretrain_dir)
        pre_cfg = RunDir(r.pretrain_dir).read_config()
        assert pre_cfg["task"] == r.task and pre_cfg["task_cfg"]["stream"]["order"] == r.order
        assert pre_cfg["task_cfg"]["stream"]["stride_frames"] == 4
    assert not RunDir(runs[0].finetune_dir).read_config()["init"]
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    assert report.count("\n| ") == 1 + 7 and "Delta vs scratch" in report
    # every row: top-1 with its Wilson interval over the 3 test clips; pre-trained rows: McNemar vs scratch
    rows = [line for line in report.splitlines() if line.startswith("| ") and "Wilson" not in line]
    assert len(rows) == 7 and all(" | 3 | " in line and "[" in line for line in rows)
    assert all(re.search(r"\| \d / \d \| [0-9.e-]+ \|$", line) for line in rows[1:])
    assert (out / "top1.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["top1"] for r in read_results(out)] == [r.top1 for r in runs]
    # a second call reads the finished runs back instead of training again
    stamp = {r.finetune_dir: (r.finetune_dir / "summary.json").stat().st_mtime_ns for r in runs}
    again = run_experiment(exp)
    assert [r.top1 for r in again] == [r.top1 for r in runs]
    assert all((r.finetune_dir / "summary.json").stat().st_mtime_ns == stamp[r.finetune_dir] for r in again)
    # a finished run made with another config is refused, not silently reported
    with pytest.raises(FreezeframeError, match="another config"):
        run_experiment(LongformExperiment(out=exp.out, pretrain_dataset=str(cfg_file), finetune_dataset=str(cfg_file),
                                          strides=(4,), finetune_set=("optim.epochs=2",)))


def test_shipped_experiment_configs_resolve() -> None:
    for name in ("longform-synth", "longform-ava-ucf101", "longform-ava-hmdb51"):
        exp = load_experiment(CONFIG_DIR / "experiments" / f"{name}.toml")
        assert len(plan_runs(exp)) == 1 + len(exp.tasks) * len(exp.orders) * len(exp.strides) * len(exp.seeds)
        for task in exp.tasks:
            cfg = resolve_train_config(task, exp.pretrain_dataset, None, list(exp.pretrain_set))
            assert cfg.task_cfg.stream.clip_frames == 16
        ft = resolve_train_config("finetune", exp.finetune_dataset, None, list(exp.finetune_set))
        pre = resolve_train_config("moco", exp.pretrain_dataset, None, [])
        assert ft.model.tmm == pre.model.tmm  # fine-tuning can load the pre-trained temporal module
    assert load_toml(CONFIG_DIR / "experiments" / "longform-ava-ucf101.toml")["experiment"]["finetune_set"][0] == "optim.epochs=10"


def test_arms_pick_task_order_cells() -> None:
    exp = LongformExperiment(out="o", pretrain_dataset="a", finetune_dataset="b", strides=(4, 8),
                             arms=("moco:sequential", "distill:random"))
    assert [r.label for r in plan_runs(exp)] == ["scratch", "moco sequential s=4", "moco sequential s=8",
                                                 "distill random s=4", "distill random s=8"]
    for bad in ("moco", "moco:backwards", "nope:random"):
        with pytest.raises(FreezeframeError, match="task:order"):
            LongformExperiment(arms=(bad,))
