"""Stage-2 commands: ``stats``, ``pretrain``, ``finetune``, ``evaluate``, ``report``.

Each command resolves its config (:func:`train.config.resolve_train_config`), calls one
library function (:func:`train.loop.fit`, :func:`train.evaluate.evaluate_run`,
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
from train.loop import fit
from train.report import report_main
from train.stats import tmm_stats

app = new_app("Stage 2: stats, pretrain, finetune, evaluate, report.")

_DATASET = typer.Option(None, help="Training config train/configs/<name>.toml (e.g. ucf101, synth-motion).")
_CONFIG = typer.Option(None, help="TOML config file ([common], [pretrain], [finetune] tables).")
_STORE = typer.Option(None, help="Feature store (overrides data.store).", show_default=False)
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
    out.print(msg)


@app.command()
def pretrain(
    dataset: Optional[str] = _DATASET, config: Optional[Path] = _CONFIG,
    store: Optional[Path] = _STORE, run_dir: Optional[Path] = _RUN_DIR,
    epochs: Optional[int] = _EPOCHS, seed: Optional[int] = _SEED,
    temporal_kernel: Optional[int] = _KT, arch: Optional[str] = _ARCH,
    set_: list[str] = _SET, print_config: bool = _PRINT,
) -> None:
    """PRP pretraining of the TMM + head on cached features (torchrun for several GPUs/ranks)."""
    _train("prp", dataset, config, set_, print_config, **{
        "data.store": store, "run_dir": run_dir, "optim.epochs": epochs, "seed": seed,
        "model.tmm.temporal_kernel": temporal_kernel, "model.arch": arch})


@app.command()
def finetune(
    dataset: Optional[str] = _DATASET, config: Optional[Path] = _CONFIG,
    store: Optional[Path] = _STORE, run_dir: Optional[Path] = _RUN_DIR,
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
    store: Optional[Path] = typer.Option(None, help="Evaluate on another store (default: the run's).",
                                         show_default=False),
    split: Optional[str] = typer.Option(None, help="Split to evaluate (default: the run's test split).",
                                        show_default=False),
) -> None:
    """Top-1, top-5, per-class accuracy and a confusion-matrix PNG of a run's final checkpoint."""
    ev = evaluate_run(run_dir, store=store, split=split)
    res = ev.output
    t = Table(title=f"evaluation of {run_dir} on {ev.store}:{ev.split}")
    t.add_column("class")
    t.add_column("accuracy", justify="right")
    for name, acc in zip(res.class_names, res.per_class):
        t.add_row(str(name), f"{100 * acc:.1f}%" if acc == acc else "-")
    out.print(t)
    out.print(f"top-1 {100 * res.top1:.2f}%  top-5 {100 * res.top5:.2f}%  ({res.num_videos} videos, "
              f"{res.views} views each); confusion matrix: {', '.join(map(str, ev.plots))}")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories to compare."),
    out_md: Optional[Path] = typer.Option(None, "--out", help="Also write a Markdown report here.",
                                          show_default=False),
) -> None:
    """Tabulate runs side by side, with the PRP pretraining gain (Delta-Acc) where pairs exist."""
    raise typer.Exit(report_main(list(runs), out_md))


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
