"""Evaluate a finished run again (``freezeframe evaluate``): its final checkpoint, on the run's
own store and test split or on others given, with one registered evaluation (default: the
multi-view test). On the run's own store and test split the result file and plots are
(re)written into the run directory; on another split or store the result goes to a file of its
own (``eval-<name>@split=val.json``, see ``RunDir.eval_file``) that ``report`` labels, so the
run's own test result is never overwritten. Under torchrun every rank takes part (a
``distributed`` evaluation shares the videos) and rank 0 writes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.errors import FreezeframeError
from train import distributed as D
from train.config import load_train_config
from train.data import open_training_store
from train.evals import EvalOutput, get_evaluation
from train.models import build_model
from train.rundir import RunDir, load_init
from train.tasks import get_task


@dataclass
class RunEvaluation:
    """What :func:`evaluate_run` computed: the evaluation's output (for ``multiview`` a
    :class:`train.metrics.EvalResult`), where it ran, and the figures it wrote."""

    output: EvalOutput
    store: str
    split: str
    plots: list[Path] = field(default_factory=list)
    file: Path | None = None  # the result file written (None on ranks other than 0)
    tag: str | None = None  # set when the store or split is not the run's own


def eval_tag(run_store: str, run_split: str, store: str | Path | None, split: str | None,
             run_splits: str = "", splits: str | Path | None = None) -> str | None:
    """``store=<stem>,splits=<stem>,split=<name>`` for the parts that differ from the run's own
    store, split table and test split (None when none does: the run's own evaluation)."""
    parts = []
    if store and Path(store).resolve() != Path(run_store).resolve():
        parts.append(f"store={Path(str(store).rstrip('/')).stem}")
    if splits is not None and str(splits) != run_splits:
        parts.append(f"splits={Path(str(splits)).stem or 'store'}")
    if split and split != run_split:
        parts.append(f"split={split}")
    return ",".join(parts) or None


def evaluate_run(run_dir: str | Path, *, store: str | Path | None = None, split: str | None = None,
                 splits: str | Path | None = None, evaluation: str = "multiview",
                 device: str = "auto") -> RunEvaluation:
    """Rebuild the run's model from ``config.json``, load its final (else last) checkpoint and
    run ``evaluation`` on ``store`` / ``split`` (default: the run's ``data.store`` and
    ``data.test_split``) on ``device`` (``auto``: this rank's GPU, else the CPU). ``splits``: a
    split table (:mod:`pipeline.splits`; ``""``: the store's own splits); on another store the
    run's table is not used unless given again. A folder that is
    not a run raises :class:`train.rundir.RunDirError`; a run whose task does not run
    ``evaluation`` (e.g. a PRP run: its head predicts playback rates, not classes) is refused."""
    run = RunDir(run_dir)
    cfg = load_train_config(run.read_config())
    task = get_task(cfg.task)
    if evaluation not in task.evaluations:
        has = f"its task runs {', '.join(task.evaluations)}" if task.evaluations else "its task runs no evaluation"
        raise FreezeframeError(
            f"{run.path} is a {cfg.task!r} run: {evaluation!r} does not apply to it ({has}; a PRP head predicts "
            "playback rates, not classes). Evaluate a fine-tuning run (freezeframe finetune --init "
            f"{run.path}) instead")
    if store and splits is None and cfg.data.splits and Path(store).resolve() != Path(cfg.data.store).resolve():
        splits = ""  # the run's table lists the run's store's videos
    tag = eval_tag(cfg.data.store, cfg.data.test_split, store, split, cfg.data.splits, splits)
    if splits is not None:
        cfg.data.splits = str(splits)
    if store:
        cfg.data.store = str(store)
    if split:
        cfg.data.test_split = split
    dinfo = D.setup(device)
    model = build_model(cfg.model)
    model.load_state_dict(load_init(str(run.path))["model"])
    ev = get_evaluation(evaluation)
    out = ev.run(model.to(dinfo.device), open_training_store(cfg), cfg, dinfo.device)
    res = RunEvaluation(out, cfg.data.store, cfg.data.test_split, tag=tag)
    if dinfo.is_main:
        where = {"store": cfg.data.store, "splits": cfg.data.splits, "split": cfg.data.test_split} if tag else None
        res.file = run.write_eval(ev.name, out, tag, where)
        res.plots = [] if tag else ev.plot(out, run)  # the run's own figures show its own test
    D.teardown()
    return res
