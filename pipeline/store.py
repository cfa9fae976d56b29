"""The feature store: a zarr v3 group of per-shard feature arrays plus JSON completion markers.

Layout (see docs/architecture.md)::

    STORE/zarr.json                  root group, attributes["freezeframe"] = header
    STORE/freezeframe.json           the same header, created atomically by the first writer
    STORE/shards/<name>/features     (N, H, W, C) float16 | float32 | int8, chunks (1, H, W, C), sharded
    STORE/shards/<name>/scales       (N, H, W) float32 (int8 stores only; x = q * scale)
    STORE/shards/<name>/timestamps   (N,) float64, seconds
    STORE/markers/<name>.json        completion marker, written last
    STORE/locks/<name>.lock          advisory lock held by the process writing shard <name>

Every array is a plain zarr v3 array, so any zarr v3 reader can open it; the per-video table
of a shard is also in that shard group's attributes (``videos``).

A store shard has exactly one writer (:class:`ShardWriter`). Frames are buffered and written
in blocks aligned to the zarr shard files, so no zarr shard is ever partially rewritten by two
writers. The marker is written last; a shard without a marker is incomplete and is redone.
A writer holds the shard's lock (:func:`shard_lock`) while it works, so two runs started on
the same store by mistake share the shards instead of deleting each other's work.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline.errors import ConfigMismatchError, StoreError
from pipeline.registry import Registry

FORMAT_VERSION = 1
HEADER_FILE = "freezeframe.json"
ATTR_KEY = "freezeframe"


# --------------------------------------------------------------------------------------
# storage dtypes and codecs (registries: the name is what users type)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StorageDtype:
    """How float32 features (n, H, W, C) are stored and read back.

    ``encode`` returns the arrays to write (``features`` and optional extras such as
    ``scales``); ``decode`` turns what was read back into float32 (n, H, W, C).
    """

    name: str
    feature_dtype: str
    extras: dict[str, str] = field(default_factory=dict)  # extra array name -> dtype; shape (n, H, W)
    bytes_note: str = ""

    def encode(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return _ENCODERS[self.name](x)

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return _DECODERS[self.name](arrays)


def _encode_int8(x: np.ndarray) -> dict[str, np.ndarray]:
    """Symmetric per-token int8: scale = max|x| over C / 127, q = round(x / scale)."""
    amax = np.abs(x).max(axis=-1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8)
    return {"features": q, "scales": scale}


_ENCODERS: dict[str, Callable[[np.ndarray], dict[str, np.ndarray]]] = {
    "float32": lambda x: {"features": np.ascontiguousarray(x, dtype=np.float32)},
    "float16": lambda x: {"features": np.ascontiguousarray(x, dtype=np.float16)},
    "int8": _encode_int8,
}
_DECODERS: dict[str, Callable[[dict[str, np.ndarray]], np.ndarray]] = {
    "float32": lambda a: np.asarray(a["features"], dtype=np.float32),
    "float16": lambda a: np.asarray(a["features"], dtype=np.float32),
    "int8": lambda a: a["features"].astype(np.float32) * a["scales"][..., None],
}

STORAGE_DTYPES: Registry[StorageDtype] = Registry("storage dtype")
STORAGE_DTYPES.add("float16", StorageDtype("float16", "float16"))
STORAGE_DTYPES.add("float32", StorageDtype("float32", "float32"))
STORAGE_DTYPES.add("int8", StorageDtype("int8", "int8", {"scales": "float32"}))

#: zstd level 1: on patch features it compresses as well as level 3 (MobileNetV2 float16:
#: 22.3 vs 22.5 KB per 4x4x1280 frame) at 1.6x the speed, which matters when compression
#: shares the CPU with the backbone (see docs/benchmarks.md).
CODECS: Registry[Callable[[], list]] = Registry("codec")
CODECS.add("zstd", lambda: [ZstdCodec(level=1)])
CODECS.add("blosc", lambda: [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")])
CODECS.add("none", lambda: [])


# --------------------------------------------------------------------------------------
# header: create once, verify on every later run
# --------------------------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def describe_mismatch(existing: dict, wanted: dict) -> list[str]:
    """Human-readable differences between two header 'content' dicts."""
    a, b = _flatten(existing), _flatten(wanted)
    return [
        f"{k}: store has {a.get(k)!r}, this run asks {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def init_store(path: str | os.PathLike, header: dict, *, wait_s: float = 60.0) -> dict:
    """Create the store with ``header`` or verify that an existing store matches it.

    ``header["content"]`` holds everything that determines the stored values (backbone,
    weights hash, decode/geometry, dtype, codec, pooling, manifest hash, shard size). An
    existing store whose content differs is refused *before any work starts*.
    Safe to call from many processes at once: the header file is created with an atomic
    link, and losers verify against the winner's header.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    header = {**header, "format_version": FORMAT_VERSION}
    target = root / HEADER_FILE
    tmp = root / f".{HEADER_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(header, indent=2, sort_keys=True))
    try:
        os.link(tmp, target)
        created = True
    except FileExistsError:
        created = False
    finally:
        tmp.unlink(missing_ok=True)
    if created:
        group = zarr.open_group(str(root), mode="a")
        group.attrs[ATTR_KEY] = header
        group.require_group("shards")
        (root / "markers").mkdir(exist_ok=True)
        return header
    existing = json.loads(target.read_text())
    diffs = describe_mismatch(existing.get("content", {}), header.get("content", {}))
    if diffs:
        raise ConfigMismatchError(
            f"the store {root} was made with a different config; refusing to mix features.\n"
            + "\n".join(f"  - {d}" for d in diffs)
            + "\nUse a new --store path, or rerun with the store's settings "
            f"(`freezeframe status {root}` prints them)."
        )
    deadline = time.monotonic() + wait_s
    while not (root / "zarr.json").exists() or not (root / "markers").exists():
        if time.monotonic() > deadline:
            raise StoreError(f"{root}: header exists but the zarr group was never created")
        time.sleep(0.05)
    return existing


def read_header(path: str | os.PathLike) -> dict:
    target = Path(path) / HEADER_FILE
    if not target.exists():
        raise StoreError(
            f"{path} is not a freezeframe store (no {HEADER_FILE}); "
            "create one with `freezeframe extract`."
        )
    return json.loads(target.read_text())


# --------------------------------------------------------------------------------------
# markers
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


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def marker_path(root: str | os.PathLike, shard: str) -> Path:
    return Path(root) / "markers" / f"{shard}.json"


def read_markers(root: str | os.PathLike) -> dict[str, dict]:
    """All completion markers of a store, by shard name (sorted)."""
    mdir = Path(root) / "markers"
    if not mdir.exists():
        return {}
    out = {}
    for p in sorted(mdir.glob("*.json")):
        out[p.stem] = json.loads(p.read_text())
    return out


def lock_path(root: str | os.PathLike, shard: str) -> Path:
    return Path(root) / "locks" / f"{shard}.lock"


@contextmanager
def shard_lock(root: str | os.PathLike, shard: str) -> Iterator[bool]:
    """Try to become the writer of ``shard``: yields True while this process holds its lock,
    False (at once, without waiting) when another process holds it.

    An advisory ``flock`` on ``STORE/locks/<shard>.lock``: the kernel drops it when its holder
    exits, even by SIGKILL, so a crashed run never leaves a stale lock. The file names the
    holder (host, pid) for people looking. (``flock`` is reliable on local disks and most
    cluster file systems; torchrun ranks and ``--shard-index`` jobs never need it, since their
    shards are disjoint.)
    """
    path = lock_path(root, shard)
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


def shard_locked(root: str | os.PathLike, shard: str) -> bool:
    """Whether a live process holds ``shard``'s lock (i.e. is writing it now)."""
    path = lock_path(root, shard)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def shard_name(index: int, retry: int = 0) -> str:
    return f"{index:05d}" if retry == 0 else f"retry{retry:02d}-{index:05d}"


# --------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------
class ShardWriter:
    """The single writer of one store shard.

    Usage::

        w = ShardWriter.create(root, "00003", feature_shape=(7, 7, 1280), dtype="float16",
                               codec="zstd", frames_per_file=256)
        w.begin_video(entry_fields)
        w.append(feats, timestamps)   # (n, H, W, C) float32, (n,) seconds; any number of times
        w.end_video()                 # or w.abort_video() if decoding failed midway
        ...
        w.finish(failures, stats)     # writes group attrs, then the marker (last)

    Frames are buffered until a whole zarr shard file (``frames_per_file`` frames) can be
    written at once; aborting a video rolls the write position back to its first frame.
    """

    def __init__(
        self,
        root: Path,
        name: str,
        group: zarr.Group,
        dtype: StorageDtype,
        feature_shape: tuple[int, int, int],
        frames_per_file: int,
    ) -> None:
        self.root, self.name, self.group = root, name, group
        self.dtype, self.feature_shape, self.block = dtype, feature_shape, frames_per_file
        self.arrays: dict[str, zarr.Array] = {k: group[k] for k in group.array_keys()}  # type: ignore[misc]
        self.videos: list[dict] = []
        self._committed = 0  # frames of finished videos
        self._pos = 0  # frames appended so far (including the open video)
        self._flushed = 0  # frames written to zarr (a multiple of block, except at finish)
        self._buffer: dict[str, list[np.ndarray]] = {k: [] for k in self.arrays}
        self._current: dict | None = None

    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        name: str,
        *,
        feature_shape: tuple[int, int, int],
        dtype: str = "float16",
        codec: str = "zstd",
        frames_per_file: int = 256,
    ) -> "ShardWriter":
        """Start the shard from scratch (an incomplete previous attempt is deleted)."""
        root = Path(root)
        if marker_path(root, name).exists():
            raise StoreError(f"shard {name} of {root} is already complete")
        shard_dir = root / "shards" / name
        if shard_dir.exists():
            shutil.rmtree(shard_dir)
        sd = STORAGE_DTYPES.get(dtype)
        compressors = CODECS.get(codec)()
        h, w, c = feature_shape
        group = zarr.open_group(str(root), mode="a").require_group("shards").create_group(name)
        spec = {"features": ((h, w, c), sd.feature_dtype), "timestamps": ((), "float64")}
        spec.update({k: ((h, w), dt) for k, dt in sd.extras.items()})
        for key, (tail, dt) in spec.items():
            group.create_array(
                key,
                shape=(0, *tail),
                chunks=(1, *tail) if tail else (frames_per_file,),
                shards=(frames_per_file, *tail),
                dtype=dt,
                compressors=compressors if key == "features" else CODECS.get("zstd")(),
                fill_value=0,
                dimension_names=("frame", "h", "w", "c")[: 1 + len(tail)],
            )
        return cls(root, name, group, sd, feature_shape, frames_per_file)

    def begin_video(self, entry: dict) -> None:
        """``entry``: video_id, split, label, label_name (offset/length are filled in)."""
        if self._current is not None:
            raise StoreError("begin_video() called twice without end_video()")
        self._current = {**entry, "offset": self._committed}

    def append(self, features: np.ndarray, timestamps: np.ndarray) -> None:
        """Add frames of the open video: features (n, H, W, C) float32, timestamps (n,) s."""
        self.append_encoded(self.dtype.encode(features), timestamps)

    def append_encoded(self, arrays: dict[str, np.ndarray], timestamps: np.ndarray) -> None:
        """:meth:`append` for features already passed through ``self.dtype.encode`` (the
        extraction does that on its inference threads, off the writer's critical path)."""
        if self._current is None:
            raise StoreError("append() outside begin_video()/end_video()")
        features = arrays["features"]
        if features.shape[1:] != self.feature_shape or features.dtype != np.dtype(self.dtype.feature_dtype):
            raise StoreError(f"encoded features {features.dtype}{list(features.shape[1:])} != store "
                             f"{self.dtype.feature_dtype}{list(self.feature_shape)}")
        if set(arrays) != {"features", *self.dtype.extras}:
            raise StoreError(f"encoded arrays {sorted(arrays)} != {sorted(['features', *self.dtype.extras])}")
        if len(features) != len(timestamps):
            raise StoreError("features and timestamps differ in length")
        for k, v in arrays.items():
            self._buffer[k].append(v)
        self._buffer["timestamps"].append(np.asarray(timestamps, dtype=np.float64))
        self._pos += len(features)
        while self._pos - self._flushed >= self.block:
            self._flush(self.block)

    def end_video(self) -> dict:
        assert self._current is not None
        entry = {**self._current, "length": self._pos - self._committed}
        self.videos.append(entry)
        self._committed = self._pos
        self._current = None
        return entry

    def abort_video(self) -> None:
        """Drop the open video's frames; the next video starts where it started."""
        self._current = None
        if self._flushed > self._committed:
            # part of it reached zarr: reload the block's head so the block is rewritten whole
            start = (self._committed // self.block) * self.block
            self._buffer = {
                k: [np.asarray(a[start : self._committed])] for k, a in self.arrays.items()
            }
            self._flushed = start
        else:
            keep = self._committed - self._flushed
            self._buffer = {k: [_concat(v)[:keep]] for k, v in self._buffer.items()}
        self._pos = self._committed

    def _flush(self, n: int) -> None:
        start, stop = self._flushed, self._flushed + n
        for k, a in self.arrays.items():
            data = _concat(self._buffer[k])
            block, rest = data[:n], data[n:]
            if a.shape[0] < stop:
                a.resize((stop, *a.shape[1:]))
            a[start:stop] = block
            self._buffer[k] = [rest]
        self._flushed = stop

    def finish(self, failures: Sequence[Failure] = (), stats: dict | None = None) -> dict:
        """Write the last block, the shard attributes, then the completion marker."""
        if self._current is not None:
            raise StoreError("finish() with a video still open")
        if self._pos > self._flushed:
            self._flush(self._pos - self._flushed)
        for a in self.arrays.values():
            if a.shape[0] != self._pos:
                a.resize((self._pos, *a.shape[1:]))
        self.group.attrs["videos"] = self.videos
        marker = {
            "shard": self.name,
            "num_frames": self._pos,
            "videos": self.videos,
            "failures": [asdict(f) for f in failures],
            "stats": stats or {},
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _atomic_write_json(marker_path(self.root, self.name), marker)
        return marker


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if len(p)] or parts[:1]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# --------------------------------------------------------------------------------------
# reader
# --------------------------------------------------------------------------------------
class FeatureStore:
    """Read-only view of a store's *completed* shards.

    Safe to use from DataLoader workers: zarr handles are opened lazily per process.
    With ``in_memory=True`` every shard is read once into RAM (fast random access for small
    stores, e.g. training ablations).
    """

    def __init__(self, path: str | os.PathLike, *, in_memory: bool = False) -> None:
        self.path = Path(path)
        self.header = read_header(self.path)
        self.content: dict = self.header.get("content", {})
        self.dtype = STORAGE_DTYPES.get(self.content.get("dtype", "float16"))
        self.markers = read_markers(self.path)
        self._index: dict[str, VideoEntry] = {}
        for shard, marker in self.markers.items():
            for v in marker["videos"]:
                e = VideoEntry(
                    video_id=v["video_id"], shard=shard, offset=int(v["offset"]),
                    length=int(v["length"]), split=v.get("split", "train"),
                    label=v.get("label"), label_name=v.get("label_name"),
                )
                if e.video_id in self._index:
                    raise StoreError(f"{self.path}: video {e.video_id!r} stored twice")
                self._index[e.video_id] = e
        self._handles: dict[str, dict[str, zarr.Array]] = {}
        self._pid = os.getpid()
        self._memory: dict[str, dict[str, np.ndarray]] | None = None
        if in_memory:
            self.load_into_memory()

    # ---- index -------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        """The store header (resolved config, backbone, weights sha256, provenance...)."""
        return self.header

    @property
    def video_ids(self) -> list[str]:
        return list(self._index)

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every stored frame."""
        return tuple(self.content["feature_shape"])  # type: ignore[return-value]

    def meta(self, video_id: str) -> VideoEntry:
        try:
            return self._index[video_id]
        except KeyError:
            raise KeyError(f"video {video_id!r} is not in store {self.path}") from None

    def num_frames(self, video_id: str) -> int:
        return self.meta(video_id).length

    def split_ids(self, split: str) -> list[str]:
        return [v for v, e in self._index.items() if e.split == split]

    def splits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self._index.values():
            out[e.split] = out.get(e.split, 0) + 1
        return out

    def failures(self) -> list[Failure]:
        """Failures of videos that are not (yet) stored, latest attempt last."""
        out: dict[str, Failure] = {}
        for marker in self.markers.values():
            for f in marker.get("failures", []):
                if f["video_id"] not in self._index:
                    out[f["video_id"]] = Failure(**f)
        return list(out.values())

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, video_id: object) -> bool:
        return video_id in self._index

    # ---- arrays ------------------------------------------------------------------------
    def _arrays(self, shard: str) -> dict[str, Any]:
        if self._memory is not None:
            return self._memory[shard]
        if os.getpid() != self._pid:
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            g = zarr.open_group(str(self.path / "shards" / shard), mode="r")
            self._handles[shard] = {k: g[k] for k in g.array_keys()}  # type: ignore[misc]
        return self._handles[shard]

    def load_into_memory(self) -> None:
        """Read every completed shard into RAM (decoded lazily per access as usual)."""
        mem = {}
        for shard in self.markers:
            g = zarr.open_group(str(self.path / "shards" / shard), mode="r")
            mem[shard] = {k: g[k][...] for k in g.array_keys()}
        self._memory = mem

    def features(self, video_id: str, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Features of a video as float32 (T, H, W, C); ``indices`` selects frames (0-based)."""
        e = self.meta(video_id)
        arrays = self._arrays(e.shard)
        keys = ["features", *self.dtype.extras]
        if indices is None:
            sel: Any = slice(e.offset, e.offset + e.length)
            raw = {k: np.asarray(arrays[k][sel]) for k in keys}
        else:
            idx = np.asarray(indices, dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= e.length):
                raise IndexError(f"frame index out of range [0, {e.length}) for {video_id!r}")
            uniq, inverse = np.unique(idx, return_inverse=True)
            rows = uniq + e.offset
            raw = {k: _take(arrays[k], rows)[inverse] for k in keys}
        return self.dtype.decode(raw)

    def timestamps(self, video_id: str) -> np.ndarray:
        """Presentation time of each stored frame, seconds, shape (T,)."""
        e = self.meta(video_id)
        return np.asarray(self._arrays(e.shard)["timestamps"][e.offset : e.offset + e.length])


def _runs(rows: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Sorted unique rows -> [start, stop) runs, merging gaps of at most ``max_gap`` rows."""
    cuts = np.flatnonzero(np.diff(rows) > max_gap + 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(rows, cuts)]


def _take(array: Any, rows: np.ndarray, max_gap: int = 2) -> np.ndarray:
    """Rows (sorted, unique) of a zarr or numpy array.

    zarr's per-call overhead dominates scattered reads (a ``get_orthogonal_selection`` of 8
    frames costs about 8 single-frame reads), so rows are grouped into runs and every run is
    read as a slice, all concurrently in one event-loop call.
    """
    if isinstance(array, np.ndarray) or len(rows) == 0:
        return np.asarray(array[rows] if isinstance(array, np.ndarray) else array[0:0])
    runs = _runs(rows, max_gap)
    if len(runs) == 1:
        start, stop = runs[0]
        block = np.asarray(array[start:stop])
    else:
        import asyncio

        from zarr.core.sync import sync

        async_array = array._async_array

        async def read_all() -> list:
            return await asyncio.gather(*[async_array.getitem(slice(a, b)) for a, b in runs])

        block = np.concatenate([np.asarray(b) for b in sync(read_all())])
    offsets = np.concatenate([np.arange(a, b) for a, b in runs])
    return block[np.searchsorted(offsets, rows)]


def open_store(path: str | os.PathLike, *, in_memory: bool = False) -> FeatureStore:
    """Open a feature store for reading (see :class:`FeatureStore`)."""
    return FeatureStore(path, in_memory=in_memory)


# --------------------------------------------------------------------------------------
# status and verification
# --------------------------------------------------------------------------------------
@dataclass
class StoreStatus:
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

    @property
    def pending_shards(self) -> int:
        base = sum(1 for s in self._complete_names if not s.startswith("retry"))
        return max(self.planned_shards - base - len(self.in_progress_shards), 0)

    _complete_names: list[str] = field(default_factory=list, repr=False)


def store_status(path: str | os.PathLike) -> StoreStatus:
    """Progress of a store from its markers and shard folders (works while it is being written)."""
    root = Path(path)
    header = read_header(root)
    markers = read_markers(root)
    shard_dirs = sorted(p.name for p in (root / "shards").iterdir() if p.is_dir()) if (root / "shards").exists() else []
    in_progress = [s for s in shard_dirs if s not in markers]
    stored = {v["video_id"] for m in markers.values() for v in m["videos"]}
    failed = {f["video_id"] for m in markers.values() for f in m.get("failures", [])} - stored
    st = StoreStatus(
        planned_shards=int(header["content"].get("num_shards", 0)),
        complete_shards=sum(1 for s in markers if not s.startswith("retry")),
        in_progress_shards=in_progress,
        videos_stored=len(stored),
        frames_stored=sum(int(m["num_frames"]) for m in markers.values()),
        failures=len(failed),
        planned_videos=int(header["content"].get("num_videos", 0)),
        writing_shards=[s for s in in_progress if shard_locked(root, s)],
    )
    st._complete_names = list(markers)
    return st


def verify_store(path: str | os.PathLike, *, scan_values: bool = True, block: int = 256) -> list[str]:
    """Check a store against its markers; return the list of problems (empty = healthy).

    Checks: every planned shard complete; no shard folder without a marker; array lengths
    equal the marker's frame count; videos contiguous and inside the arrays; no video stored
    twice; stored + failed videos account for the manifest; timestamps non-decreasing per
    video; (``scan_values``) no NaN or inf in features or scales.
    """
    root = Path(path)
    problems: list[str] = []
    try:
        header = read_header(root)
    except StoreError as e:
        return [str(e)]
    content = header.get("content", {})
    markers = read_markers(root)
    shard_dirs = {p.name for p in (root / "shards").iterdir() if p.is_dir()} if (root / "shards").exists() else set()
    for s in sorted(shard_dirs - set(markers)):
        if shard_locked(root, s):
            problems.append(f"shard {s}: incomplete, being written now by a running extraction")
        else:
            problems.append(f"shard {s}: incomplete (no completion marker); rerun `freezeframe extract`")
    for s in sorted(set(markers) - shard_dirs):
        problems.append(f"shard {s}: marker without arrays")
    planned = int(content.get("num_shards", 0))
    base_done = {int(s) for s in markers if s.isdigit()}
    missing = sorted(set(range(planned)) - base_done)
    if missing:
        problems.append(f"{len(missing)} planned shard(s) not complete: {missing[:20]}")
    seen: dict[str, str] = {}
    for s, m in markers.items():
        if s not in shard_dirs:
            continue
        g = zarr.open_group(str(root / "shards" / s), mode="r")
        arrays = {k: g[k] for k in g.array_keys()}
        n = int(m["num_frames"])
        for k, a in arrays.items():
            if a.shape[0] != n:
                problems.append(f"shard {s}: array {k} has {a.shape[0]} frames, marker says {n}")
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
        if scan_values:
            for k in ("features", "scales"):
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


def iter_video_entries(store: FeatureStore, split: str | None = None) -> Iterable[VideoEntry]:
    for vid in store.video_ids:
        e = store.meta(vid)
        if split is None or e.split == split:
            yield e
