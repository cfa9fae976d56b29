"""Writing a store shard: storage dtypes (float32 -> stored arrays and back), codecs, and
:class:`ShardWriter`, the single writer of one shard.

A store shard has exactly one writer. Frames are buffered and written in blocks aligned to
the zarr shard files, so no zarr shard is ever partially rewritten by two writers. The
completion marker is written last; a shard without a marker is incomplete and is redone.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline.errors import StoreError
from pipeline.registry import Registry
from pipeline.store.fs import Claim, StoreFS, StoreRoot, store_fs
from pipeline.store.integrity import ARRAY_CONFIG, INTEGRITY_VERSION, checksummed, file_table, marker_digest
from pipeline.store.layout import Failure, marker_key


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

#: arrays of the PEA return views (``ShardWriter.create(pea_views=K)``): ``pea_features`` and
#: ``pea_<extra>`` hold a storage dtype's arrays with a view axis after the frame axis
PEA_PREFIX = "pea_"
PEA_OFFSETS = "pea_offsets"


def encode_pea(dtype: StorageDtype, views: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
    """PEA views ``(n, K, H, W, C)`` float32 and offsets ``(n, K, 2)`` -> their stored arrays."""
    out = {PEA_PREFIX + k: v for k, v in dtype.encode(views).items()}
    out[PEA_OFFSETS] = np.ascontiguousarray(offsets, dtype=np.int32)
    return out


def decode_pea(dtype: StorageDtype, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The inverse of :func:`encode_pea` for the views: stored arrays -> float32."""
    return dtype.decode({k[len(PEA_PREFIX):]: v for k, v in arrays.items() if k != PEA_OFFSETS})


#: arrays of the spatial test crops (``ShardWriter.create(test_crops=3)``): ``crop_features``
#: and ``crop_<extra>`` hold the 2 side crops of every frame (axis 1: first side, second side:
#: left/right, or top/bottom for portrait video); the centre crop is the main ``features``. Rows
#: of videos stored without crops are zeros (``VideoEntry.crops`` / the marker's ``crops``).
CROP_PREFIX = "crop_"
#: side crops stored per frame (the centre crop is the main array)
SIDE_CROPS = 2


def encode_crops(dtype: StorageDtype, sides: np.ndarray) -> dict[str, np.ndarray]:
    """Side crops ``(n, 2, H, W, C)`` float32 -> their stored arrays."""
    return {CROP_PREFIX + k: v for k, v in dtype.encode(sides).items()}


def decode_crops(dtype: StorageDtype, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The inverse of :func:`encode_crops`: stored arrays -> float32 ``(n, 2, H, W, C)``."""
    return dtype.decode({k[len(CROP_PREFIX):]: v for k, v in arrays.items()})


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
        root: StoreFS,
        name: str,
        group: zarr.Group,
        dtype: StorageDtype,
        feature_shape: tuple[int, int, int],
        frames_per_file: int,
        integrity: int = INTEGRITY_VERSION,
        claim: Claim | None = None,
    ) -> None:
        self.fs, self.name, self.group = root, name, group
        self.root: Any = root.path()  # a Path for local stores, the URL otherwise
        self.claim = claim
        self.dtype, self.feature_shape, self.block = dtype, feature_shape, frames_per_file
        self.integrity = integrity
        config = ARRAY_CONFIG if integrity >= 1 else {}
        self.arrays: dict[str, zarr.Array] = {k: group[k].with_config(config)  # type: ignore[union-attr]
                                              for k in group.array_keys()}
        self.videos: list[dict] = []
        self._committed = 0  # frames of finished videos
        self._pos = 0  # frames appended so far (including the open video)
        self._flushed = 0  # frames written to zarr (a multiple of block, except at finish)
        self._buffer: dict[str, list[np.ndarray]] = {k: [] for k in self.arrays}
        self._current: dict | None = None

    @property
    def pea_views(self) -> int:
        """K, the PEA return views stored per frame (0: none)."""
        a = self.arrays.get(PEA_PREFIX + "features")
        return int(a.shape[1]) if a is not None else 0

    @property
    def test_crops(self) -> int:
        """Spatial test crops a frame of a video with crops has: 3 when the shard declares the
        side-crop arrays, else 1."""
        return 1 + SIDE_CROPS if CROP_PREFIX + "features" in self.arrays else 1

    @classmethod
    def create(
        cls,
        root: StoreRoot,
        name: str,
        *,
        feature_shape: tuple[int, int, int],
        dtype: str = "float16",
        codec: str = "zstd",
        frames_per_file: int = 256,
        integrity: int = INTEGRITY_VERSION,
        pea_views: int = 0,
        test_crops: int = 1,
        claim: Claim | None = None,
    ) -> "ShardWriter":
        """Start the shard from scratch (an incomplete previous attempt is deleted).

        Every array gets chunk checksums and the marker a file table and digest
        (:mod:`pipeline.store.integrity`); ``integrity=0`` writes the format of stores made
        before them (only for tests of such stores).

        ``pea_views`` = K > 0 also declares the PEA return views of every frame (Co-Settle,
        ``extract.pea``): ``pea_features`` (N, K, H, W, C) in the storage dtype (plus
        ``pea_scales`` (N, K, H, W) for int8) and ``pea_offsets`` (N, K, 2) int32, the window
        offsets ``(oy, ox)`` of each view.

        ``test_crops`` = 3 also declares the 2 side crops of every frame (:data:`CROP_PREFIX`):
        ``crop_features`` (N, 2, H, W, C) in the storage dtype (plus ``crop_scales`` (N, 2, H, W)
        for int8); rows of videos without crops are zeros.

        ``claim``: the shard's claim (:func:`pipeline.store.shard_claim`), checked before the
        marker is written, so a writer whose lease another took over never commits.
        """
        fs = store_fs(root)
        if fs.exists(marker_key(name)):
            raise StoreError(f"shard {name} of {fs} is already complete")
        fs.delete(f"shards/{name}", recursive=True)
        sd = STORAGE_DTYPES.get(dtype)
        compressors = CODECS.get(codec)()
        h, w, c = feature_shape
        group = zarr.open_group(fs.zarr_store(), mode="a").require_group("shards").create_group(name)
        spec = {"features": ((h, w, c), sd.feature_dtype), "timestamps": ((), "float64")}
        spec.update({k: ((h, w), dt) for k, dt in sd.extras.items()})
        names: dict[str, tuple[str, ...]] = {k: ("frame", "h", "w", "c")[: 1 + len(t)] for k, (t, _) in spec.items()}
        if pea_views:
            k = int(pea_views)
            spec.update({PEA_PREFIX + "features": ((k, h, w, c), sd.feature_dtype), PEA_OFFSETS: ((k, 2), "int32")})
            spec.update({PEA_PREFIX + e: ((k, h, w), dt) for e, dt in sd.extras.items()})
            names.update({PEA_PREFIX + "features": ("frame", "view", "h", "w", "c"),
                          PEA_OFFSETS: ("frame", "view", "yx")},
                         **{PEA_PREFIX + e: ("frame", "view", "h", "w") for e in sd.extras})
        if test_crops not in (1, 1 + SIDE_CROPS):
            raise StoreError(f"test_crops must be 1 or {1 + SIDE_CROPS}, got {test_crops!r}")
        if test_crops > 1:
            spec.update({CROP_PREFIX + "features": ((SIDE_CROPS, h, w, c), sd.feature_dtype)})
            spec.update({CROP_PREFIX + e: ((SIDE_CROPS, h, w), dt) for e, dt in sd.extras.items()})
            names.update({CROP_PREFIX + "features": ("frame", "crop", "h", "w", "c")},
                         **{CROP_PREFIX + e: ("frame", "crop", "h", "w") for e in sd.extras})
        for key, (tail, dt) in spec.items():
            codecs = compressors if key.endswith("features") else CODECS.get("zstd")()
            group.create_array(
                key,
                shape=(0, *tail),
                chunks=(1, *tail) if tail else (frames_per_file,),
                shards=(frames_per_file, *tail),
                dtype=dt,
                compressors=checksummed(codecs) if integrity >= 1 else codecs,
                fill_value=0,
                dimension_names=names[key],
                config=ARRAY_CONFIG if integrity >= 1 else None,
            )
        return cls(fs, name, group, sd, feature_shape, frames_per_file, integrity, claim)

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
        if set(arrays) != set(self.arrays) - {"timestamps"}:
            raise StoreError(f"encoded arrays {sorted(arrays)} != {sorted(set(self.arrays) - {'timestamps'})}")
        if any(len(a) != len(features) for a in arrays.values()):
            raise StoreError("encoded arrays differ in length")
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
        """Write the last block, the shard attributes, then the completion marker (with the
        table of the shard's files and its digest: :mod:`pipeline.store.integrity`)."""
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
        if self.integrity >= 1:
            marker["integrity"] = self.integrity
            marker["files"] = file_table(self.fs, f"shards/{self.name}")
            marker["digest"] = marker_digest(marker)
        if self.claim is not None:
            self.claim.check()  # LeaseLost: another writer took the shard over; it commits, not us
        self.fs.write_atomic(marker_key(self.name), (json.dumps(marker, indent=1, default=str) + "\n").encode())
        return marker


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    parts = [p for p in parts if len(p)] or parts[:1]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
