"""Store health: :func:`store_status` (progress, also while a run writes) and
:func:`verify_store` (every consistency problem, for ``freezeframe verify``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from pipeline.errors import StoreError
from pipeline.store.header import read_header
from pipeline.store.layout import read_markers, shard_dirs, shard_locked, shards_dir
from pipeline.store.writer import STORAGE_DTYPES


@dataclass
class StoreStatus:
    """Progress of a store: shards planned by its header, complete (marker present; retry
    shards not counted), in progress (folder without marker); videos and frames stored."""

    planned_shards: int
    complete_shards: int
    in_progress_shards: list[str]
    videos_stored: int
    frames_stored: int
    failures: int
    planned_videos: int
    #: the in-progress shards whose writer is alive now (the others were abandoned by a
    #: crash and will be redone by the next run)
    writing_shards: list[str] = field(default_factory=list)
    #: PEA return views stored per frame (Co-Settle, ``extract --pea-views K``; 0: none)
    pea_views: int = 0

    @property
    def pending_shards(self) -> int:
        """Planned shards neither complete nor started."""
        return max(self.planned_shards - self.complete_shards - len(self.in_progress_shards), 0)


def store_status(path: str | os.PathLike) -> StoreStatus:
    """Progress of a store from its markers and shard folders (works while it is being written)."""
    root = Path(path)
    header = read_header(root)
    markers = read_markers(root)
    in_progress = [s for s in shard_dirs(root) if s not in markers]
    stored = {v["video_id"] for m in markers.values() for v in m["videos"]}
    failed = {f["video_id"] for m in markers.values() for f in m.get("failures", [])} - stored
    return StoreStatus(
        planned_shards=int(header["content"].get("num_shards", 0)),
        complete_shards=sum(1 for s in markers if not s.startswith("retry")),
        in_progress_shards=in_progress,
        videos_stored=len(stored),
        frames_stored=sum(int(m["num_frames"]) for m in markers.values()),
        failures=len(failed),
        planned_videos=int(header["content"].get("num_videos", 0)),
        writing_shards=[s for s in in_progress if shard_locked(root, s)],
        pea_views=int(header["content"].get("pea", {}).get("views", 0)),
    )


def _extras(content: dict) -> list[str]:
    """The extra arrays of the store's dtype (``scales`` for int8)."""
    return list(STORAGE_DTYPES.get(content.get("dtype", "float16")).extras)


def verify_store(path: str | os.PathLike, *, scan_values: bool = True, block: int = 256) -> list[str]:
    """Check a store against its markers; return the list of problems (empty = healthy).

    Checks: every planned shard complete; no shard folder without a marker; array lengths
    equal the marker's frame count; videos contiguous and inside the arrays; no video stored
    twice; stored + failed videos account for the manifest; timestamps non-decreasing per
    video; (``scan_values``) no NaN or inf in features or scales. Stores with PEA views
    (header ``content.pea``): every shard has them (K views), and (``scan_values``) their
    values are finite and their window offsets inside ``[0, max_offset]``.
    """
    root = Path(path)
    problems: list[str] = []
    try:
        header = read_header(root)
    except StoreError as e:
        return [str(e)]
    content = header.get("content", {})
    markers = read_markers(root)
    present = set(shard_dirs(root))
    for s in sorted(present - set(markers)):
        if shard_locked(root, s):
            problems.append(f"shard {s}: incomplete, being written now by a running extraction")
        else:
            problems.append(f"shard {s}: incomplete (no completion marker); rerun `freezeframe extract`")
    for s in sorted(set(markers) - present):
        problems.append(f"shard {s}: marker without arrays")
    planned = int(content.get("num_shards", 0))
    base_done = {int(s) for s in markers if s.isdigit()}
    missing = sorted(set(range(planned)) - base_done)
    if missing:
        problems.append(f"{len(missing)} planned shard(s) not complete: {missing[:20]}")
    pea = content.get("pea") or {}
    pea_keys = ({"pea_features", "pea_offsets"} | {f"pea_{e}" for e in _extras(content)}) if pea else set()
    seen: dict[str, str] = {}
    for s, m in markers.items():
        if s not in present:
            continue
        g = zarr.open_group(str(shards_dir(root) / s), mode="r")
        arrays = {k: g[k] for k in g.array_keys()}
        n = int(m["num_frames"])
        for k, a in arrays.items():
            if a.shape[0] != n:
                problems.append(f"shard {s}: array {k} has {a.shape[0]} frames, marker says {n}")
        have_pea = {k for k in arrays if k.startswith("pea_")}
        if have_pea != pea_keys:
            problems.append(f"shard {s}: PEA arrays {sorted(have_pea)} but the header declares {sorted(pea_keys)}")
        elif pea and arrays["pea_features"].shape[1] != int(pea["views"]):
            problems.append(f"shard {s}: {arrays['pea_features'].shape[1]} PEA views, the header declares {pea['views']}")
        pos = 0
        for v in m["videos"]:
            vid = v["video_id"]
            if vid in seen:
                problems.append(f"video {vid!r} stored twice (shards {seen[vid]} and {s})")
            seen[vid] = s
            if int(v["offset"]) != pos:
                problems.append(f"shard {s}: video {vid!r} offset {v['offset']} != {pos}")
            if int(v["length"]) <= 0:
                problems.append(f"shard {s}: video {vid!r} has no frames")
            pos = int(v["offset"]) + int(v["length"])
            ts = np.asarray(arrays["timestamps"][int(v["offset"]) : pos])
            if ts.size and (np.any(~np.isfinite(ts)) or np.any(np.diff(ts) < 0)):
                problems.append(f"shard {s}: video {vid!r} timestamps not finite/non-decreasing")
        if pos != n:
            problems.append(f"shard {s}: videos cover {pos} frames, arrays hold {n}")
        if scan_values and pea and have_pea == pea_keys:
            lim = np.asarray(pea["max_offset"])
            for i in range(0, n, block):
                o = np.asarray(arrays["pea_offsets"][i : i + block])
                if o.size and (o.min() < 0 or np.any(o > lim)):
                    problems.append(f"shard {s}: pea_offsets rows {i}..{i + len(o)} outside [0, {pea['max_offset']}]")
        if scan_values:
            for k in ("features", "scales", *sorted(pea_keys - {"pea_offsets"})):
                if k not in arrays:
                    continue
                a = arrays[k]
                for i in range(0, a.shape[0], block):
                    x = np.asarray(a[i : i + block])
                    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
                        bad = int(np.sum(~np.isfinite(x)))
                        problems.append(f"shard {s}: {bad} NaN/inf values in {k} rows {i}..{i + len(x)}")
    failed = {f["video_id"] for m in markers.values() for f in m.get("failures", [])} - set(seen)
    planned_videos = int(content.get("num_videos", 0))
    if not missing and planned_videos and len(seen) + len(failed) != planned_videos:
        problems.append(
            f"{len(seen)} stored + {len(failed)} failed videos != {planned_videos} in the manifest"
        )
    return problems
