"""Stage-2 commands: stats, pretrain, finetune, evaluate, report, demo."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli import flag_overrides

# command bodies import the training stack lazily: `freezeframe --help` must not load torch
console = Console(stderr=True)
out = Console()

def _train_command(task: str, dataset, config, store, run_dir, init, epochs, seed, temporal_kernel, arch, set_,
                   print_config: bool = False):
    from train.config import render_config, resolve_train_config

    cfg = resolve_train_config(task, dataset, config, flag_overrides(
        **{"data.store": str(store) if store else None, "run_dir": str(run_dir) if run_dir else None,
           "init": str(init) if init else None, "optim.epochs": epochs, "seed": seed,
           "model.tmm.temporal_kernel": temporal_kernel, "model.arch": arch}) + list(set_))
    if print_config:
        print(render_config(cfg))
        return
    from train.loop import fit

    res = fit(cfg, console)
    msg = f"run {res.run_dir}: {res.steps} steps, final loss {res.final_loss:.4f}"
    if res.top1 is not None:
        msg += f", test top-1 {100 * res.top1:.2f}% top-5 {100 * (res.top5 or 0):.2f}%"
    out.print(msg)


def register(app: typer.Typer) -> None:
    common = dict(
        dataset=typer.Option(None, help="Training config in train/configs (e.g. ucf101, synth-motion)."),
        config=typer.Option(None, help="TOML config file ([common], [pretrain], [finetune] tables)."),
        store=typer.Option(None, help="Feature store (overrides data.store)."),
        run_dir=typer.Option(None, help="Run directory (resumed if it exists)."),
        epochs=typer.Option(None, help="Epochs (overrides optim.epochs)."),
        seed=typer.Option(None, help="Seed."),
        temporal_kernel=typer.Option(None, help="TMM temporal kernel kt (1 = released code, 3 = paper)."),
        arch=typer.Option(None, help="tmm | avgpool."),
        set_=typer.Option([], "--set", help="Override any config field: key=value (e.g. optim.base_lr=5e-4)."),
        print_config=typer.Option(False, "--print-config", help="Print the resolved config (and the lr per world size); run nothing."),
    )

    @app.command()
    def pretrain(
        dataset: Optional[str] = common["dataset"], config: Optional[Path] = common["config"],
        store: Optional[Path] = common["store"], run_dir: Optional[Path] = common["run_dir"],
        epochs: Optional[int] = common["epochs"], seed: Optional[int] = common["seed"],
        temporal_kernel: Optional[int] = common["temporal_kernel"], arch: Optional[str] = common["arch"],
        set_: list[str] = common["set_"], print_config: bool = common["print_config"],
    ) -> None:
        """PRP pretraining of the TMM + head on cached features (torchrun for several GPUs/ranks)."""
        _train_command("prp", dataset, config, store, run_dir, None, epochs, seed, temporal_kernel, arch, set_,
                       print_config)

    @app.command()
    def finetune(
        dataset: Optional[str] = common["dataset"], config: Optional[Path] = common["config"],
        store: Optional[Path] = common["store"], run_dir: Optional[Path] = common["run_dir"],
        init: Optional[Path] = typer.Option(None, help="Pretraining run dir or checkpoint (omit: from scratch)."),
        epochs: Optional[int] = common["epochs"], seed: Optional[int] = common["seed"],
        temporal_kernel: Optional[int] = common["temporal_kernel"], arch: Optional[str] = common["arch"],
        set_: list[str] = common["set_"], print_config: bool = common["print_config"],
    ) -> None:
        """Fine-tune TMM + a new head on labels, then evaluate with the multi-view test protocol."""
        _train_command("finetune", dataset, config, store, run_dir, init, epochs, seed, temporal_kernel, arch, set_,
                       print_config)

    @app.command()
    def evaluate(
        run_dir: Path = typer.Argument(..., help="A fine-tuning run directory."),
        store: Optional[Path] = typer.Option(None, help="Evaluate on another store (default: the run's)."),
        split: Optional[str] = typer.Option(None, help="Split to evaluate (default: the run's test split)."),
    ) -> None:
        """Top-1, top-5, per-class accuracy and a confusion-matrix PNG of a run's final checkpoint."""
        import torch

        from train.config import load_train_config
        from train.data import open_training_store
        from train.evals import get_evaluation
        from train.models import build_model
        from train.rundir import RunDir, load_init

        run = RunDir(run_dir)
        cfg = load_train_config(run.read_config())
        if store:
            cfg.data.store = str(store)
        if split:
            cfg.data.test_split = split
        model = build_model(cfg.model)
        model.load_state_dict(load_init(str(run.path))["model"])
        test = get_evaluation("multiview")
        res = test.run(model, open_training_store(cfg), cfg, torch.device("cpu"))
        run.write_eval(test.name, res)
        [png] = test.plot(res, run)
        t = Table(title=f"evaluation of {run_dir} on {cfg.data.store}:{cfg.data.test_split}")
        t.add_column("class")
        t.add_column("accuracy", justify="right")
        for name, acc in zip(res.class_names, res.per_class):
            t.add_row(str(name), f"{100 * acc:.1f}%" if acc == acc else "-")
        out.print(t)
        out.print(f"top-1 {100 * res.top1:.2f}%  top-5 {100 * res.top5:.2f}%  ({res.num_videos} videos, "
                  f"{res.views} views each); confusion matrix: {png}")

    @app.command()
    def report(
        runs: list[Path] = typer.Argument(..., help="Run directories to compare."),
        out_md: Optional[Path] = typer.Option(None, "--out", help="Also write a Markdown report here."),
    ) -> None:
        """Tabulate runs side by side, with the PRP pretraining gain (Delta-Acc) where pairs exist."""
        from train.report import report_main

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
        from dataclasses import asdict

        from train.stats import tmm_stats

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

    @app.command()
    def demo(
        out_dir: Path = typer.Option(Path("demo_out"), "--out", help="Output folder (reused: finished steps are skipped)."),
        quick: bool = typer.Option(False, "--quick", help="A much smaller run (smoke test, ~2 min)."),
    ) -> None:
        """The whole method on the embedded synthetic benchmark, with a Markdown report and plots."""
        from pipeline.demo import run_demo

        run_demo(out_dir, quick=quick, console=console)
