"""Store health: :func:`store_status` (progress, also while a run writes), :func:`check_store`
(every consistency and integrity problem, for ``freezeframe verify``) and
:func:`repair_store` (``verify --repair``).

What ``verify`` checks, store by store then shard by shard (guarantees:
:mod:`pipeline.store.integrity`, docs/architecture.md):

* the header, the root group (whose attributes repeat the header) and the ``shards`` group
  are readable and agree; every marker is readable;
* per completed shard: the marker's digest matches what it describes; the shard group's
  ``videos`` attribute matches the marker; every file of the marker's file table is there
  with its size and (full check) its SHA-256; every array's metadata is readable and its
  length is the marker's frame count; videos are contiguous, stored once, with
  non-decreasing timestamps; (full check) every shard file decodes (chunk CRC32C) and
  float arrays hold no NaN/inf;
* every planned shard is complete and stored + failed videos account for the manifest.

A problem that damages a shard (anything a re-extraction of that shard would fix) names
the shard, the file and the videos; ``--repair`` removes those shards' markers, then their
data, so rerunning the same extract command re-extracts exactly them. Store-level metadata
that is a copy of something intact (header <-> root group attributes, the ``shards`` group)
is rewritten from that copy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from collections import Counter
from typing import Any, Callable, Iterable

import numpy as np
import zarr

from pipeline.errors import StoreError
from pipeline.store.fs import StoreFS, StoreRoot, store_fs
from pipeline.store.header import group_metadata_bytes, read_group_metadata, read_header, root_group_bytes
from pipeline.store.integrity import (
    INTEGRITY_VERSION,
    expected_files,
    frames_per_file,
    has_chunk_checksums,
    marker_digest,
    sha256_key,
)
from pipeline.store.layout import (
    ATTR_KEY,
    HEADER_FILE,
    marker_key,
    scan_markers,
    shard_dirs,
    shard_lock,
    shard_locked,
)
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
    #: shards whose marker cannot be read (``freezeframe verify --repair`` removes them)
    damaged_markers: list[str] = field(default_factory=list)
    #: PEA return views stored per frame (Co-Settle, ``extract --pea-views K``; 0: none)
    pea_views: int = 0
    #: spatial test crops per frame of the videos that have them (``extract test_crops=3``; 1: none)
    test_crops: int = 1
    #: stored videos with their side crops
    videos_with_crops: int = 0
    #: why the failed videos failed: ("stage: ErrorType", count), most common first
    failure_reasons: list[tuple[str, int]] = field(default_factory=list)

    @property
    def failure_rate(self) -> float:
        """Failed videos over the videos tried (stored + failed); 0 before any was tried."""
        tried = self.videos_stored + self.failures
        return self.failures / tried if tried else 0.0

    @property
    def pending_shards(self) -> int:
        """Planned shards neither complete nor started."""
        return max(self.planned_shards - self.complete_shards - len(self.in_progress_shards), 0)


def store_status(path: StoreRoot) -> StoreStatus:
    """Progress of a store from its markers and shard folders (works while it is being
    written). A damaged marker is counted, not read (:class:`StoreError` only for a header
    that cannot be read)."""
    root = store_fs(path)
    header = read_header(root)
    markers, bad = scan_markers(root)
    in_progress = [s for s in shard_dirs(root) if s not in markers and s not in bad]
    stored = {v.get("video_id") for m in markers.values() for v in m["videos"] if isinstance(v, dict)}
    failed = latest_failures(markers, stored)
    return StoreStatus(
        planned_shards=_int(header["content"].get("num_shards")),
        complete_shards=sum(1 for s in markers if not s.startswith("retry")),
        in_progress_shards=in_progress,
        videos_stored=len(stored),
        frames_stored=sum(_int(m.get("num_frames")) for m in markers.values()),
        failures=len(failed),
        planned_videos=_int(header["content"].get("num_videos")),
        writing_shards=[s for s in in_progress if shard_locked(root, s)],
        damaged_markers=sorted(bad),
        pea_views=_int((header["content"].get("pea") or {}).get("views")),
        test_crops=_int((header["content"].get("test_crops") or {}).get("crops")) or 1,
        videos_with_crops=sum(1 for m in markers.values() for v in m["videos"] if isinstance(v, dict) and v.get("crops")),
        failure_reasons=failure_reasons(failed.values()),
    )


def latest_failures(markers: dict[str, dict], stored: set) -> dict[str, dict]:
    """video id -> its last recorded failure (markers in name order: a retry shard's after
    the planned one's), for the videos that are not stored (a retry may have stored them)."""
    out: dict[str, dict] = {}
    for m in markers.values():
        for f in m.get("failures", []):
            if isinstance(f, dict) and f.get("video_id") not in stored:
                out[f.get("video_id")] = f
    return out


def failure_reason(failure: dict) -> str:
    """``"decode: InvalidDataError"``: the stage and the error type of a recorded failure."""
    return f"{failure.get('stage', '?')}: {failure.get('error_type', '?')}"


def failure_reasons(failures: Iterable[dict]) -> list[tuple[str, int]]:
    """(reason, count) of recorded failures (:func:`failure_reason`), most common first."""
    return Counter(failure_reason(f) for f in failures).most_common()


def failure_verdict(failed: int, stored: int, reasons: list[tuple[str, int]],
                    max_rate: float) -> str | None:
    """Why a store (or a run) with ``failed`` failed and ``stored`` stored videos is not ok:
    its failure rate passes ``max_rate`` (0: any failure), or every video failed; None if ok.
    One sentence naming the most common reason and what to do."""
    tried = failed + stored
    if not failed or (failed / tried <= max_rate and stored):
        return None
    top, n = reasons[0] if reasons else ("unknown", failed)
    if not stored:
        head = f"all {failed} videos failed: {n} x {top}"
    else:
        head = (f"{failed} of {tried} videos failed ({100 * failed / tried:.1f}% > {100 * max_rate:g}% allowed); "
                f"most common: {n} x {top}")
    return (head + " (`freezeframe status STORE --failures` lists them with their messages; fix the cause, then "
            "rerun `freezeframe extract` with --retry-failed; --max-failure-rate R accepts a failure rate up to R)")


def _int(x: Any) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        return 0


# --------------------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------------------
#: what fixes a problem: ``--repair`` removing the shard (the extract rerun re-extracts it) or
#: rewriting a store-level metadata file from its intact copy; "extract": only a rerun of the
#: extract command (incomplete shards); "": neither (the message says what to do)
REPAIRS = ("shard", "header", "root", "shards_group", "extract", "")


@dataclass(frozen=True)
class Problem:
    """One problem of a store: what, where (shard, file relative to the store), which videos
    it affects, and what ``--repair`` does about it (:data:`REPAIRS`)."""

    text: str
    shard: str | None = None
    file: str | None = None
    videos: tuple[str, ...] = ()
    repair: str = ""

    def __str__(self) -> str:
        out = (f"shard {self.shard}: " if self.shard else "") + (f"{self.file}: " if self.file else "") + self.text
        if self.videos:
            more = f" and {len(self.videos) - 8} more" if len(self.videos) > 8 else ""
            out += f" (videos {', '.join(self.videos[:8])}{more})"
        return out


@dataclass
class VerifyReport:
    """Everything :func:`check_store` found: problems (verify fails) and notes (it does not)."""

    root: StoreFS
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: videos of every completed shard (also of damaged ones), for the advice
    shard_videos: dict[str, list[str]] = field(default_factory=dict)
    #: videos stored, and the failed ones (id -> last recorded failure): not problems of the
    #: store's integrity, but a store with failures is not ok either (:meth:`failure_verdict`)
    videos_stored: int = 0
    failed: dict[str, dict] = field(default_factory=dict)

    @property
    def failure_rate(self) -> float:
        tried = self.videos_stored + len(self.failed)
        return len(self.failed) / tried if tried else 0.0

    def failure_verdict(self, max_rate: float = 0.0) -> str | None:
        """Why the store's failures make it not ok (rate above ``max_rate``, or every video
        failed), None if they do not (:func:`failure_verdict`)."""
        return failure_verdict(len(self.failed), self.videos_stored, failure_reasons(self.failed.values()), max_rate)

    @property
    def damaged_shards(self) -> list[str]:
        """Shards a re-extraction would fix (what ``--repair`` removes), sorted."""
        return sorted({p.shard for p in self.problems if p.repair == "shard" and p.shard})

    @property
    def unfixable(self) -> list[Problem]:
        """Problems neither ``--repair`` nor an extract rerun fixes."""
        return [p for p in self.problems if not p.repair]

    def advice(self) -> list[str]:
        """What to do, in sentences, for the problems found."""
        out = []
        shards = self.damaged_shards
        if shards:
            listed = "; ".join(f"{s} ({', '.join(self.shard_videos.get(s, [])[:6]) or 'videos unknown'})"
                               for s in shards[:10])
            retry = (" (with --retry-failed for the retry shards)"
                     if any(s.startswith("retry") for s in shards) else "")
            out.append(f"damaged shard(s): {listed}{' ...' if len(shards) > 10 else ''}")
            out.append(f"what to do: `freezeframe verify {self.root} --repair` removes these shards (markers, then "
                       f"data), then rerun the same `freezeframe extract` command{retry}: it re-extracts exactly them")
        if any(p.repair in ("header", "root", "shards_group") for p in self.problems):
            out.append(f"`freezeframe verify {self.root} --repair` rewrites the damaged store metadata from its intact "
                       "copy")
        if any(p.repair == "extract" for p in self.problems) and not shards:
            out.append("what to do: rerun the same `freezeframe extract` command to complete the store")
        if self.unfixable:
            out.append(f"{len(self.unfixable)} problem(s) need more than --repair and a rerun: see their messages")
        return out


def verify_store(path: StoreRoot, *, scan_values: bool = True) -> list[str]:
    """Check a store; return its problems as lines (empty = healthy). See :func:`check_store`."""
    return [str(p) for p in check_store(path, scan_values=scan_values).problems]


def check_store(path: StoreRoot, *, scan_values: bool = True) -> VerifyReport:
    """Every problem of the store at ``path`` (module docstring). ``scan_values=False``
    (``verify --quick``) skips what reads every byte: file SHA-256s, chunk decoding, the
    NaN/inf scan. Never raises on a damaged store: damage is a problem in the report."""
    root = store_fs(path)
    rep = VerifyReport(root)
    header = _check_store_metadata(root, rep)
    if header is None:
        return rep
    content = header.get("content", {})
    markers, bad = scan_markers(root)
    present = set(shard_dirs(root))
    for s, why in bad.items():
        rep.problems.append(Problem(f"marker {why}; its shard cannot be trusted", s, f"markers/{s}.json",
                                    repair="shard"))
    for s in sorted(present - set(markers) - set(bad)):
        if shard_locked(root, s):
            rep.problems.append(Problem(f"shard {s}: incomplete, being written now by a running extraction",
                                        repair="extract"))
        else:
            rep.problems.append(Problem(f"shard {s}: incomplete (no completion marker); rerun `freezeframe extract`",
                                        repair="extract"))
    for s in sorted(set(markers) - present):
        rep.problems.append(Problem("marker without arrays", s, f"shards/{s}/", _videos(markers[s]), "shard"))
    planned = _int(content.get("num_shards"))
    base_done = {int(s) for s in markers if s.isdigit()}
    missing = sorted(set(range(planned)) - base_done)
    if missing:
        rep.problems.append(Problem(f"{len(missing)} planned shard(s) not complete: {missing[:20]}",
                                    repair="extract"))
    seen: dict[str, str] = {}
    dtype_name = content.get("dtype", "float16")
    dtype = STORAGE_DTYPES.get(dtype_name if dtype_name in STORAGE_DTYPES.names() else "float16")
    legacy: list[str] = []
    for s, m in markers.items():
        rep.shard_videos[s] = list(_videos(m))
        if s not in present:
            continue
        try:
            _check_shard(root, s, m, dtype.extras, rep, seen, legacy, scan_values, content.get("pea") or {},
                         content.get("test_crops") or {})
        except Exception as e:  # a marker with values of the wrong type, ...: damage, not a crash
            rep.problems.append(Problem(f"cannot be checked ({type(e).__name__}: {e})", s, repair="shard",
                                        videos=_videos(m)))
    if legacy:
        rep.notes.append(f"no checksums: {len(legacy)} of {len(markers)} shard(s) ({', '.join(legacy[:5])}"
                         f"{' ...' if len(legacy) > 5 else ''}) were written before integrity version "
                         f"{INTEGRITY_VERSION} (store header: {_int(header.get('integrity'))}), so bit flips and "
                         "swapped files cannot be detected in them: re-extract to get them")
    stored_failed = latest_failures(markers, set(seen))
    rep.videos_stored, rep.failed = len(seen), stored_failed
    planned_videos = _int(content.get("num_videos"))
    if not missing and not bad and planned_videos and len(seen) + len(stored_failed) != planned_videos:
        rep.problems.append(Problem(
            f"{len(seen)} stored + {len(stored_failed)} failed videos != {planned_videos} in the manifest"))
    return rep


def _videos(marker: dict, rows: tuple[int, int] | None = None) -> tuple[str, ...]:
    """Ids of a marker's videos (those overlapping frame rows [start, stop) if given)."""
    out = []
    for v in marker.get("videos", []):
        if not isinstance(v, dict):
            continue
        if rows is not None:
            a, n = _int(v.get("offset")), _int(v.get("length"))
            if not (a < rows[1] and a + n > rows[0]):
                continue
        out.append(str(v.get("video_id")))
    return tuple(out)


def _check_store_metadata(root: StoreFS, rep: VerifyReport) -> dict | None:
    """Header, root group and ``shards`` group; the header to check the rest against, or
    None when there is none to trust."""
    why = ""
    try:
        header: dict | None = read_header(root)
    except StoreError as e:
        header, why = None, str(e)
    kept = (read_group_metadata(root, "zarr.json") or {}).get("attributes", {}).get(ATTR_KEY)
    kept = kept if isinstance(kept, dict) and isinstance(kept.get("content"), dict) else None
    if header is None:
        if kept is None:
            if not root.exists(HEADER_FILE) and not root.exists("zarr.json"):
                rep.problems.append(Problem(why))
            else:
                rep.problems.append(Problem(
                    f"{HEADER_FILE} and zarr.json are both missing or damaged: nothing tells how this store was "
                    "made; delete it and re-extract", file=HEADER_FILE))
            return None
        rep.problems.append(Problem("missing or damaged; --repair restores it from the root zarr.json",
                                    file=HEADER_FILE, repair="header"))
        header = kept
    elif kept is None:
        rep.problems.append(Problem("root group metadata missing or damaged; --repair rewrites it from the header",
                                    file="zarr.json", repair="root"))
    elif kept != header:
        rep.problems.append(Problem(f"root group attributes differ from {HEADER_FILE}; --repair rewrites them "
                                    "from the header", file="zarr.json", repair="root"))
    if read_group_metadata(root, "shards/zarr.json") is None:
        rep.problems.append(Problem("shards group metadata missing or damaged; --repair rewrites it",
                                    file="shards/zarr.json", repair="shards_group"))
    return header


def _check_shard(root: StoreFS, s: str, m: dict, extras: dict[str, str], rep: VerifyReport,
                 seen: dict[str, str], legacy: list[str], scan: bool, pea: dict, crops: dict | None = None) -> None:
    """Everything about one completed shard (module docstring). ``pea``: the header's
    ``content.pea`` (Co-Settle return views; empty when the store has none); ``crops``: its
    ``content.test_crops`` (spatial test crops; empty when the store has none)."""
    sdir = f"shards/{s}"
    n = int(m["num_frames"])
    everyone = _videos(m)

    def damaged(text: str, file: str | None = None, videos: tuple[str, ...] = everyone) -> None:
        rep.problems.append(Problem(text, s, file, videos, "shard"))

    # the marker itself, and the copy of its video table in the shard group
    if "digest" in m and marker_digest(m) != m["digest"]:
        damaged("edited or damaged: its digest does not match its videos, labels and files",
                f"markers/{s}.json")
    group = read_group_metadata(root, f"{sdir}/zarr.json")
    if group is None:
        damaged("shard group metadata missing or damaged", f"shards/{s}/zarr.json")
    else:
        for line in _video_table_diffs(m.get("videos", []), group.get("attributes", {}).get("videos")):
            damaged(f"marker and shard attributes disagree: {line}", f"markers/{s}.json")

    # arrays: metadata, checksums, length
    files: dict[str, dict] | None = m.get("files") if isinstance(m.get("files"), dict) else None
    names = {"features", "timestamps", *extras}
    if files is not None:
        names |= {rel.split("/")[0] for rel in files if rel.count("/") == 1 and rel.endswith("/zarr.json")}
    arrays: dict[str, Any] = {}
    for k in sorted(names):
        try:
            arrays[k] = zarr.open_array(root.zarr_store(f"{sdir}/{k}", read_only=True), mode="r")
        except Exception as e:  # missing or unreadable metadata
            damaged(f"array metadata missing or damaged ({type(e).__name__})", f"shards/{s}/{k}/zarr.json")
    if files is None or any(not has_chunk_checksums(a) for a in arrays.values()):
        legacy.append(s)
    for k, a in arrays.items():
        if a.shape[0] != n:
            rep.problems.append(Problem(f"shard {s}: array {k} has {a.shape[0]} frames, marker says {n}",
                                        repair="shard"))
    _check_pea(s, arrays, extras, pea, damaged, scan)
    _check_crops(s, m, arrays, extras, crops or {}, damaged)

    def file_videos(rel: str) -> tuple[str, ...]:
        parts = rel.split("/")
        if len(parts) > 2 and parts[1] == "c" and parts[0] in arrays and parts[2].isdigit():
            per = frames_per_file(arrays[parts[0]])
            return _videos(m, (int(parts[2]) * per, (int(parts[2]) + 1) * per))
        return everyone

    # the shard's files: against the marker's table, or the files the shapes imply
    bad_files: set[str] = set()
    if files is not None:
        for rel, rec in files.items():
            p = f"{sdir}/{rel}"
            size = root.size(p)
            if size is None:
                why = f"missing (the marker records {rec['bytes']:,} bytes)"
            elif size != rec["bytes"]:
                why = f"{size:,} bytes, the marker records {rec['bytes']:,} (truncated, emptied or replaced)"
            elif scan and sha256_key(root, p) != rec["sha256"]:
                why = "content does not match the SHA-256 in the marker (damaged, or another shard's file)"
            else:
                continue
            bad_files.add(rel)
            damaged(why, f"shards/{s}/{rel}", file_videos(rel))
    else:
        for k, a in arrays.items():
            for key, a0, a1 in expected_files(a, min(n, a.shape[0])):
                if not root.size(f"{sdir}/{k}/{key}"):
                    bad_files.add(f"{k}/{key}")
                    damaged("missing or empty (zarr would read it as zeros)", f"shards/{s}/{k}/{key}",
                            _videos(m, (a0, a1)))

    # videos: contiguous, stored once, timestamps in order
    # (not where a timestamps file is already known bad: zarr would read zeros there)
    ts = None if any(f.startswith("timestamps/") for f in bad_files) else _read_quiet(arrays.get("timestamps"))
    pos = 0
    for v in m["videos"]:
        vid = v["video_id"]
        if vid in seen:
            rep.problems.append(Problem(f"video {vid!r} stored twice (shards {seen[vid]} and {s})"))
        seen[vid] = s
        if int(v["offset"]) != pos:
            rep.problems.append(Problem(f"shard {s}: video {vid!r} offset {v['offset']} != {pos}", repair="shard"))
        if int(v["length"]) <= 0:
            rep.problems.append(Problem(f"shard {s}: video {vid!r} has no frames", repair="shard"))
        pos = int(v["offset"]) + int(v["length"])
        t = ts[int(v["offset"]) : pos] if ts is not None else np.empty(0)
        if t.size and (np.any(~np.isfinite(t)) or np.any(np.diff(t) < 0)):
            rep.problems.append(Problem(f"shard {s}: video {vid!r} timestamps not finite/non-decreasing",
                                        repair=_value_repair(arrays["timestamps"])))
    if pos != n:
        rep.problems.append(Problem(f"shard {s}: videos cover {pos} frames, arrays hold {n}", repair="shard"))

    # every shard file decodes (chunk checksums), float values are finite
    if not scan:
        return
    for k, a in arrays.items():
        for key, a0, a1 in expected_files(a, a.shape[0]):
            if f"{k}/{key}" in bad_files:
                continue
            try:
                x = np.asarray(a[a0:a1])
            except Exception as e:  # bad checksum, cut file, undecodable bytes
                damaged(f"cannot be read ({type(e).__name__}: {str(e)[:100]})", f"shards/{s}/{k}/{key}",
                        _videos(m, (a0, a1)))
                continue
            if k != "timestamps" and x.dtype.kind == "f" and not np.all(np.isfinite(x)):
                bad = int(np.sum(~np.isfinite(x)))
                rep.problems.append(Problem(f"shard {s}: {bad} NaN/inf values in {k} rows {a0}..{a1}",
                                            videos=_videos(m, (a0, a1)), repair=_value_repair(a)))


def _check_pea(s: str, arrays: dict[str, Any], extras: dict[str, str], pea: dict,
               damaged: Callable[..., None], scan: bool) -> None:
    """PEA return views (header ``content.pea``): every shard has exactly the declared arrays
    and K views, and (``scan``) window offsets inside ``[0, max_offset]``. Their values are
    covered by the shard-wide decode and NaN scan like every other array."""
    want = ({"pea_features", "pea_offsets"} | {f"pea_{e}" for e in extras}) if pea else set()
    have = {k for k in arrays if k.startswith("pea_")}
    if have != want:
        damaged(f"PEA arrays {sorted(have)} but the header declares {sorted(want)}")
        return
    if not pea:
        return
    if arrays["pea_features"].shape[1] != int(pea["views"]):
        damaged(f"{arrays['pea_features'].shape[1]} PEA views, the header declares {pea['views']}")
    if scan:
        o = _read_quiet(arrays["pea_offsets"])
        if o is not None and o.size and (o.min() < 0 or np.any(o > np.asarray(pea["max_offset"]))):
            damaged(f"pea_offsets outside [0, {pea['max_offset']}]")


def _check_crops(s: str, m: dict, arrays: dict[str, Any], extras: dict[str, str], crops: dict,
                 damaged: Callable[..., None]) -> None:
    """Spatial test crops (header ``content.test_crops``): every shard has exactly the declared
    side-crop arrays with 2 crops, and every video says whether it has crops (a video without
    says so: its rows are zeros). Values: the shard-wide decode and NaN scan."""
    want = ({"crop_features"} | {f"crop_{e}" for e in extras}) if crops else set()
    have = {k for k in arrays if k.startswith("crop_")}
    if have != want:
        damaged(f"test-crop arrays {sorted(have)} but the header declares {sorted(want)}")
        return
    if not crops:
        return
    if arrays["crop_features"].shape[1] != int(crops["crops"]) - 1:
        damaged(f"{arrays['crop_features'].shape[1]} side crops per frame, the header declares "
                f"{int(crops['crops']) - 1} (+ the centre)")
    unsaid = [v.get("video_id") for v in m.get("videos", []) if not isinstance(v.get("crops"), bool)]
    if unsaid:
        damaged(f"{len(unsaid)} video(s) do not say whether they have test crops: {unsaid[:5]}")


def _value_repair(array: Any) -> str:
    """Bad values in a checksummed array were written that way (the backbone produced them:
    re-extracting gives them again); in one without checksums they may be damage."""
    return "" if has_chunk_checksums(array) else "shard"


def _read_quiet(array: Any) -> np.ndarray | None:
    """The whole array, or None if it cannot be read (the decode scan names the file)."""
    if array is None:
        return None
    try:
        return np.asarray(array[...])
    except Exception:
        return None


def _video_table_diffs(marker_videos: list, group_videos: Any) -> list[str]:
    """Differences between the marker's video table and the shard group's ``videos``."""
    if not isinstance(group_videos, list):
        return ["the shard group has no video table"]
    out = []
    if len(marker_videos) != len(group_videos):
        out.append(f"{len(marker_videos)} videos in the marker, {len(group_videos)} in the shard")
    for mv, gv in zip(marker_videos, group_videos):
        if mv != gv and isinstance(mv, dict) and isinstance(gv, dict):
            keys = sorted(k for k in set(mv) | set(gv) if mv.get(k) != gv.get(k))
            diffs = ", ".join(f"{k} {mv.get(k)!r} in the marker, {gv.get(k)!r} in the shard" for k in keys)
            out.append(f"video {gv.get('video_id', mv.get('video_id'))!r}: {diffs}")
    return out


# --------------------------------------------------------------------------------------
# repair
# --------------------------------------------------------------------------------------
def repair_store(path: StoreRoot, report: VerifyReport | None = None,
                 log: Callable[[str], None] = lambda s: None) -> list[str]:
    """Fix what ``report`` (default: a full :func:`check_store`) says ``--repair`` can fix;
    return one line per action.

    Store metadata is rewritten from its intact copy; each damaged shard loses its marker
    first (so it is incomplete from then on, even if this is interrupted), then its data,
    under the shard's lock (a shard a running extraction is writing is left alone). A rerun
    of the same extract command then re-extracts exactly the removed shards.
    """
    root = store_fs(path)
    report = report or check_store(root)
    kinds = {p.repair for p in report.problems}
    actions: list[str] = []

    def act(line: str) -> None:
        actions.append(line)
        log(line)

    if "header" in kinds:
        kept = json.loads(root.read_bytes("zarr.json"))["attributes"][ATTR_KEY]
        root.write_atomic(HEADER_FILE, json.dumps(kept, indent=2, sort_keys=True).encode())
        act(f"{HEADER_FILE}: restored from the root zarr.json")
    if "root" in kinds:
        root.write_atomic("zarr.json", root_group_bytes(read_header(root)))
        act(f"zarr.json: rewritten from {HEADER_FILE}")
    if "shards_group" in kinds:
        root.write_atomic("shards/zarr.json", group_metadata_bytes({}))
        act("shards/zarr.json: rewritten")
    for s in report.damaged_shards:
        with shard_lock(root, s) as mine:
            if not mine:
                act(f"shard {s}: being written by a running extraction; left alone")
                continue
            root.delete(marker_key(s))
            root.delete(f"shards/{s}", recursive=True)
        vids = report.shard_videos.get(s)
        what = (f"{len(vids)} videos: {', '.join(vids[:6])}{' ...' if len(vids) > 6 else ''}" if vids is not None
                else "videos unknown: its marker was unreadable")
        act(f"shard {s}: marker and data removed ({what}); the next extract run re-extracts it")
    return actions
