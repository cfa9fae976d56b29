"""``freezeframe manifest <format>``: build, validate and write a JSONL manifest.

One command per format of :data:`manifests.BUILDERS`; each prints a summary (rows per
split, classes). Problems (a :class:`~pipeline.errors.ManifestError` listing all of them) are
printed by :class:`freezeframe.cli.common.AppGroup`: no traceback, exit code 2.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from freezeframe.cli.common import console, new_app
from freezeframe.cli.common import out as out_console
from manifests import ManifestWarning, build_manifest
from pipeline.manifest import (
    ManifestRow,
    class_names,
    manifest_sha256,
    validate_manifest,
    write_manifest,
)

app = new_app("Build a JSONL manifest from a dataset's official annotation files.", name="manifest")

_OUT = typer.Option(..., "--out", "-o", help="JSONL manifest to write.")
_ROOT = typer.Option(..., "--root", help="Folder holding the videos.")
_ANN = typer.Option(..., "--annotations", help="Folder holding the official annotation files.")
_SPLITS = typer.Option(None, "--split", help="Split to include (repeat for several; default: all found).")
_CLASSES_FILE = typer.Option(None, "--classes-file", help="Class names, one per line (label = line order).")


def summary_table(rows: list[ManifestRow]) -> Table:
    """Rows per split: videos, labelled videos, distinct classes."""
    per_split: dict[str, list[ManifestRow]] = {}
    for r in rows:
        per_split.setdefault(r.split, []).append(r)
    table = Table(title=f"{len(rows)} rows")
    for col in ("split", "videos", "labelled", "classes"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, rs in per_split.items():
        labels = [r.label for r in rs if r.label is not None]
        table.add_row(split, str(len(rs)), str(len(labels)), str(len(set(labels))))
    return table


def run_builder(fmt: str, out_path: Path, **options: Any) -> list[ManifestRow]:
    """Build, validate, write ``out_path`` and print a summary (warnings on stderr)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ManifestWarning)
        rows = build_manifest(fmt, **options)
        validate_manifest(rows, check_files=False)  # files were checked by the builder
    for w in caught:
        console.print(
            Text("warning: ", style="bold yellow"), Text(str(w.message)), sep="", soft_wrap=True
        )
    path = write_manifest(rows, out_path)
    out_console.print(summary_table(rows))
    names = class_names(rows)
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        out_console.print(Text(f"{len(names)} classes: {shown}"))
    else:
        out_console.print("unlabelled")
    out_console.print(Text(f"wrote {path} (sha256 {manifest_sha256(rows)[:16]})"))
    return rows


def _opt_list(values: Optional[list[str]]) -> Optional[list[str]]:
    return list(values) if values else None


@app.command("ucf101")
def ucf101_cmd(
    root: Path = _ROOT,
    annotations: Path = _ANN,
    split_number: int = typer.Option(1, "--split-number", help="Official split 1, 2 or 3."),
    out: Path = _OUT,
) -> None:
    """UCF101: classInd.txt, trainlist0N.txt, testlist0N.txt; videos <root>/<Class>/<video>.avi."""
    run_builder("ucf101", out, root=root, annotations=annotations, split_number=split_number)


@app.command("hmdb51")
def hmdb51_cmd(
    root: Path = _ROOT,
    annotations: Path = _ANN,
    split_number: int = typer.Option(1, "--split-number", help="Official split 1, 2 or 3."),
    keep_unused: bool = typer.Option(False, "--keep-unused", help="Keep code-0 videos as split 'unused'."),
    out: Path = _OUT,
) -> None:
    """HMDB51: <class>_test_split<N>.txt files; videos <root>/<class>/<video>.avi."""
    run_builder(
        "hmdb51", out, root=root, annotations=annotations, split_number=split_number,
        keep_unused=keep_unused,
    )


@app.command("diving48")
def diving48_cmd(
    root: Path = _ROOT,
    annotations: Path = _ANN,
    splits: Optional[list[str]] = typer.Option(None, "--split", help="Split (repeatable; default train and test)."),
    file_template: str = typer.Option("Diving48_V2_{split}.json", help="Split file name pattern."),
    vocab_file: str = typer.Option("Diving48_vocab.json", help="Class vocabulary file."),
    out: Path = _OUT,
) -> None:
    """Diving48 V2: Diving48_V2_{train,test}.json + Diving48_vocab.json; videos <root>/<vid_name>.mp4."""
    run_builder(
        "diving48", out, root=root, annotations=annotations,
        splits=_opt_list(splits) or ["train", "test"], file_template=file_template,
        vocab_file=vocab_file,
    )


@app.command("kinetics400")
def kinetics400_cmd(
    root: Path = _ROOT,
    annotations: Path = _ANN,
    splits: Optional[list[str]] = _SPLITS,
    classes_file: Optional[Path] = _CLASSES_FILE,
    layout: str = typer.Option("auto", help="Video layout: auto, flat, split or split-label."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Drop rows whose video is missing."),
    extension: str = typer.Option("mp4", help="Video file extension."),
    out: Path = _OUT,
) -> None:
    """Kinetics-400: train.csv / validate.csv / test.csv; videos <youtube_id>_<start>_<end>.mp4."""
    run_builder(
        "kinetics400", out, root=root, annotations=annotations, splits=_opt_list(splits),
        classes_file=classes_file, layout=layout, allow_missing=allow_missing, extension=extension,
    )


@app.command("ssv2")
def ssv2_cmd(
    root: Path = _ROOT,
    annotations: Path = _ANN,
    splits: Optional[list[str]] = _SPLITS,
    extension: str = typer.Option("webm", help="Video file extension."),
    out: Path = _OUT,
) -> None:
    """Something-Something V2: labels.json, train.json, validation.json, test.json; <root>/<id>.webm."""
    run_builder(
        "ssv2", out, root=root, annotations=annotations, splits=_opt_list(splits), extension=extension
    )


@app.command("ava")
def ava_cmd(
    root: Path = _ROOT,
    annotations: Path = _ANN,
    file_list: str = typer.Option("ava_file_names_trainval_v2.1.txt", help="Movie file list."),
    train_csv: Optional[str] = typer.Option(None, help="e.g. ava_train_v2.2.csv: its movies get split 'train'."),
    val_csv: Optional[str] = typer.Option(None, help="e.g. ava_val_v2.2.csv: its movies get split 'val'."),
    split: str = typer.Option("trainval", help="Split of every movie when no CSV is given."),
    unassigned: Optional[str] = typer.Option(None, help="Split for movies in no given CSV (default: error)."),
    start: float = typer.Option(900.0, help="Segment start, seconds."),
    end: float = typer.Option(1800.0, help="Segment end, seconds."),
    out: Path = _OUT,
) -> None:
    """AVA: one unlabelled row per movie of the file list, trimmed to [900 s, 1800 s]."""
    run_builder(
        "ava", out, root=root, annotations=annotations, file_list=file_list, train_csv=train_csv,
        val_csv=val_csv, split=split, unassigned=unassigned, start=start, end=end,
    )


@app.command("folder")
def folder_cmd(
    root: Path = _ROOT,
    split: str = typer.Option("train", help="Split name of every row."),
    out: Path = _OUT,
) -> None:
    """Every video under a folder (recursive), unlabelled; video_id = relative path without extension."""
    run_builder("folder", out, root=root, split=split)


@app.command("folder-per-class")
def folder_per_class_cmd(
    root: Path = _ROOT,
    layout: str = typer.Option("auto", help="auto, class (<root>/<class>/) or split-class (<root>/<split>/<class>/)."),
    split: str = typer.Option("train", help="Split name for the 'class' layout."),
    classes_file: Optional[Path] = _CLASSES_FILE,
    out: Path = _OUT,
) -> None:
    """<root>/<class>/<video> (or <root>/<split>/<class>/<video>); labels = sorted class folders."""
    run_builder(
        "folder-per-class", out, root=root, layout=layout, split=split, classes_file=classes_file
    )


@app.command("webdataset")
def webdataset_cmd(
    shards: list[str] = typer.Argument(..., help="Tar shards, folders of *.tar or glob patterns."),
    split: str = typer.Option("train", help="Split name of every row."),
    classes_file: Optional[Path] = _CLASSES_FILE,
    out: Path = _OUT,
) -> None:
    """video2dataset/webdataset tar shards, read in place (paths are tar://<member>::<tar> URLs)."""
    run_builder("webdataset", out, shards=shards, split=split, classes_file=classes_file)

