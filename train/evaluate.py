"""Evaluate a finished run again (``freezeframe evaluate``): its final checkpoint, on the run's
own store and test split or on others given, with one registered evaluation (default: the
multi-view test); the result file and plots are (re)written into the run directory."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from train.config import load_train_config
from train.data import open_training_store
from train.evals import EvalOutput, get_evaluation
from train.models import build_model
from train.rundir import RunDir, load_init


@dataclass
class RunEvaluation:
    """What :func:`evaluate_run` computed: the evaluation's output (for ``multiview`` a
    :class:`train.metrics.EvalResult`), where it ran, and the figures it wrote."""

    output: EvalOutput
    store: str
    split: str
    plots: list[Path] = field(default_factory=list)


def evaluate_run(run_dir: str | Path, *, store: str | Path | None = None, split: str | None = None,
                 evaluation: str = "multiview", device: str = "cpu") -> RunEvaluation:
    """Rebuild the run's model from ``config.json``, load its final (else last) checkpoint and
    run ``evaluation`` on ``store`` / ``split`` (default: the run's ``data.store`` and
    ``data.test_split``). A folder that is not a run raises :class:`train.rundir.RunDirError`."""
    run = RunDir(run_dir)
    cfg = load_train_config(run.read_config())
    if store:
        cfg.data.store = str(store)
    if split:
        cfg.data.test_split = split
    model = build_model(cfg.model)
    model.load_state_dict(load_init(str(run.path))["model"])
    ev = get_evaluation(evaluation)
    dev = torch.device(device)
    out = ev.run(model.to(dev), open_training_store(cfg), cfg, dev)
    run.write_eval(ev.name, out)
    return RunEvaluation(out, cfg.data.store, cfg.data.test_split, ev.plot(out, run))
