"""The one manifest format: JSON Lines, one video (or trimmed segment) per line.

Each line is an object with the fields of :class:`ManifestRow`::

    {"video_id": "v_ApplyEyeMakeup_g08_c01", "path": "/data/ucf101/ApplyEyeMakeup/v_...avi",
     "split": "train", "label": 0, "label_name": "ApplyEyeMakeup"}

``path`` is a local path or an fsspec URL. A member of a tar shard is addressed with
fsspec's chained URL ``tar://<member>::<path-to-tar>``, so webdataset shards are read in
place without unpacking. ``start``/``end`` (seconds, optional) trim a segment out of a
longer video; several rows may then share one ``path`` with distinct ``video_id``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import typing
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.config import check_value
from pipeline.errors import ManifestError
from pipeline.fileio import atomic_write_lines


@dataclass(frozen=True)
class ManifestRow:
    """One video or trimmed segment.

    Attributes:
        video_id: stable, unique identifier (used as the key everywhere downstream).
        path: local path or fsspec URL of the encoded video.
        split: e.g. ``train``, ``val``, ``test``.
        label: class index (int), or None for unlabelled data.
        label_name: human-readable class name, or None.
        start: segment start in seconds (None: from the beginning).
        end: segment end in seconds (None: to the end).
    """

    video_id: str
    path: str
    split: str = "train"
    label: int | None = None
    label_name: str | None = None
    start: float | None = None
    end: float | None = None

    def to_json(self) -> str:
        d = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(d, sort_keys=False, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> "ManifestRow":
        """A row from a decoded JSON object, every field checked for type and value.

        ``video_id``, ``path`` and ``split`` must be non-empty strings (a null is refused,
        never turned into ``"None"``), ``label`` an integer (``1.7`` and ``true`` are
        refused), ``label_name`` a string, ``start``/``end`` finite seconds with
        ``0 <= start < end``.

        Raises:
            ManifestError: listing every problem of the row (one per line, ``field: ...``).
        """
        problems = row_problems(d)
        if problems:
            raise ManifestError(f"invalid manifest row: {len(problems)} problem(s)", problems)
        hints = typing.get_type_hints(cls)
        return cls(**{k: check_value(hints[k], v, k)[0] for k, v in d.items()})


_REQUIRED = ("video_id", "path")
_NON_EMPTY = ("video_id", "path", "split")


def row_problems(d: object) -> list[str]:
    """Every problem of a manifest row given as a decoded JSON object (empty: it is valid)."""
    if not isinstance(d, dict):
        return [f"expected a JSON object, got {d!r}"]
    hints = typing.get_type_hints(ManifestRow)
    names = [f.name for f in fields(ManifestRow)]
    problems = [f"unknown manifest field {k!r}; known fields: {names}" for k in sorted(set(d) - set(names))]
    problems += [f"{k}: missing (a manifest row needs 'video_id' and 'path')" for k in _REQUIRED if k not in d]
    values: dict[str, object] = {}
    for k in names:
        if k not in d:
            continue
        values[k], found = check_value(hints[k], d[k], k)
        problems += found
        if found:
            values.pop(k)
    for k in _NON_EMPTY:
        if isinstance(values.get(k), str) and not values[k].strip():
            problems.append(f"{k}: expected a non-empty string, got {d[k]!r}")
    for k in ("start", "end"):
        v = values.get(k)
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(f"{k}: expected a finite number of seconds, got {d[k]!r}")
            values.pop(k)
    start, end = values.get("start"), values.get("end")
    if isinstance(start, float) and start < 0:
        problems.append(f"start: expected seconds >= 0, got {d['start']!r}")
    if isinstance(start, float) and isinstance(end, float) and not start < end:
        problems.append(f"start {start} s must be before end {end} s")
    if isinstance(end, float) and start is None and not end > 0:
        problems.append(f"end: expected seconds > 0, got {d['end']!r}")
    return problems


def write_manifest(rows: Iterable[ManifestRow], path: str | os.PathLike) -> Path:
    """Write rows as JSON Lines (atomically: temp file then rename). Returns the path."""
    return atomic_write_lines(path, (row.to_json() for row in rows))


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a JSONL manifest; every problem of every line is reported at once (one
    :class:`ManifestError`, one ``line N: field: problem`` entry each)."""
    rows: list[ManifestRow] = []
    problems: list[str] = []
    if not os.path.isfile(path):
        raise ManifestError(f"manifest {path} does not exist; build one with "
                            f"`freezeframe manifest FORMAT ... --out {path}`")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                d = json.loads(line)
            except ValueError as e:
                problems.append(f"line {lineno}: {e}")
                continue
            found = row_problems(d)
            if found:
                problems += [f"line {lineno}: {p}" for p in found]
            else:
                rows.append(ManifestRow.from_dict(d))
    if problems:
        lines = len({p.split(":")[0] for p in problems})
        raise ManifestError(f"{path}: {len(problems)} problem(s) on {lines} malformed line(s)", problems)
    return rows


def manifest_sha256(rows: Sequence[ManifestRow]) -> str:
    """Hash of the manifest's content (order-sensitive: order decides store shards)."""
    h = hashlib.sha256()
    for r in rows:
        h.update(r.to_json().encode())
        h.update(b"\n")
    return h.hexdigest()


def path_exists(path: str) -> bool:
    """True if a local path or fsspec URL exists."""
    if "://" not in path:
        return os.path.exists(path)
    import fsspec

    try:
        fs, p = fsspec.core.url_to_fs(path)
        return fs.exists(p)
    except (FileNotFoundError, OSError, ValueError):
        return False


def validate_manifest(
    rows: Sequence[ManifestRow],
    *,
    check_files: bool = True,
    num_classes: int | None = None,
) -> None:
    """Raise one :class:`ManifestError` listing *all* problems.

    Checks: duplicate ``video_id``; missing files (when ``check_files``); labels outside
    ``[0, num_classes)``; one label index used with two names (or vice versa);
    ``start >= end``.
    """
    problems: list[str] = []
    dups = [vid for vid, n in Counter(r.video_id for r in rows).items() if n > 1]
    problems += [f"duplicate video_id {vid!r}" for vid in sorted(dups)]
    if check_files:
        checked: dict[str, bool] = {}
        for r in rows:
            if r.path not in checked:
                checked[r.path] = path_exists(r.path)
                if not checked[r.path]:
                    problems.append(f"missing video file {r.path!r} (video_id {r.video_id!r})")
    names: dict[int, str] = {}
    for r in rows:
        if r.start is not None and r.end is not None and r.start >= r.end:
            problems.append(f"video_id {r.video_id!r}: start {r.start} >= end {r.end}")
        if r.label is None:
            continue
        if r.label < 0 or (num_classes is not None and r.label >= num_classes):
            problems.append(f"unknown label {r.label} for video_id {r.video_id!r}")
        if r.label_name is not None:
            prev = names.setdefault(r.label, r.label_name)
            if prev != r.label_name:
                problems.append(f"label {r.label} named both {prev!r} and {r.label_name!r}")
    if problems:
        raise ManifestError(f"invalid manifest: {len(problems)} problem(s)", problems)


def class_names(rows: Sequence[ManifestRow]) -> list[str]:
    """Class names indexed by label (``str(label)`` where a row has no name)."""
    labels = {r.label: r.label_name for r in rows if r.label is not None}
    if not labels:
        return []
    n = max(labels) + 1
    return [labels.get(i) or str(i) for i in range(n)]
