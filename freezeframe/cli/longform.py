"""Long-form commands: ``synth-longform``, ``pretext`` (on a store), ``pretext-online`` (from
videos read once), ``longform-experiment`` (the comparison in one call). docs/longform.md.

Each command resolves its config and calls one library function (:func:`synth.longform.write_longform`,
:func:`train.loop.fit`, :func:`train.online_fit.fit_online`, :func:`train.longform_experiment.run_experiment`).
This module is imported only when one of its commands runs (it brings torch)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from extract.config import resolve_extract_config
from extract.source import OnlineFeatureSource
from freezeframe.cli.common import console, flag_overrides, new_app, out
from pipeline.errors import FreezeframeError
from pipeline.manifest import ManifestRow, read_manifest
from pipeline.paths import project_root
from pipeline.store import open_store
from synth.longform import LongformConfig, write_longform
from train.config import resolve_train_config
from train.longform_experiment import load_experiment, run_experiment
from train.loop import fit
from train.online import decoded_chunks
from train.online_fit import OnlineConfig, StreamInfo, fit_online

app = new_app("Long-form pre-training: synth-longform, pretext, pretext-online, longform-experiment.")

_SET = typer.Option([], "--set", metavar="KEY=VALUE", show_default=False,
                    help="Override any training config field (repeatable).")


@app.command("synth-longform")
def synth_longform(
    out_dir: Path = typer.Argument(..., help="Folder to write the long-form benchmark into."),
    seconds: Optional[float] = typer.Option(None, help="Length of each long video (s).", show_default="180"),
    size: Optional[int] = typer.Option(None, help="Frame side (px).", show_default="64"),
    pretrain_videos: Optional[int] = typer.Option(None, help="Unlabelled long videos.", show_default="4"),
    seed: Optional[int] = typer.Option(None, help="Random seed.", show_default="0"),
) -> None:
    """Write the embedded long-form benchmark (long videos of shots with cuts + labelled action clips)."""
    given = {k: v for k, v in dict(seconds=seconds, size=size, pretrain_videos=pretrain_videos,
                                   seed=seed).items() if v is not None}
    path = write_longform(out_dir, dataclasses.replace(LongformConfig(), **given))
    out.print(f"long videos: {path / 'pretrain.jsonl'}\naction clips: {path / 'actions.jsonl'}")


@app.command()
def pretext(
    task: str = typer.Argument(..., help="moco | mfm | distill (any registered training task)."),
    dataset: Optional[str] = typer.Option(None, help="Training config train/configs/<name>.toml (e.g. synth-longform, ava)."),
    config: Optional[Path] = typer.Option(None, help="TOML config file ([common], [longform] tables)."),
    store: Optional[Path] = typer.Option(None, help="Feature store of long videos (overrides data.store).", show_default=False),
    run_dir: Optional[Path] = typer.Option(None, help="Run directory (resumed if it exists).", show_default=False),
    order: Optional[str] = typer.Option(None, help="sequential | random (TASK.stream.order).", show_default="sequential"),
    stride: Optional[int] = typer.Option(None, help="Clip stride in frames (TASK.stream.stride_frames).", show_default="16"),
    set_: list[str] = _SET,
) -> None:
    """Long-form pre-training of the TMM with a pretext task on a store, clips in stream order."""
    cfg = resolve_train_config(task, dataset, config, flag_overrides(**{
        "data.store": store, "run_dir": run_dir, f"{task}.stream.order": order,
        f"{task}.stream.stride_frames": stride}) + list(set_))
    res = fit(cfg, console)
    out.print(f"run {res.run_dir}: {res.steps} steps, final loss {res.final_loss:.4f}")


@app.command("pretext-online")
def pretext_online(
    task: str = typer.Argument(..., help="moco | mfm | distill."),
    video: list[str] = typer.Option([], help="A video file or URL PyAV can open (repeatable, read in order).", show_default=False),
    manifest: Optional[Path] = typer.Option(None, help="A manifest of videos, read in its order.", show_default=False),
    like_store: Optional[Path] = typer.Option(None, help="Compute the features this store holds (its extraction config).", show_default=False),
    extract_dataset: Optional[str] = typer.Option(None, help="Extraction defaults from manifests/configs/<name>.toml.", show_default=False),
    extract_set: list[str] = typer.Option([], help="Extraction override KEY=VALUE (e.g. fps=8, backbone=..., weights=...).", show_default=False),
    dataset: Optional[str] = typer.Option(None, help="Training config train/configs/<name>.toml ([common] + [longform])."),
    config: Optional[Path] = typer.Option(None, help="Training TOML config file."),
    run_dir: Optional[Path] = typer.Option(None, help="Run directory (a stopped stream resumes where it stopped).", show_default=False),
    buffer: int = typer.Option(64, help="Clips read ahead of the trainer (bounded FIFO)."),
    replay: int = typer.Option(0, help="Replay buffer capacity in clips (0: off)."),
    updates_per_batch: int = typer.Option(1, help="Updates per incoming batch (>1 draws from the replay buffer)."),
    warmup_steps: int = typer.Option(0, help="Linear learning-rate warmup steps (then constant)."),
    set_: list[str] = _SET,
) -> None:
    """Pre-train from videos read once in time order (decode + frozen backbone, no store)."""
    rows = read_manifest(manifest) if manifest else []
    rows += [ManifestRow(f"{i:05d}-{Path(v).stem}", v) for i, v in enumerate(video)]
    if not rows:
        raise FreezeframeError("give the videos to read: --video PATH_OR_URL (repeatable) or --manifest FILE")
    if like_store:
        source = OnlineFeatureSource.for_store(open_store(like_store), rows)
    else:
        source = OnlineFeatureSource(resolve_extract_config(extract_dataset, None, list(extract_set)), rows)
    s = source.geometry.size
    shape = tuple(int(n) for n in source.encode(np.zeros((1, s, s, 3), np.uint8)).shape[1:])
    cfg = resolve_train_config(task, dataset, config, flag_overrides(run_dir=run_dir) + list(set_))
    online = OnlineConfig(buffer=buffer, replay=replay, updates_per_batch=updates_per_batch, warmup_steps=warmup_steps)
    info = StreamInfo(shape, ", ".join(r.path for r in rows[:3]) + (" ..." if len(rows) > 3 else ""))
    res = fit_online(cfg, [r.video_id for r in rows], decoded_chunks(source), info, online, console)
    out.print(f"run {res.run_dir}: {res.steps} steps, final loss {res.final_loss:.4f}")


@app.command("longform-experiment")
def longform_experiment(
    config: Path = typer.Option(project_root() / "train/configs/experiments/longform-synth.toml",
                                help="Experiment file ([experiment] table); default: the shipped one."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", show_default=False,
                                   help="Experiment override (e.g. 'strides=[8,16]', 'seeds=[0,1,2]')."),
    parallel: int = typer.Option(1, help="Arms (pre-training + its fine-tuning) trained side by side, one process each "
                             "(0 = as many as the cores hold at --threads each)."),
    threads: int = typer.Option(0, help="Torch threads of each run (0: this process's count, or cores / --parallel)."),
) -> None:
    """{sequential, random} x {moco, mfm, distill} pre-training, fine-tuning, table + plot (resumable)."""
    exp = load_experiment(config, tuple(set_))
    runs = run_experiment(exp, console, progress=lambda msg: console.log(msg), workers=parallel, threads=threads)
    for r in runs:
        out.print(f"{r.label:32s} top-1 {'-' if r.top1 is None else f'{100 * r.top1:.1f}%'}")
    out.print(f"report: {Path(exp.out) / 'report.md'}")
