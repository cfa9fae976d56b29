"""Kinetics-400 (Kay et al. 2017): ~240k train / 20k val / 40k test 10 s YouTube clips.

Official CSVs (``train.csv``, ``validate.csv`` (``val.csv`` in the CVDF mirror), ``test.csv``)::

    label,youtube_id,time_start,time_end,split[,is_cc]
    abseiling,--07WQ2iBlw,1,11,train

Older test CSVs have no ``label`` column: those rows are unlabelled. Video files are named
``<youtube_id>_<time_start:06d>_<time_end:06d>.mp4`` and lie in one of the layouts of
:data:`LAYOUTS` (``auto`` tries them all, per video). Labels index the sorted class names
of the train CSV unless an explicit class list is given. ``video_id`` is the file stem.

Many Kinetics videos have disappeared from YouTube, so local copies are often incomplete:
``allow_missing=True`` drops rows whose video is missing and emits one
:class:`~manifests._common.ManifestWarning` with the count per split.
"""
from __future__ import annotations

import csv
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from manifests._common import (
    BUILDERS,
    ManifestWarning,
    Problems,
    abs_dir,
    fail,
    find_split_files,
    finish,
    resolve_classes,
    sort_rows,
)
from pipeline.manifest import ManifestRow
from pipeline.registry import Registry

#: manifest split -> candidate CSV names (first existing wins).
SPLIT_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train.csv",),
    "val": ("validate.csv", "val.csv"),
    "test": ("test.csv",),
}
#: manifest split -> candidate folder names under the video root.
SPLIT_DIRS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "val": ("val", "validate", "valid", "validation"),
    "test": ("test",),
}
REQUIRED_COLUMNS = ("youtube_id", "time_start", "time_end")

#: Candidate paths of one video: (root, split, label or None, file name) -> paths.
LayoutFn = Callable[[Path, str, "str | None", str], list[Path]]
LAYOUTS: Registry[LayoutFn] = Registry("kinetics400 video layout")


def _split_dirs(root: Path, split: str) -> list[Path]:
    return [root / d for d in SPLIT_DIRS.get(split, (split,))]


def _label_dirs(label: str | None) -> list[str]:
    if label is None:
        return []
    return list(dict.fromkeys([label, label.replace(" ", "_")]))


@LAYOUTS.register("flat")
def _flat(root: Path, split: str, label: str | None, name: str) -> list[Path]:
    """``<root>/<file>.mp4``"""
    return [root / name]


@LAYOUTS.register("split")
def _by_split(root: Path, split: str, label: str | None, name: str) -> list[Path]:
    """``<root>/<split>/<file>.mp4`` (the CVDF download)"""
    return [d / name for d in _split_dirs(root, split)]


@LAYOUTS.register("split-label")
def _by_split_label(root: Path, split: str, label: str | None, name: str) -> list[Path]:
    """``<root>/<split>/<label>/<file>.mp4`` (the ActivityNet crawler; spaces or ``_``)"""
    return [d / lab / name for d in _split_dirs(root, split) for lab in _label_dirs(label)]


@LAYOUTS.register("auto")
def _auto(root: Path, split: str, label: str | None, name: str) -> list[Path]:
    """every layout above, in that order"""
    return (
        _flat(root, split, label, name)
        + _by_split(root, split, label, name)
        + _by_split_label(root, split, label, name)
    )


def video_file_name(youtube_id: str, time_start: int, time_end: int, extension: str) -> str:
    """``abc_000010_000020.mp4`` for a clip from 10 s to 20 s."""
    return f"{youtube_id}_{time_start:06d}_{time_end:06d}.{extension}"


def _seconds(text: str) -> int:
    value = float(text)
    if value != int(value) or value < 0:
        raise ValueError(text)
    return int(value)


def _read_csv(path: Path, problems: Problems) -> list[tuple[str | None, str, int, int]]:
    """``(label or None, youtube_id, time_start, time_end)`` of every valid CSV line."""
    out: list[tuple[str | None, str, int, int]] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            problems.add(
                f"{path.name}: header {header} lacks column(s) {missing}; expected "
                "'label,youtube_id,time_start,time_end,split'"
            )
            return out
        has_label = "label" in header
        for row in reader:
            lineno = reader.line_num
            try:
                yid = (row["youtube_id"] or "").strip()
                start, end = _seconds(row["time_start"]), _seconds(row["time_end"])
                if not yid:
                    raise ValueError("empty youtube_id")
            except (ValueError, TypeError, AttributeError):
                problems.add(f"{path.name} line {lineno}: malformed row {row!r}")
                continue
            label = (row.get("label") or "").strip() if has_label else ""
            out.append((label or None, yid, start, end))
    return out


@BUILDERS.register("kinetics400")
def build_kinetics400(
    *,
    root: str | os.PathLike,
    annotations: str | os.PathLike,
    splits: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    classes_file: str | os.PathLike | None = None,
    layout: str = "auto",
    allow_missing: bool = False,
    extension: str = "mp4",
) -> list[ManifestRow]:
    """Manifest of Kinetics-400 (works for the same CSV format of K600/K700).

    Args:
        root: video folder, in one of the :data:`LAYOUTS`.
        annotations: folder holding ``train.csv`` / ``validate.csv`` / ``test.csv``.
        splits: any of ``train``, ``val``, ``test``; None = every split whose CSV exists.
        classes, classes_file: explicit class list (label = position); default: sorted
            labels of the train CSV.
        layout: ``auto``, ``flat``, ``split`` or ``split-label``.
        allow_missing: drop rows whose video is missing (one ManifestWarning with counts)
            instead of listing them as errors.
        extension: video file extension.

    Raises:
        ManifestError: listing every malformed line, unknown label, duplicate id and (unless
            ``allow_missing``) missing video.
    """
    if layout not in LAYOUTS:
        raise fail("kinetics400", f"unknown layout {layout!r}; choose one of {LAYOUTS.names()}")
    candidates = LAYOUTS.get(layout)
    root_p, ann = abs_dir(root), abs_dir(annotations)
    problems = Problems()
    hint = "check --annotations (the CSV folder) and --root" + (
        "" if allow_missing else "; or pass allow_missing=True (--allow-missing) to drop missing videos"
    )

    csv_paths = find_split_files("kinetics400", ann, SPLIT_FILES, splits, problems, "CSV")
    if splits is None and not csv_paths:
        problems.add(f"no Kinetics CSV ({', '.join(n for v in SPLIT_FILES.values() for n in v)}) in {str(ann)!r}")
    entries = {split: _read_csv(p, problems) for split, p in csv_paths.items()}

    class_list = resolve_classes(classes, classes_file, problems)
    if class_list is None:
        labelled = any(lab is not None for rows in entries.values() for lab, *_ in rows)
        if "train" in entries:
            class_list = sorted({lab for lab, *_ in entries["train"] if lab is not None})
        elif labelled:
            problems.add("labels need the train CSV (for the class list) or classes/classes_file")
            class_list = []
        else:
            class_list = []
    class_of = {name: i for i, name in enumerate(class_list)}

    rows: list[ManifestRow] = []
    missing: list[str] = []
    dropped: Counter[str] = Counter()
    for split, items in entries.items():
        for label_name, yid, start, end in items:
            if label_name is not None and label_name not in class_of:
                problems.add(f"{csv_paths[split].name}: unknown label {label_name!r} for {yid}")
                continue
            name = video_file_name(yid, start, end, extension)
            paths = candidates(root_p, split, label_name, name)
            path = next((p for p in paths if p.is_file()), None)
            if path is None:
                if allow_missing:
                    dropped[split] += 1
                else:
                    missing.append(f"missing video file {name!r} ({split}; looked for {str(paths[0])!r}"
                                   + (f" and {len(paths) - 1} other place(s))" if len(paths) > 1 else ")"))
                continue
            rows.append(
                ManifestRow(
                    video_id=name.rsplit(".", 1)[0],
                    path=str(path),
                    split=split,
                    label=None if label_name is None else class_of[label_name],
                    label_name=label_name,
                )
            )
    problems.items.extend(missing)
    if dropped:
        per_split = ", ".join(f"{s}: {n}" for s, n in sorted(dropped.items()))
        warnings.warn(
            ManifestWarning(
                f"kinetics400: dropped {sum(dropped.values())} row(s) whose video is missing "
                f"({per_split}) under {root_p}"
            ),
            stacklevel=2,
        )
    return finish(
        "kinetics400",
        sort_rows(rows),
        problems,
        source=str(ann),
        check_files=False,
        num_classes=len(class_list) or None,
        hint=hint,
    )
