"""The long-form experiment in one call: {orders} x {pretexts} (x strides x seeds) pre-training on
long videos, fine-tuning each on a short-video store, a from-scratch baseline, a table and a plot.

Run directories (each resumable; finished runs are read back, not redone)::

    OUT/pretrain/<task>-<order>-s<stride>-seed<seed>/     pre-training on the long-video store
    OUT/finetune/<task>-<order>-s<stride>-seed<seed>/     fine-tuning from it (init = that run)
    OUT/finetune/scratch-seed<seed>/                      the same fine-tuning from scratch
    OUT/results.json  OUT/report.md  OUT/top1.png         table and plot of downstream top-1

Configs: ``pretrain_dataset`` / ``finetune_dataset`` name training configs (``train/configs/<name>.toml``
or a TOML path); the pretexts read its ``[common]`` + ``[longform]`` tables, fine-tuning
``[common]`` + ``[finetune]``; ``pretrain_set`` / ``finetune_set`` are ``key=value`` overrides
applied to every run of that stage (e.g. ``optim.epochs=10`` for UCF101 as in the paper).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from pipeline.config import diff_dicts, from_dict, load_toml, merge, parse_overrides, to_dict
from pipeline.errors import FreezeframeError
from pipeline.fileio import atomic_write_json, atomic_write_text
from train.config import content_of, load_train_config, resolve_train_config
from train.metrics import EvalResult
from train.plots import ComparisonRow, plot_comparison
from train.rundir import RunDir
from train.runpool import train_chains
from train.significance import paired_outcomes, wilson_interval
from train.streams import CLIP_ORDERS
from train.tasks import get_task

__all__ = ["LongformExperiment", "ExperimentRun", "run_experiment", "plan_runs", "write_report", "load_experiment",
           "read_results", "results_table"]


@dataclass
class LongformExperiment:
    """``[experiment]`` table of an experiment file (see the module docstring)."""

    out: str = "runs/longform"
    pretrain_dataset: str = ""
    finetune_dataset: str = ""
    tasks: tuple[str, ...] = ("moco", "mfm", "distill")
    orders: tuple[str, ...] = ("sequential", "random")
    strides: tuple[int, ...] = (16,)
    seeds: tuple[int, ...] = (0,)
    baseline: bool = True
    pretrain_set: tuple[str, ...] = ()
    finetune_set: tuple[str, ...] = ()
    chance: float | None = None  # drawn as a dashed line (1 / classes)
    #: "task:order" pairs to run (e.g. "moco:sequential"); empty = every task x order
    arms: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for t in self.tasks:
            get_task(t)
        for o in self.orders:
            CLIP_ORDERS.get(o)
        for arm in self.arms:
            task, _, order = arm.partition(":")
            if task not in self.tasks or order not in self.orders:
                raise FreezeframeError(f"experiment.arms entry {arm!r} is not 'task:order' with a task of "
                                       f"{list(self.tasks)} and an order of {list(self.orders)}")


@dataclass
class ExperimentRun:
    """One fine-tuning run of the table: which pretext, order, stride, seed (task None = scratch)."""

    task: str | None
    order: str | None
    stride: int | None
    seed: int
    pretrain_dir: Path | None
    finetune_dir: Path
    top1: float | None = None
    top5: float | None = None
    pretrain_loss: float | None = None

    @property
    def label(self) -> str:
        return "scratch" if self.task is None else f"{self.task} {self.order} s={self.stride}"


def _where(name: str) -> tuple[str | None, str | None]:
    """(dataset, config_file) for resolve_train_config: a name in train/configs or a TOML path."""
    return (None, name) if name.endswith(".toml") else (name, None)


def plan_runs(exp: LongformExperiment) -> list[ExperimentRun]:
    """Every fine-tuning run of the experiment, in the order they are run (baselines first)."""
    out = Path(exp.out)
    runs = [ExperimentRun(None, None, None, seed, None, out / "finetune" / f"scratch-seed{seed}")
            for seed in exp.seeds if exp.baseline]
    for task in exp.tasks:
        for order in exp.orders:
            if exp.arms and f"{task}:{order}" not in exp.arms:
                continue
            for stride in exp.strides:
                for seed in exp.seeds:
                    name = f"{task}-{order}-s{stride}-seed{seed}"
                    runs.append(ExperimentRun(task, order, stride, seed, out / "pretrain" / name, out / "finetune" / name))
    return runs


def _refuse_other_finished(cfg: Any) -> None:
    """Refuse a finished run directory that holds a run of another config."""
    run = RunDir(cfg.run_dir)
    if run.complete:
        diffs = diff_dicts(content_of(load_train_config(run.read_config())), content_of(cfg),
                           have_name="finished run has", want_name="the experiment asks")
        if diffs:
            raise FreezeframeError(f"{run.path} holds a finished run with another config; use another "
                                   "experiment.out or delete it:\n" + "\n".join(f"  - {d}" for d in diffs))


def _summary(cfg: Any) -> dict[str, Any]:
    summary = RunDir(cfg.run_dir).read_summary()
    if summary is None:
        raise FreezeframeError(f"{cfg.run_dir} has no summary.json after training")
    return summary


def run_experiment(exp: LongformExperiment, console: Any = None,
                   progress: Callable[[str], None] = lambda msg: None, *, workers: int = 1,
                   threads: int = 0) -> list[ExperimentRun]:
    """Train every run of :func:`plan_runs` (resuming unfinished ones; finished ones are read
    back) and write the report. Each arm (pre-training + its fine-tuning) is one chain of
    :func:`train.runpool.train_chains`: ``workers`` arms side by side (0 = as many as the cores
    hold), each on ``threads`` torch threads (0 = the caller's count, or cores / workers)."""
    if not exp.pretrain_dataset or not exp.finetune_dataset:
        raise FreezeframeError("set experiment.pretrain_dataset and experiment.finetune_dataset "
                               "(training config names in train/configs or TOML paths)")
    pre_ds, pre_file = _where(exp.pretrain_dataset)
    ft_ds, ft_file = _where(exp.finetune_dataset)
    runs = plan_runs(exp)
    chains: list[list[Any]] = []
    for r in runs:
        chain, init = [], '""'
        if r.task is not None:
            chain.append(resolve_train_config(r.task, pre_ds, pre_file, [
                f'run_dir="{r.pretrain_dir}"', f"seed={r.seed}", f'{r.task}.stream.order="{r.order}"',
                f"{r.task}.stream.stride_frames={r.stride}", *exp.pretrain_set]))
            init = f'"{r.pretrain_dir}"'
        chain.append(resolve_train_config("finetune", ft_ds, ft_file, [
            f'run_dir="{r.finetune_dir}"', f"seed={r.seed}", f"init={init}", *exp.finetune_set]))
        chains.append(chain)
    for cfg in (c for chain in chains for c in chain):  # every config checked before any training
        _refuse_other_finished(cfg)
    todo = [[c for c in chain if not RunDir(c.run_dir).complete] for chain in chains]
    todo = [chain for chain in todo if chain]
    for chain in todo:
        progress("to train: " + " -> ".join(str(c.run_dir) for c in chain))
    train_chains(todo, workers=workers, threads=threads, console=console, description="long-form runs")
    for r, chain in zip(runs, chains):
        if r.task is not None:
            r.pretrain_loss = _summary(chain[0]).get("final_loss")
        summary = _summary(chain[-1])
        r.top1, r.top5 = summary.get("top1"), summary.get("top5")
    write_report(exp, runs)
    return runs


def _eval_of(run: ExperimentRun) -> EvalResult | None:
    path = run.finetune_dir / "eval.json"
    return EvalResult.load(path) if path.exists() else None


def results_table(runs: list[ExperimentRun]) -> list[str]:
    """Markdown table, one row per fine-tuning run: top-1 with its Wilson 95 % interval and the
    number of test clips, the difference to the from-scratch run of the same seed, and the exact
    McNemar test against it on the same test clips (``train.significance``)."""
    scratch = {r.seed: _eval_of(r) for r in runs if r.task is None}
    lines = ["| pre-training | order | stride (frames) | seed | top-1 % [Wilson 95 %] | test clips | "
             "Delta vs scratch (points) | only this right / only scratch right | McNemar p |",
             "|---|---|---:|---:|---|---:|---:|---|---:|"]
    for r in runs:
        ev = _eval_of(r)
        if ev is None:
            lines.append(f"| {r.task or 'none (scratch)'} | {r.order or '-'} | {r.stride or '-'} | {r.seed} | "
                         "not evaluated | | | | |")
            continue
        lo, hi = wilson_interval(round(ev.top1 * ev.num_videos), ev.num_videos)
        cells = [r.task or "none (scratch)", r.order or "-", str(r.stride or "-"), str(r.seed),
                 f"{100 * ev.top1:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]", str(ev.num_videos)]
        base = scratch.get(r.seed)
        if r.task is None or base is None:
            cells += ["-", "-", "-"]
        else:
            if base.video_ids != ev.video_ids:
                raise FreezeframeError(f"{r.finetune_dir} and the scratch run were not evaluated on the same clips")
            m = paired_outcomes(ev.predictions, base.predictions, ev.targets)
            cells += [f"{100 * (ev.top1 - base.top1):+.1f}", f"{m.only_a} / {m.only_b}", f"{m.p_value:.2g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_report(exp: LongformExperiment, runs: list[ExperimentRun]) -> Path:
    """``OUT/results.json``, ``OUT/report.md`` (table) and ``OUT/top1.png`` (plot); returns the report."""
    out = Path(exp.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", {
        "experiment": to_dict(exp),
        "runs": [{"task": r.task, "order": r.order, "stride": r.stride, "seed": r.seed, "top1": r.top1,
                  "top5": r.top5, "pretrain_loss": r.pretrain_loss, "finetune_dir": str(r.finetune_dir),
                  "pretrain_dir": str(r.pretrain_dir) if r.pretrain_dir else None} for r in runs]})
    lines = [f"# Long-form pre-training: {exp.pretrain_dataset} -> {exp.finetune_dataset}", "",
             f"Downstream top-1 after fine-tuning on `{exp.finetune_dataset}` (seeds "
             f"{', '.join(map(str, exp.seeds))}), each run against the from-scratch run of its seed.", "",
             *results_table(runs)]
    rows = []
    for r in runs:
        ev = _eval_of(r)
        if r.top1 is None:
            continue
        interval = wilson_interval(round(ev.top1 * ev.num_videos), ev.num_videos) if ev is not None else None
        rows.append(ComparisonRow("scratch" if r.task is None else f"{r.task}\ns={r.stride}",
                                  "scratch" if r.task is None else str(r.order), r.top1, interval))
    if rows:
        plot_comparison(rows, out / "top1.png", title=f"downstream top-1 (Wilson 95 %): {exp.finetune_dataset}",
                        chance=exp.chance)
        lines += ["", "![downstream top-1](top1.png)"]
    return atomic_write_text(out / "report.md", "\n".join(lines) + "\n")


def load_experiment(path: str | Path, overrides: tuple[str, ...] = ()) -> LongformExperiment:
    """The ``[experiment]`` table of a TOML file, with ``key=value`` overrides."""
    d = merge(load_toml(path).get("experiment", {}), parse_overrides(list(overrides)))
    return from_dict(LongformExperiment, d)


def read_results(out: str | Path) -> list[dict[str, Any]]:
    return json.loads((Path(out) / "results.json").read_text())["runs"]
