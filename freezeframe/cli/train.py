"""Stage-2 commands: ``stats``, ``pretrain``, ``finetune``, ``evaluate``, ``represent``, ``project``, ``report``.

Each command resolves its config (:func:`train.config.resolve_train_config`), calls one
library function (:func:`train.loop.fit`, :func:`train.evaluate.evaluate_run`,
:func:`train.represent.measure_store`, :func:`train.project.apply_projection`,
:func:`train.report.report_main`, :func:`train.stats.tmm_stats`) and renders the result.
This module is imported only when one of its commands runs (it brings torch)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from freezeframe.cli.common import config_option, console, flag_overrides, new_app, out
from train.config import TrainConfig, render_config, resolve_train_config
from train.evaluate import evaluate_run
from pipeline.store import open_store
from train.loop import fit
from train.project import apply_projection, check_fits, load_projection
from train.report import report_main
from train.represent import measure_store
from train.stats import tmm_stats
from train.ablation import write_sweep_report
from train.runpool import train_chains
from train.sweep import expand_sweep, load_sweep, rank_device, single_process, sweep_share, sweep_units

app = new_app("Stage 2: stats, pretrain, finetune, evaluate, represent, project, report, sweep.")

_DATASET = typer.Option(None, help="Training config train/configs/<name>.toml (e.g. ucf101, synth-motion).")
_CONFIG = typer.Option(None, help="TOML config file ([common], [pretrain], [finetune] tables).")
_STORE = typer.Option(None, help="Feature store, a path or an fsspec URL (overrides data.store).", show_default=False)
_RUN_DIR = typer.Option(None, help="Run directory (resumed if it exists).", show_default=False)
_EPOCHS = config_option(TrainConfig, "optim.epochs", "Epochs (overrides optim.epochs).")
_SEED = config_option(TrainConfig, "seed", "Seed.")
_KT = config_option(TrainConfig, "model.tmm.temporal_kernel", "TMM temporal kernel kt (1 = released code, 3 = paper).")
_ARCH = config_option(TrainConfig, "model.arch", "tmm | avgpool.")
_SET = typer.Option([], "--set", metavar="KEY=VALUE", show_default=False,
                    help="Override any config field (repeatable; e.g. --set optim.base_lr=5e-4).")
_PRINT = typer.Option(False, "--print-config", help="Print the resolved config and the lr per world size; run nothing.")


def _train(task: str, dataset: Optional[str], config: Optional[Path], set_: list[str], print_config: bool = False,
           **flags: object) -> None:
    """Resolve the config of ``task`` and train it with :func:`train.loop.fit` (or only print it)."""
    cfg = resolve_train_config(task, dataset, config, flag_overrides(**flags) + list(set_))
    if print_config:
        print(render_config(cfg))
        return
    res = fit(cfg, console)
    msg = f"run {res.run_dir}: {res.steps} steps, final loss {res.final_loss:.4f}"
    if res.top1 is not None:
        msg += f", test top-1 {100 * res.top1:.2f}% top-5 {100 * (res.top5 or 0):.2f}%"
    if res.evals.get("top1_centre") is not None:  # the 30-view test: the centre crops alone too
        msg += f" (every view); centre crop only: top-1 {100 * res.evals['top1_centre']:.2f}%"
    out.print(msg)


@app.command()
def pretrain(
    dataset: Optional[str] = _DATASET, config: Optional[Path] = _CONFIG,
    store: Optional[str] = _STORE, run_dir: Optional[Path] = _RUN_DIR,
    epochs: Optional[int] = _EPOCHS, seed: Optional[int] = _SEED,
    temporal_kernel: Optional[int] = _KT, arch: Optional[str] = _ARCH,
    task: str = typer.Option("prp", help="prp (TMM + head, playback-rate perception) | cosettle (Co-Settle "
                             "projection g on patch tokens, docs/cosettle.md)."),
    set_: list[str] = _SET, print_config: bool = _PRINT,
) -> None:
    """Pretraining on cached features: PRP (TMM + head) or Co-Settle (projection g); torchrun for several ranks."""
    _train(task, dataset, config, set_, print_config, **{
        "data.store": store, "run_dir": run_dir, "optim.epochs": epochs, "seed": seed,
        "model.tmm.temporal_kernel": temporal_kernel, "model.arch": arch})


@app.command()
def finetune(
    dataset: Optional[str] = _DATASET, config: Optional[Path] = _CONFIG,
    store: Optional[str] = _STORE, run_dir: Optional[Path] = _RUN_DIR,
    init: Optional[Path] = typer.Option(None, help="Pretraining run dir or checkpoint (omit: the config's init; "
                                        "--set init=\"\" trains from scratch).", show_default=False),
    epochs: Optional[int] = _EPOCHS, seed: Optional[int] = _SEED,
    temporal_kernel: Optional[int] = _KT, arch: Optional[str] = _ARCH,
    set_: list[str] = _SET, print_config: bool = _PRINT,
) -> None:
    """Fine-tune TMM + a new head on labels, then evaluate with the multi-view test protocol."""
    _train("finetune", dataset, config, set_, print_config, **{
        "data.store": store, "run_dir": run_dir, "init": init, "optim.epochs": epochs,
        "seed": seed, "model.tmm.temporal_kernel": temporal_kernel, "model.arch": arch})


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="A fine-tuning run directory."),
    store: Optional[str] = typer.Option(None, help="Evaluate on another store (default: the run's).",
                                         show_default=False),
    split: Optional[str] = typer.Option(None, help="Split to evaluate (default: the run's test split).",
                                        show_default=False),
    splits: Optional[Path] = typer.Option(None, help="Split table to take the split from (default: the run's "
                                          "data.splits; on another store, that store's own splits).",
                                          show_default=False),
    device: str = typer.Option("auto", help="auto (this rank's GPU, else CPU) | cpu | cuda | cuda:N; "
                               "under torchrun the ranks share the videos."),
) -> None:
    """Top-1, top-5, per-class accuracy and a confusion-matrix PNG of a run's final checkpoint
    (on another split or store: a result file of its own, never the run's eval.json)."""
    ev = evaluate_run(run_dir, store=store, split=split, splits=splits, device=device)
    if ev.file is None:  # not rank 0
        return
    res = ev.output
    t = Table(title=f"evaluation of {run_dir} on {ev.store}:{ev.split}")
    t.add_column("class")
    t.add_column("accuracy", justify="right")
    for name, acc in zip(res.class_names, res.per_class):
        t.add_row(str(name), f"{100 * acc:.1f}%" if acc == acc else "-")
    out.print(t)
    crops = (f": {res.views // res.spatial_crops} clips x {res.crops_note}" if res.crops_note else "")
    centre = (f"; centre crop only ({res.views // res.spatial_crops} views): top-1 {100 * res.centre_top1:.2f}%"
              if res.centre_top1 is not None else "")
    out.print(f"top-1 {100 * res.top1:.2f}%  top-5 {100 * res.top5:.2f}%  ({res.num_videos} videos, "
              f"{res.views} views each{crops}){centre}; written to {ev.file}"
              + (f"; confusion matrix: {', '.join(map(str, ev.plots))}" if ev.plots else ""))


@app.command()
def represent(
    store: str = typer.Argument(..., help="Feature store (raw or projected tokens)."),
    projection: Optional[Path] = typer.Option(None, help="A `pretrain --task cosettle` run: measure g(tokens).",
                                              show_default=False),
    videos: Optional[int] = typer.Option(None, help="The first N videos in store order (default: all).",
                                         show_default=False),
    split: Optional[str] = typer.Option(None, help="Only this split (default: every video).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Co-Settle's representation metrics: D_intra, D_inter, their ratio, effective rank, cycle accuracy."""
    s = open_store(store)
    transform = None
    if projection is not None:
        transform = load_projection(projection)
        check_fits(transform, s)
    m = measure_store(s, videos, split, transform, console)
    js = m.to_json()
    if as_json:
        print(json.dumps(js))
        return
    t = Table(title=f"representation of {store}" + (f" through {projection}" if projection else ""))
    t.add_column("metric")
    t.add_column("raw", justify="right")
    for p in ("90", "95", "100"):
        t.add_column(f"/ diameter p{p}", justify="right")
    for key in ("d_intra", "d_inter", "ratio"):
        t.add_row(key, f"{js[key]:.4f}", *(f"{js[f'{key}_norm{p}']:.4f}" for p in ("90", "95", "100")))
    t.add_row("effective_rank", f"{js['effective_rank']:.4f}", "", "", "")
    t.add_row("cycle_accuracy", f"{js['cycle_accuracy']:.4f}", "", "", "")
    out.print(t)
    out.print(f"{m.videos} videos ({m.videos_intra} long enough for D_intra), {m.frames:,} frames, "
              f"{m.tokens_per_frame} tokens x {m.channels} channels")


@app.command()
def project(
    store: Path = typer.Argument(..., help="Source feature store."),
    projection: Path = typer.Option(..., help="A `pretrain --task cosettle` run."),
    out_store: Path = typer.Option(..., "--out", help="The new store of g(tokens) (created or resumed)."),
    dtype: Optional[str] = typer.Option(None, help="Storage dtype of the new store (default: the source's).",
                                        show_default=False),
) -> None:
    """Apply a trained Co-Settle projection to every frame of a store, into a new store."""
    path = apply_projection(store, projection, out_store, dtype, console)
    out.print(f"[green]ok[/]: {path} holds g(tokens) of every frame of {store}")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories to compare."),
    out_md: Optional[Path] = typer.Option(None, "--out", help="Also write a Markdown report here.",
                                          show_default=False),
) -> None:
    """Tabulate runs side by side, with the PRP pretraining gain (Delta-Acc) where pairs exist."""
    raise typer.Exit(report_main(list(runs), out_md))


@app.command()
def sweep(
    spec: Path = typer.Argument(..., help="Sweep spec (TOML: task, out, set, [grid], [[runs]], delta, [[tables]]; "
                                "see train/sweep.py)."),
    index: Optional[int] = typer.Option(None, help="This job's index (default: the torchrun/srun rank or the Slurm "
                                        "array task; 0 alone).", show_default=False),
    count: Optional[int] = typer.Option(None, help="Number of jobs sharing the sweep (point k goes to job k % count; "
                                        "default: the world size or the array size).", show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and their overrides, train nothing."),
    report_only: bool = typer.Option(False, "--report-only", help="Only (re)write the report of the runs so far."),
    parallel: int = typer.Option(1, help="This job's points trained side by side, one process each (0 = as many as the "
                             "cores hold at --threads each); on a GPU keep 1 per device."),
    threads: int = typer.Option(0, help="Torch threads of each run (0: this process's count, or cores / --parallel)."),
) -> None:
    """Train a grid of ablations over one store, one run directory each (reruns resume), then
    report them as the paper's ablation tables; under torchrun or a Slurm array each job trains its share."""
    s = load_sweep(spec)
    runs = expand_sweep(s)
    if dry_run:
        for r in runs:
            out.print(f"{Path(s.out) / r.name}: {' '.join(r.overrides)}", soft_wrap=True, highlight=False)
        return
    job, jobs = sweep_share(index, count)
    every = {name: cfg for u in sweep_units(s, resolve_train_config) for name, cfg in u.runs}  # all checked first
    if not report_only:
        mine = sweep_units(s, resolve_train_config, job, jobs)
        console.log(f"sweep job {job} of {jobs}: {sum(len(u.runs) for u in mine)} of {len(every)} runs")
        for u in mine:
            for name, cfg in u.runs:
                cfg.device = rank_device(cfg.device)  # this rank's GPU, not every rank on cuda:0
        with single_process():
            train_chains([[cfg for _, cfg in u.runs] for u in mine], workers=parallel, threads=threads, console=console,
                         description="sweep runs")
    unfinished = [n for n in every if not (Path(s.out) / n / "summary.json").is_file()]
    if unfinished:  # another job still trains: the last one to finish writes the report
        out.print(f"{len(unfinished)} run(s) of the sweep not finished yet (e.g. {unfinished[0]}); the report is "
                  "written when they are (or: freezeframe sweep SPEC --report-only)")
        if not report_only:
            return
    path = write_sweep_report(s, every)
    out.print(f"wrote {path}")


@app.command()
def stats(
    in_channels: int = typer.Option(1280, help="C_in: the store's channels."),
    out_channels: int = typer.Option(512, help="C_out of the TMM."),
    hidden: int = typer.Option(256, help="Bottleneck width h."),
    blocks: int = typer.Option(1, help="Number of blocks N."),
    temporal_kernel: int = typer.Option(3, help="Temporal kernel kt."),
    frames: int = typer.Option(8, help="Frames per clip T."),
    grid: int = typer.Option(7, help="Grid side (H = W)."),
    num_classes: int = typer.Option(4, help="Head outputs."),
    mlp_dim: int = typer.Option(1024, help="Head hidden width."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Parameters and multiply-accumulates of a TMM config (the paper's efficiency convention)."""
    s = tmm_stats(in_channels, out_channels, hidden, blocks, temporal_kernel, frames, grid,
                  num_classes=num_classes, mlp_dim=mlp_dim)
    if as_json:
        print(json.dumps(asdict(s)))
        return
    t = Table(title=f"TMM C_in={in_channels} h={hidden} C_out={out_channels} N={blocks} kt={temporal_kernel}, "
                    f"clip {frames}x{grid}x{grid}")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("TMM conv weights", f"{s.tmm_conv_params:,}")
    t.add_row("TMM trainable parameters", f"{s.tmm_params:,}")
    t.add_row("head parameters", f"{s.head_params:,}")
    t.add_row("TMM MACs per clip", f"{s.tmm_macs:,} ({s.tmm_macs / 1e9:.3f} G)")
    out.print(t)
