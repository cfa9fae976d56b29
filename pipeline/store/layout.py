"""Where things are in a store: paths, shard names, completion markers and shard locks.

Layout (see docs/architecture.md)::

    STORE/zarr.json                  root group, attributes["freezeframe"] = header
    STORE/freezeframe.json           the same header, created atomically by the first writer
    STORE/shards/<name>/features     (N, H, W, C) float16 | float32 | int8, chunks (1, H, W, C), sharded
    STORE/shards/<name>/scales       (N, H, W) float32 (int8 stores only; x = q * scale)
    STORE/shards/<name>/timestamps   (N,) float64, seconds
    STORE/markers/<name>.json        completion marker, written last
    STORE/locks/<name>.lock          advisory lock held by the process writing shard <name>
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import StoreError

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


@dataclass(frozen=True)
class Failure:
    """A video that could not be turned into features, and why."""

    video_id: str
    stage: str  # open | probe | decode | empty | too_short | timeout | preprocess | encode | write
    error_type: str
    message: str
    shard: str = ""


# --------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------
def shard_name(index: int, retry: int = 0) -> str:
    """``00003`` for planned shard 3; ``retry01-00003`` for shard 3 of retry generation 1."""
    return f"{index:05d}" if retry == 0 else f"retry{retry:02d}-{index:05d}"


def shards_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "shards"


def shard_dirs(root: str | os.PathLike) -> list[str]:
    """Names of the shard folders present (complete or not), sorted."""
    d = shards_dir(root)
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.exists() else []


def marker_path(root: str | os.PathLike, shard: str) -> Path:
    return Path(root) / "markers" / f"{shard}.json"


def scan_markers(root: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The completion markers of a store that can be read, by shard name (sorted), and the
    ones that cannot (shard name -> why: truncated, not JSON, not a marker)."""
    mdir = Path(root) / "markers"
    good: dict[str, dict] = {}
    bad: dict[str, str] = {}
    if not mdir.exists():
        return good, bad
    for p in sorted(mdir.glob("*.json")):
        try:
            m = json.loads(p.read_bytes())
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            bad[p.stem] = f"unreadable ({type(e).__name__}: {e})"
            continue
        if not (isinstance(m, dict) and isinstance(m.get("videos"), list) and "num_frames" in m):
            bad[p.stem] = "not a completion marker (no videos/num_frames)"
            continue
        good[p.stem] = m
    return good, bad


def read_markers(root: str | os.PathLike) -> dict[str, dict]:
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


def create_once(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> bool:
    """Publish ``obj`` as JSON at ``path`` unless the file exists; True if this call created it.

    Many processes may race: the file is written whole under a private name, then hard-linked
    to ``path`` (atomic, fails if ``path`` exists), so every loser reads the winner's file
    whole (store headers, retry plans).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=indent, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())  # the link publishes whole bytes, even after a power cut
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------
# locks
# --------------------------------------------------------------------------------------
def lock_path(root: str | os.PathLike, shard: str) -> Path:
    return Path(root) / "locks" / f"{shard}.lock"


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[bool]:
    """Try to take the advisory ``flock`` on ``path`` (created if missing): yields True while
    this process holds it, False (at once, without waiting) when another process holds it.

    The kernel drops the lock when its holder exits, even by SIGKILL, so a crashed process
    never leaves a stale lock. The file names the holder (host, pid) for people looking.
    (``flock`` is reliable on local disks and most cluster file systems.) Used for store
    shards (:func:`shard_lock`) and training run directories.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()}\n".encode())
        yield True
    finally:
        os.close(fd)  # releases the lock


def file_locked(path: str | os.PathLike) -> bool:
    """Whether a live process holds the :func:`file_lock` on ``path``."""
    if not Path(path).exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextmanager
def shard_lock(root: str | os.PathLike, shard: str) -> Iterator[bool]:
    """Try to become the writer of ``shard``: yields True while this process holds its lock,
    False (at once, without waiting) when another process holds it.

    A :func:`file_lock` on ``STORE/locks/<shard>.lock``. (torchrun ranks and
    ``--shard-index`` jobs never need it, since their shards are disjoint.)
    """
    with file_lock(lock_path(root, shard)) as held:
        yield held


def shard_locked(root: str | os.PathLike, shard: str) -> bool:
    """Whether a live process holds ``shard``'s lock (i.e. is writing it now)."""
    return file_locked(lock_path(root, shard))
