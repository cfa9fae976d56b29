"""Split tables: which split (and label) each video belongs to, chosen when training.

A split table is a JSON Lines file, one object per video with ``video_id`` and ``split`` and,
optionally, ``label`` / ``label_name`` (a manifest is one: its other fields are ignored)::

    {"video_id": "v_ApplyEyeMakeup_g08_c01", "split": "train", "label": 0}

The feature store keeps the videos and their features; a table given at training time
(``data.splits``) replaces the splits (and, where the table has them, the labels) recorded at
extraction, so UCF101 split 2 or a k-fold trains from one store without re-extraction
(:meth:`pipeline.store.FeatureStore.apply_split_table`). Videos of the store missing from the
table are in no split.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from pipeline.errors import ManifestError
from pipeline.fileio import atomic_write_text

__all__ = ["SplitEntry", "read_split_table", "write_split_table", "split_table_sha256"]


@dataclass(frozen=True)
class SplitEntry:
    """One video's split; ``has_label``: the table gives its label (``label`` may be None:
    unlabelled), else the store's label is kept."""

    split: str
    label: int | None = None
    label_name: str | None = None
    has_label: bool = False


def read_split_table(path: str | os.PathLike) -> dict[str, SplitEntry]:
    """``video_id -> SplitEntry`` of a split table; every malformed line is reported together
    (:class:`~pipeline.errors.ManifestError`)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"split table {path} does not exist; give a manifest or a JSONL file of "
                            '{"video_id": ..., "split": ...} lines')
    table: dict[str, SplitEntry] = {}
    problems: list[str] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"line {n}: not JSON ({e.msg})")
            continue
        if not isinstance(d, dict):
            problems.append(f"line {n}: expected an object, got {type(d).__name__}")
            continue
        vid, split = d.get("video_id"), d.get("split")
        if not isinstance(vid, str) or not vid:
            problems.append(f"line {n}: video_id must be a non-empty string, got {vid!r}")
            continue
        if not isinstance(split, str) or not split:
            problems.append(f"line {n}: split of {vid!r} must be a non-empty string, got {split!r}")
            continue
        label = d.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
            problems.append(f"line {n}: label of {vid!r} must be an integer >= 0 or null, got {label!r}")
            continue
        name = d.get("label_name")
        if name is not None and not isinstance(name, str):
            problems.append(f"line {n}: label_name of {vid!r} must be a string or null, got {name!r}")
            continue
        if vid in table:
            problems.append(f"line {n}: video {vid!r} listed twice")
            continue
        table[vid] = SplitEntry(split, label, name, "label" in d)
    if problems:
        raise ManifestError(f"split table {path} has {len(problems)} problem(s)", problems)
    if not table:
        raise ManifestError(f"split table {path} lists no video")
    return table


def write_split_table(entries: Mapping[str, SplitEntry] | Iterable[tuple[str, SplitEntry]],
                      path: str | os.PathLike) -> Path:
    """Write a split table (atomically), one line per video in the given order."""
    items = entries.items() if isinstance(entries, Mapping) else entries
    lines = []
    for vid, e in items:
        d: dict = {"video_id": vid, "split": e.split}
        if e.has_label:
            d["label"] = e.label
            if e.label_name is not None:
                d["label_name"] = e.label_name
        lines.append(json.dumps(d) + "\n")
    return atomic_write_text(path, "".join(lines))


def split_table_sha256(table: Mapping[str, SplitEntry]) -> str:
    """Digest of a table's content (order-independent): recorded in checkpoints, compared on resume."""
    rows = sorted((vid, e.split, e.label, e.label_name, e.has_label) for vid, e in table.items())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()
