"""Where things are in a store: paths, shard names, completion markers and shard locks.

Layout (see docs/architecture.md)::

    STORE/zarr.json                  root group, attributes["freezeframe"] = header
    STORE/freezeframe.json           the same header, created atomically by the first writer
    STORE/shards/<name>/features     (N, H, W, C) float16 | float32 | int8, chunks (1, H, W, C), sharded
    STORE/shards/<name>/scales       (N, H, W) float32 (int8 stores only; x = q * scale)
    STORE/shards/<name>/timestamps   (N,) float64, seconds
    STORE/shards/<name>/crop_features (N, 2, H, W, C) side crops (``test_crops=3`` stores only; zeros for
                                     videos without crops, marker ``crops`` false)
    STORE/markers/<name>.json        completion marker, written last
    STORE/locks/<name>.lock          flock held by the process writing shard <name> (local stores)
    STORE/locks/<name>.lock/<g>.json lease generation g of shard <name> (remote stores, docs/storage.md)

Every function takes the store root as a path, an fsspec URL or a :class:`StoreFS`
(:func:`pipeline.store.fs.store_fs`).
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from pipeline.errors import StoreError
from pipeline.store.fs import DEFAULT_LEASE_S, Claim, StoreRoot, file_lock, file_locked, store_fs

__all__ = ["ATTR_KEY", "FORMAT_VERSION", "HEADER_FILE", "Failure", "VideoEntry", "create_once", "file_lock",
           "file_locked", "lock_key", "lock_path", "marker_key", "marker_path", "read_markers", "scan_markers",
           "shard_claim", "shard_dirs", "shard_lock", "shard_locked", "shard_name", "shards_dir"]

FORMAT_VERSION = 1
HEADER_FILE = "freezeframe.json"
ATTR_KEY = "freezeframe"


# --------------------------------------------------------------------------------------
# what the markers record
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoEntry:
    """Where a video's frames are in the store, with its labels."""

    video_id: str
    shard: str
    offset: int  # first frame row in the shard's arrays
    length: int  # number of stored frames
    split: str
    label: int | None = None
    label_name: str | None = None
    crops: bool = False  # the 2 side crops of every frame are stored (``extract test_crops=3``)


@dataclass(frozen=True)
class Failure:
    """A video that could not be turned into features, and why."""

    video_id: str
    stage: str  # open | probe | decode | empty | too_short | timeout | preprocess | encode | write
    error_type: str
    message: str
    shard: str = ""


# --------------------------------------------------------------------------------------
# paths (keys relative to the store root; ``*_path`` = what names them: a Path or a URL)
# --------------------------------------------------------------------------------------
def shard_name(index: int, retry: int = 0) -> str:
    """``00003`` for planned shard 3; ``retry01-00003`` for shard 3 of retry generation 1."""
    return f"{index:05d}" if retry == 0 else f"retry{retry:02d}-{index:05d}"


def shards_dir(root: StoreRoot) -> Any:
    return store_fs(root).path("shards")


def shard_dirs(root: StoreRoot) -> list[str]:
    """Names of the shard folders present (complete or not), sorted."""
    return [n for n in store_fs(root).list("shards") if "." not in n]  # not zarr.json, not temporaries


def marker_key(shard: str) -> str:
    return f"markers/{shard}.json"


def marker_path(root: StoreRoot, shard: str) -> Any:
    return store_fs(root).path(marker_key(shard))


def scan_markers(root: StoreRoot) -> tuple[dict[str, dict], dict[str, str]]:
    """The completion markers of a store that can be read, by shard name (sorted), and the
    ones that cannot (shard name -> why: truncated, not JSON, not a marker)."""
    fs = store_fs(root)
    good: dict[str, dict] = {}
    bad: dict[str, str] = {}
    names = [n[:-5] for n in fs.list("markers") if n.endswith(".json") and not n.startswith(".")]
    for shard, data in zip(names, fs.read_many([marker_key(s) for s in names])):
        try:
            if isinstance(data, BaseException):
                raise data
            m = json.loads(data)
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            bad[shard] = f"unreadable ({type(e).__name__}: {e})"
            continue
        if not (isinstance(m, dict) and isinstance(m.get("videos"), list) and "num_frames" in m):
            bad[shard] = "not a completion marker (no videos/num_frames)"
            continue
        good[shard] = m
    return good, bad


def read_markers(root: StoreRoot) -> dict[str, dict]:
    """All completion markers of a store, by shard name (sorted).

    :class:`StoreError` naming the first marker that cannot be read (one cannot tell what
    its shard holds): ``freezeframe verify --repair`` removes it so a rerun redoes the shard.
    """
    good, bad = scan_markers(root)
    if bad:
        shard, why = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise StoreError(
            f"{marker_path(root, shard)}: marker {why}{more}; run `freezeframe verify {root} --repair` "
            "(it removes the damaged shards), then rerun the same `freezeframe extract` command"
        )
    return good


def create_once(root: StoreRoot, key: str, obj: Any, *, indent: int = 2) -> bool:
    """Publish ``obj`` as JSON at ``key`` of the store unless it exists; True if this call
    created it. Many processes may race: exactly one wins (a hard link locally, a conditional
    write remotely, :meth:`StoreFS.create_once`), and every loser reads the winner's object
    whole (store headers, retry plans)."""
    return store_fs(root).create_once(key, json.dumps(obj, indent=indent, sort_keys=True).encode())


# --------------------------------------------------------------------------------------
# claims (locks)
# --------------------------------------------------------------------------------------
def lock_key(shard: str) -> str:
    return f"locks/{shard}.lock"


def lock_path(root: StoreRoot, shard: str) -> Any:
    return store_fs(root).path(lock_key(shard))


@contextmanager
def shard_claim(root: StoreRoot, shard: str, *, lease_s: float = DEFAULT_LEASE_S) -> Iterator[Claim]:
    """Try to become the writer of ``shard``: yields a :class:`~pipeline.store.fs.Claim`, at
    once, without waiting (``held`` False: another process is the writer, ``holder`` says who,
    ``expires`` when its lease runs out on a remote store).

    Locally a ``flock`` on ``STORE/locks/<shard>.lock`` (dropped by the kernel when its holder
    dies); remotely a lease of ``lease_s`` seconds renewed by a heartbeat (docs/storage.md).
    """
    with store_fs(root).claim(lock_key(shard), lease_s=lease_s) as claim:
        yield claim


@contextmanager
def shard_lock(root: StoreRoot, shard: str) -> Iterator[bool]:
    """:func:`shard_claim` as a bool: True while this process holds the shard."""
    with shard_claim(root, shard) as claim:
        yield claim.held


def shard_locked(root: StoreRoot, shard: str) -> bool:
    """Whether a live process holds ``shard``'s claim (i.e. is writing it now)."""
    return store_fs(root).claimed(lock_key(shard)).held
