"""Splits decided after a builder ran: hold out a fraction of a split, or take the splits from a
split table (:mod:`pipeline.splits`). Both return new rows; the manifest keeps one row per video.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Sequence

import numpy as np

from pipeline.errors import ManifestError
from pipeline.manifest import ManifestRow
from pipeline.splits import read_split_table

__all__ = ["hold_out", "splits_from_table"]


def hold_out(rows: Sequence[ManifestRow], fraction: float, *, seed: int = 0, from_split: str = "train",
             to_split: str = "val") -> list[ManifestRow]:
    """Move ``fraction`` of the ``from_split`` rows to ``to_split``, stratified by label (each
    class gives ``round(fraction * n)`` of its n videos, at least 1 when it has 2 or more), chosen
    by a generator seeded with ``seed`` over the video ids in sorted order: the same rows give the
    same split whatever their order."""
    if not 0 < fraction < 1:
        raise ManifestError(f"the held-out fraction must be in (0, 1), got {fraction!r}")
    if from_split == to_split:
        raise ManifestError(f"hold out into another split than {from_split!r}")
    groups: dict[int | None, list[str]] = {}
    for r in rows:
        if r.split == from_split:
            groups.setdefault(r.label, []).append(r.video_id)
    if not groups:
        raise ManifestError(f"no row in split {from_split!r} to hold out from "
                            f"(splits: {sorted({r.split for r in rows})})")
    rng = np.random.default_rng(seed)
    moved: set[str] = set()
    for label in sorted(groups, key=lambda k: (k is None, k if k is not None else 0)):
        ids = sorted(groups[label])
        k = int(round(fraction * len(ids)))
        if len(ids) >= 2:
            k = min(max(k, 1), len(ids) - 1)
        else:
            k = 0
        moved.update(ids[i] for i in rng.permutation(len(ids))[:k])
    return [replace(r, split=to_split) if r.video_id in moved else r for r in rows]


def splits_from_table(rows: Sequence[ManifestRow], path: str | os.PathLike) -> list[ManifestRow]:
    """The rows listed by the split table at ``path``, each with the table's split (and label,
    where the table gives one); rows the table does not list are left out. Table entries that
    name no row are refused together."""
    table = read_split_table(path)
    ids = {r.video_id for r in rows}
    unknown = [v for v in table if v not in ids]
    if unknown:
        raise ManifestError(f"{len(unknown)} video(s) of split file {path} are not among the {len(rows)} videos found",
                            [f"{v}" for v in unknown[:50]] + ([f"... and {len(unknown) - 50} more"]
                                                            if len(unknown) > 50 else []))
    out = []
    for r in rows:
        e = table.get(r.video_id)
        if e is None:
            continue
        out.append(replace(r, split=e.split, label=e.label, label_name=e.label_name) if e.has_label
                   else replace(r, split=e.split))
    return out
