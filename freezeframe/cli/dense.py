"""Dense evaluation: synth-davis, dense-extract, propagate, davis-eval, jhmdb-eval, vip-eval.

``propagate`` writes results in the official layout and prints the benchmark's scores;
``*-eval`` scores any results folder in that layout (ours or another method's). ``--json``
prints one JSON object (DAVIS: ``J_mean``, ``F_mean``, ``JF_mean``, ``per_sequence``, ...).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from freezeframe.cli.common import console as err
from freezeframe.cli.common import new_app, out
from pipeline.errors import FreezeframeError

app = new_app("Dense evaluation: label propagation on DAVIS-2017, JHMDB and VIP from cached features.")

_DAVIS = typer.Option(None, "--davis", help="DAVIS-2017 folder (ImageSets/, JPEGImages/480p/, Annotations/480p/).")
_JHMDB = typer.Option(None, "--jhmdb", help="JHMDB folder (Rename_Images/, joint_positions/, splits/).")
_VIP = typer.Option(None, "--vip", help="VIP_Fine folder (lists/, Images/, Annotations/Category_ids/).")
_SPLIT = typer.Option(None, "--split", help="Split (default: val for DAVIS and VIP, test for JHMDB).")
_JSON = typer.Option(False, "--json", help="Print one JSON object instead of a table.")
_DEFAULT_SPLIT = {"davis2017": "val", "vip": "val", "jhmdb": "test"}


def _benchmark(davis: Optional[Path], jhmdb: Optional[Path], vip: Optional[Path], split: Optional[str]):
    """``(benchmark name, videos)`` from exactly one of --davis / --jhmdb / --vip."""
    from manifests.dense import build_dense  # lazy: keeps `freezeframe --help` light

    given = [(n, r) for n, r in (("davis2017", davis), ("jhmdb", jhmdb), ("vip", vip)) if r is not None]
    if len(given) != 1:
        raise FreezeframeError("give exactly one of --davis ROOT, --jhmdb ROOT, --vip ROOT")
    name, root = given[0]
    return name, build_dense(name, root=root, split=split or _DEFAULT_SPLIT[name])


def _print_scores(name: str, scores: dict, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(scores))
        return
    if name == "davis2017":
        t = Table(title=f"DAVIS-2017: J&F-mean {100 * scores['JF_mean']:.1f}")
        for c in ("sequence", "J&F", "J", "F"):
            t.add_column(c, justify="left" if c == "sequence" else "right")
        for seq, s in scores["per_sequence"].items():
            t.add_row(seq, f"{100 * s['JF_mean']:.1f}", f"{100 * s['J_mean']:.1f}", f"{100 * s['F_mean']:.1f}")
        t.add_row("mean (over objects)", f"{100 * scores['JF_mean']:.1f}", f"{100 * scores['J_mean']:.1f}",
                  f"{100 * scores['F_mean']:.1f}", style="bold")
        out.print(t)
    elif name == "vip":
        out.print(f"VIP mIoU {100 * scores['mIoU']:.1f}")
    else:
        out.print(f"JHMDB PCK@{scores['alpha']} {100 * scores['PCK']:.1f}")


@app.command("synth-davis")
def synth_davis_cmd(
    out_dir: Path = typer.Argument(..., help="Folder to write (DAVIS-2017 layout)."),
    sequences: int = typer.Option(3, help="Sequences in val.txt."),
    frames: int = typer.Option(24, help="Frames per sequence."),
    height: int = typer.Option(192, help="Frame height in pixels."),
    width: int = typer.Option(352, help="Frame width in pixels."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Synthetic DAVIS-layout data: textured objects that move, turn and occlude, exact masks."""
    from synth.davis import SynthDavisConfig, write_synth_davis  # lazy: keeps the CLI start-up light

    cfg = SynthDavisConfig(val_sequences=sequences, frames=frames, height=height, width=width, seed=seed)
    root = write_synth_davis(out_dir, cfg)
    out.print(f"wrote {sequences} sequence(s) of {frames} frames ({width}x{height}) to {root}")


@app.command("dense-extract")
def dense_extract_cmd(
    store: Path = typer.Option(..., "--store", help="Dense feature store to write (resumes if present)."),
    davis: Optional[Path] = _DAVIS,
    jhmdb: Optional[Path] = _JHMDB,
    vip: Optional[Path] = _VIP,
    split: Optional[str] = _SPLIT,
    backbone: str = typer.Option("mobilenetv2-imagenet", help="Backbone name."),
    weights: Optional[Path] = typer.Option(None, help="Local checkpoint file of the backbone."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Untrained backbone (tests only)."),
    size_policy: Optional[str] = typer.Option(None, help="davis, jhmdb, vip or native (default: the benchmark's)."),
    dtype: str = typer.Option("float16", help="Stored dtype: float16, float32, int8."),
    videos_dir: Optional[Path] = typer.Option(
        None, "--videos", help="Decode DIR/<video_id>.mp4 (.mkv, ...) instead of reading each video's frame files."),
    fps: float = typer.Option(24.0, help="Frame rate: timestamps of frame files; frames of --videos are selected at it."),
    batch_size: int = typer.Option(8, help="Frames per forward."),
    device: str = typer.Option("cpu", help="Device of the backbone."),
) -> None:
    """Every frame of a benchmark's videos through the backbone at the protocol's input size."""
    from extract.dense import DenseExtractConfig, extract_dense  # lazy: torch only when the command runs
    from manifests.dense import with_video_files
    from train.dense.evaluate import BENCHMARKS

    name, videos = _benchmark(davis, jhmdb, vip, split)
    if videos_dir is not None:
        videos = with_video_files(videos, videos_dir)
    cfg = DenseExtractConfig(backbone=backbone, weights=str(weights) if weights else None,
                             random_weights=random_weights,
                             size_policy=size_policy or BENCHMARKS.get(name).size_policy,
                             dtype=dtype, fps=fps, batch_size=batch_size, device=device)
    extract_dense(videos, store, cfg, progress=lambda vid, i, n: err.print(f"[{i}/{n}] {vid}"))
    out.print(f"{len(videos)} video(s) in {store}")


@app.command("propagate")
def propagate_cmd(
    store: Path = typer.Option(..., "--store", help="Dense feature store of the benchmark's frames."),
    out_dir: Path = typer.Option(..., "--out", help="Results folder: DIR/<video>/<frame>.png."),
    davis: Optional[Path] = _DAVIS,
    jhmdb: Optional[Path] = _JHMDB,
    vip: Optional[Path] = _VIP,
    split: Optional[str] = _SPLIT,
    projection: Optional[Path] = typer.Option(None, "--projection", help="A Co-Settle run: propagate g(tokens)."),
    topk: Optional[int] = typer.Option(None, help="Top-k (default: the benchmark's, 7; VIP 10)."),
    context: int = typer.Option(20, help="Context frames before the target (plus the first)."),
    radius: float = typer.Option(20.0, help="Spatial radius in feature cells."),
    temperature: float = typer.Option(0.7, help="Affinity temperature."),
    device: str = typer.Option("cpu", help="Device of the propagation."),
    as_json: bool = _JSON,
) -> None:
    """Propagate the first frame's labels through every video, write results, print scores."""
    from train.dense.evaluate import BENCHMARKS, propagate_store, score_results  # lazy: torch
    from train.dense.propagate import PropagationConfig

    name, videos = _benchmark(davis, jhmdb, vip, split)
    bench = BENCHMARKS.get(name)
    cfg = PropagationConfig(context=context, radius=radius, temperature=temperature, topk=topk or bench.topk)
    proj = _load_projection(projection) if projection is not None else None
    propagate_store(store, videos, out_dir, cfg, projection=proj, device=device,
                    progress=lambda vid, i, n: err.print(f"[{i}/{n}] {vid}"))
    _print_scores(name, score_results(name, videos, out_dir), as_json)


def _load_projection(run: Path):
    """g of a Co-Settle run (``train.project.load_projection``, issue 8)."""
    if importlib.util.find_spec("train.project") is None:
        raise FreezeframeError("--projection needs the Co-Settle projection (train/project.py), not in this build")
    project = importlib.import_module("train.project")  # lazy: only with --projection
    return project.load_projection(run)


def _eval(name: str, root: Path, results: Path, split: Optional[str], as_json: bool) -> None:
    from manifests.dense import build_dense  # lazy: torch via the scorers
    from train.dense.evaluate import score_results

    videos = build_dense(name, root=root, split=split or _DEFAULT_SPLIT[name])
    _print_scores(name, score_results(name, videos, results), as_json)


@app.command("davis-eval")
def davis_eval_cmd(
    davis: Path = typer.Option(..., "--davis", help="DAVIS-2017 folder."),
    results: Path = typer.Option(..., "--results", help="Results folder: DIR/<seq>/<frame>.png palette PNGs."),
    split: Optional[str] = _SPLIT,
    as_json: bool = _JSON,
) -> None:
    """Official DAVIS-2017 semi-supervised J and F of any results folder."""
    _eval("davis2017", davis, results, split, as_json)


@app.command("jhmdb-eval")
def jhmdb_eval_cmd(
    jhmdb: Path = typer.Option(..., "--jhmdb", help="JHMDB folder."),
    results: Path = typer.Option(..., "--results", help="Results folder: DIR/<class>/<video>/joints.json."),
    split: Optional[str] = _SPLIT,
    as_json: bool = _JSON,
) -> None:
    """JHMDB PCK@0.1 of any results folder."""
    _eval("jhmdb", jhmdb, results, split, as_json)


@app.command("vip-eval")
def vip_eval_cmd(
    vip: Path = typer.Option(..., "--vip", help="VIP_Fine folder."),
    results: Path = typer.Option(..., "--results", help="Results folder: DIR/<video>/<frame>.png."),
    split: Optional[str] = _SPLIT,
    as_json: bool = _JSON,
) -> None:
    """VIP part mIoU of any results folder."""
    _eval("vip", vip, results, split, as_json)

