"""Long-form commands: pretext (on a store), pretext-online (from videos), longform-experiment, synth-longform.

Registered by ``train.cli.register``; command bodies import the training stack lazily
(`freezeframe --help` must not load torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

console = Console(stderr=True)
out = Console()


def register(app: typer.Typer) -> None:
    @app.command()
    def pretext(
        task: str = typer.Argument(..., help="moco | mfm | distill (any registered training task)."),
        dataset: Optional[str] = typer.Option(None, help="Training config in train/configs (e.g. synth-longform, ava)."),
        config: Optional[Path] = typer.Option(None, help="TOML config file ([common], [longform] tables)."),
        store: Optional[Path] = typer.Option(None, help="Feature store of long videos (overrides data.store)."),
        run_dir: Optional[Path] = typer.Option(None, help="Run directory (resumed if it exists)."),
        order: Optional[str] = typer.Option(None, help="sequential | random (TASK.stream.order)."),
        stride: Optional[int] = typer.Option(None, help="Clip stride in frames (TASK.stream.stride_frames)."),
        set_: list[str] = typer.Option([], "--set", help="Override any config field: key=value."),
    ) -> None:
        """Long-form pre-training of the TMM with a pretext task on a store, clips in stream order."""
        from pipeline.cli import flag_overrides
        from train.config import resolve_train_config
        from train.loop import fit

        cfg = resolve_train_config(task, dataset, config, flag_overrides(**{
            "data.store": str(store) if store else None, "run_dir": str(run_dir) if run_dir else None,
            f"{task}.stream.order": order, f"{task}.stream.stride_frames": stride}) + list(set_))
        res = fit(cfg, console)
        out.print(f"run {res.run_dir}: {res.steps} steps, final loss {res.final_loss:.4f}")

    @app.command("pretext-online")
    def pretext_online(
        task: str = typer.Argument(..., help="moco | mfm | distill."),
        video: list[str] = typer.Option([], help="A video file or URL PyAV can open (repeat for a list, read in order)."),
        manifest: Optional[Path] = typer.Option(None, help="A manifest of videos, read in its order."),
        like_store: Optional[Path] = typer.Option(None, help="Compute the features this store holds (its extraction config)."),
        extract_dataset: Optional[str] = typer.Option(None, help="Extraction defaults from manifests/configs/<name>.toml."),
        extract_set: list[str] = typer.Option([], help="Extraction override key=value (e.g. fps=8, backbone=..., weights=...)."),
        dataset: Optional[str] = typer.Option(None, help="Training config in train/configs ([common] + [longform])."),
        config: Optional[Path] = typer.Option(None, help="Training TOML config file."),
        run_dir: Optional[Path] = typer.Option(None, help="Run directory (a stopped stream resumes where it stopped)."),
        buffer: int = typer.Option(64, help="Clips read ahead of the trainer (bounded FIFO)."),
        replay: int = typer.Option(0, help="Replay buffer capacity in clips (0: off)."),
        updates_per_batch: int = typer.Option(1, help="Updates per incoming batch (>1 draws from the replay buffer)."),
        warmup_steps: int = typer.Option(0, help="Linear learning-rate warmup steps (then constant)."),
        set_: list[str] = typer.Option([], "--set", help="Training override key=value."),
    ) -> None:
        """Pre-train from videos read once in time order (decode + frozen backbone, no store)."""
        import numpy as np

        from extract.config import resolve_extract_config
        from extract.source import OnlineFeatureSource
        from pipeline.cli import flag_overrides
        from pipeline.errors import FreezeframeError
        from pipeline.manifest import ManifestRow, read_manifest
        from pipeline.store import open_store
        from train.config import resolve_train_config
        from train.online import decoded_chunks
        from train.online_fit import OnlineConfig, StreamInfo, fit_online

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
        cfg = resolve_train_config(task, dataset, config, flag_overrides(
            run_dir=str(run_dir) if run_dir else None) + list(set_))
        online = OnlineConfig(buffer=buffer, replay=replay, updates_per_batch=updates_per_batch, warmup_steps=warmup_steps)
        info = StreamInfo(shape, ", ".join(r.path for r in rows[:3]) + (" ..." if len(rows) > 3 else ""))
        res = fit_online(cfg, [r.video_id for r in rows], decoded_chunks(source), info, online, console)
        out.print(f"run {res.run_dir}: {res.steps} steps, final loss {res.final_loss:.4f}")

    @app.command("longform-experiment")
    def longform_experiment(
        config: Path = typer.Option(Path("train/configs/experiments/longform-synth.toml"),
                                    help="Experiment file ([experiment] table)."),
        set_: list[str] = typer.Option([], "--set", help="Experiment override key=value (e.g. strides=[8,16])."),
    ) -> None:
        """{sequential, random} x {moco, mfm, distill} pre-training, fine-tuning, table + plot (resumable)."""
        from train.longform_experiment import load_experiment, run_experiment

        exp = load_experiment(config, tuple(set_))
        runs = run_experiment(exp, console, progress=lambda msg: console.log(msg))
        for r in runs:
            top1 = "-" if r.top1 is None else f"{100 * r.top1:.1f}%"
            out.print(f"{r.label:32s} top-1 {top1}")
        out.print(f"report: {Path(exp.out) / 'report.md'}")

    @app.command("synth-longform")
    def synth_longform(
        out_dir: Path = typer.Argument(..., help="Folder to write the long-form benchmark into."),
        seconds: Optional[float] = typer.Option(None, help="Length of each long video (s)."),
        size: Optional[int] = typer.Option(None, help="Frame side (px)."),
        pretrain_videos: Optional[int] = typer.Option(None, help="Unlabelled long videos."),
        seed: Optional[int] = typer.Option(None, help="Random seed."),
    ) -> None:
        """Write the embedded long-form benchmark (long videos with shots + labelled action clips)."""
        import dataclasses

        from synth.longform import LongformConfig, write_longform

        given = {k: v for k, v in dict(seconds=seconds, size=size, pretrain_videos=pretrain_videos,
                                       seed=seed).items() if v is not None}
        path = write_longform(out_dir, dataclasses.replace(LongformConfig(), **given))
        out.print(f"long videos: {path / 'pretrain.jsonl'}\naction clips: {path / 'actions.jsonl'}")
