"""Visible training and useful checkpoints (issue 13): the learning rate never 0, progress on a
terminal and per-epoch lines elsewhere, metrics.csv, a model-only safetensors export, keep-last-N
and best-by-metric checkpoints, resume that extends the number of epochs. Tiny real runs."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from pipeline.errors import ConfigMismatchError
from tests.stores import TINY_TRAIN, SynthStore, train_config
from train.loop import fit, lr_at
from train.rundir import RunDir

TINY = [*TINY_TRAIN, "test.num_clips=2"]
STEPS_PER_EPOCH = 4  # 8 train videos, 2 per step


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(task: str, store: SynthStore | Path, run_dir: Path, *extra: str):
    return train_config(task, store, run_dir, *TINY, *extra)


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, no_color=True, force_terminal=terminal), buf


def test_the_learning_rate_is_never_zero() -> None:
    total, warmup, peak = 20, 5, 0.1
    lrs = [lr_at(s, total, warmup, peak, 0.0) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warmup) and lrs[warmup - 1] == pytest.approx(peak)
    assert lrs[warmup] == pytest.approx(peak)  # the cosine starts at the peak
    assert all(lr > 0 for lr in lrs) and lrs[-1] < lrs[warmup + 1]
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup]))  # warmup rises


def test_one_line_per_epoch_when_not_a_terminal(store: SynthStore, tmp_path: Path) -> None:
    con, buf = _console(False)
    fit(_cfg("prp", store, tmp_path / "run", "optim.epochs=2"), con)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip().startswith("epoch") or "] epoch" in ln]
    assert len(lines) == 2, buf.getvalue()
    assert "epoch 1/2 step 4/8 loss " in lines[0] and " lr " in lines[0] and "step/s" in lines[0]
    assert "epoch 2/2 step 8/8" in lines[1] and " acc " in lines[1]


def test_a_progress_bar_on_a_terminal(store: SynthStore, tmp_path: Path) -> None:
    con, buf = _console(True)
    fit(_cfg("prp", store, tmp_path / "run", "optim.epochs=1"), con)
    out = buf.getvalue()
    assert "epoch 1/1" in out and "4/4" in out and "step/s" in out and "loss " in out and "lr " in out


def test_metrics_csv_and_safetensors_export(store: SynthStore, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    fit(_cfg("prp", store, run.path, "optim.epochs=2", "max_steps=3"))
    fit(_cfg("prp", store, run.path, "optim.epochs=2"))  # resumed: each step once in the CSV too
    with open(run.metrics_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "step", "loss", "acc", "lr", "time"]
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    jsonl = [m for m in run.read_metrics() if m["kind"] == "train"]
    assert [float(r["loss"]) for r in rows] == [m["loss"] for m in jsonl]
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = load_file(run.safetensors_file)
    final = torch.load(run.final, weights_only=True)
    assert weights.keys() == final["model"].keys()
    assert all(torch.equal(weights[k], final["model"][k]) for k in weights)
    assert "optimizer" not in final and "torch_rng" not in final  # final.pt: the model, not the optimiser again
    with safe_open(str(run.safetensors_file), "pt") as f:
        meta = f.metadata()
    assert meta["task"] == "prp" and meta["step"] == "8" and json.loads(meta["config"])["optim"]["epochs"] == 2


def test_keep_last_and_best_checkpoints(store: SynthStore, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "ft")
    fit(_cfg("finetune", store, run.path, "model.num_classes=3", "optim.epochs=3", "eval_every=1", "keep_last=2",
             "best_metric=\"top1\""))
    assert sorted(p.name for p in run.checkpoints.glob("epoch-*.pt")) == ["epoch-0002.pt", "epoch-0003.pt"]
    snap = torch.load(run.snapshot(2), weights_only=True)
    assert snap["step"] == 2 * STEPS_PER_EPOCH and "optimizer" in snap  # a full checkpoint
    evals = [m for m in run.read_metrics() if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [4, 8, 12]
    best = torch.load(run.best, weights_only=True)
    top = max(m["top1"] for m in evals)
    first_best = next(m["step"] for m in evals if m["top1"] == top)  # ties keep the earlier
    assert best["best"] == {"metric": "top1", "value": top, "step": first_best} and best["step"] == first_best
    assert "optimizer" not in best


def test_resume_extends_the_number_of_epochs(store: SynthStore, tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    fit(_cfg("prp", store, run.path, "optim.epochs=1"))
    con, buf = _console(False)
    res = fit(_cfg("prp", store, run.path, "optim.epochs=3"), con)
    assert res.steps == 3 * STEPS_PER_EPOCH and "extending" in buf.getvalue() and "from 1 to 3 epochs" in buf.getvalue()
    assert [m["step"] for m in run.read_metrics() if m["kind"] == "train"] == list(range(1, 13))
    assert run.read_summary()["steps"] == 12 and json.loads(run.config_file.read_text())["optim"]["epochs"] == 3
    with pytest.raises(ConfigMismatchError, match=r"optim.epochs: run has 3, this command asks 2"):
        fit(_cfg("prp", store, run.path, "optim.epochs=2"))
