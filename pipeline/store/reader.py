"""Reading a store: :class:`FeatureStore` over its *completed* shards, :func:`open_store`.

Every array is a plain zarr v3 array, so any zarr v3 reader can open it too; the per-video
table of a shard is in its completion marker and in the shard group's attributes (``videos``).

The reader never hands out numbers it cannot vouch for: an edited marker (digest), a missing
or cut shard file (the marker's file table; zarr would read a missing one as zeros) and a
chunk whose checksum fails are a :class:`~pipeline.errors.StoreError` naming the file and
saying what to do (``freezeframe verify``, then ``--repair``). See
:mod:`pipeline.store.integrity`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np
import zarr
from zarr.core.sync import sync

from pipeline.errors import StoreError
from pipeline.splits import SplitEntry, split_table_sha256
from pipeline.store.frames import FrameReader, frame_reader
from pipeline.store.fs import LocalFS, StoreRoot, store_fs
from pipeline.store.header import read_header
from pipeline.store.integrity import expected_files, frames_per_file, marker_digest, shard_file_key
from pipeline.store.layout import Failure, VideoEntry, read_markers
from pipeline.store.writer import CROP_PREFIX, PEA_OFFSETS, PEA_PREFIX, STORAGE_DTYPES, decode_crops, decode_pea


class FeatureStore:
    """Read-only view of a store's *completed* shards.

    Safe to use from DataLoader workers: zarr handles are opened lazily per process.
    With ``in_memory=True`` every shard is read once into RAM (fast random access for small
    stores, e.g. training ablations). ``path`` is a local path or an fsspec URL
    (``s3://bucket/x.zarr``; ``storage_options`` or the environment give credentials and
    endpoint, :func:`pipeline.store.fs.store_fs`).
    """

    def __init__(self, path: StoreRoot, *, in_memory: bool = False,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.fs = store_fs(path, storage_options)
        self.path: Any = self.fs.path()  # a Path for local stores, the URL otherwise
        self.header = read_header(self.fs)
        self.content: dict = self.header.get("content", {})
        self.dtype = STORAGE_DTYPES.get(self.content.get("dtype", "float16"))
        self.markers = read_markers(self.fs)
        self._index: dict[str, VideoEntry] = {}
        for shard, marker in self.markers.items():
            if "digest" in marker and marker_digest(marker) != marker["digest"]:
                raise StoreError(f"{self.path}/markers/{shard}.json was edited or damaged (its digest does not "
                                 f"match its videos/labels/files); {self._fix()}")
            for v in marker["videos"]:
                e = VideoEntry(
                    video_id=v["video_id"], shard=shard, offset=int(v["offset"]),
                    length=int(v["length"]), split=v.get("split", "train"),
                    label=v.get("label"), label_name=v.get("label_name"), crops=bool(v.get("crops", False)),
                )
                if e.video_id in self._index:
                    raise StoreError(f"{self.path}: video {e.video_id!r} stored twice")
                self._index[e.video_id] = e
        self._handles: dict[str, dict[str, zarr.Array]] = {}
        self._frame_readers: dict[tuple[str, str], FrameReader | None] = {}
        self._pid = os.getpid()
        self._memory: dict[str, dict[str, np.ndarray]] | None = None
        self.split_table: str | None = None  # sha256 of the split table applied (None: the store's own splits)
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
            if e.split:  # "": left out by a split table
                out[e.split] = out.get(e.split, 0) + 1
        return out

    def apply_split_table(self, table: dict[str, SplitEntry], source: str = "the split table") -> None:
        """Take splits (and labels, where the table gives them) from ``table`` instead of the
        ones recorded at extraction; videos of the store not in the table are in no split.

        Every video of the table must be stored: otherwise one :class:`StoreError` lists the
        missing ones (with the reason of those that failed at extraction)."""
        missing = [v for v in table if v not in self._index]
        if missing:
            failed = {f.video_id: f for f in self.failures()}
            lines = [f"  - {v}" + (f" (failed at extraction: {failed[v].stage}: {failed[v].message})"
                                   if v in failed else "") for v in missing[:50]]
            more = [f"  ... and {len(missing) - 50} more"] if len(missing) > 50 else []
            raise StoreError(
                f"{len(missing)} video(s) of {source} are not in store {self.path} ({len(table) - len(missing)} "
                "are); extract them (a manifest that lists them), or leave them out of the table:\n"
                + "\n".join(lines + more))
        for vid, e in self._index.items():
            t = table.get(vid)
            if t is None:
                self._index[vid] = dataclasses.replace(e, split="")
            elif t.has_label:
                self._index[vid] = dataclasses.replace(e, split=t.split, label=t.label, label_name=t.label_name)
            else:
                self._index[vid] = dataclasses.replace(e, split=t.split)
        self.split_table = split_table_sha256(table)

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
            self._handles, self._frame_readers, self._pid = {}, {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = self._open_shard(shard)
        return self._handles[shard]

    def _fix(self) -> str:
        return (f"run `freezeframe verify {self.path}` for the whole list, `--repair` to remove the damaged "
                "shards, then rerun the same `freezeframe extract` command to re-extract them")

    def _open_shard(self, shard: str) -> dict[str, Any]:
        """The arrays of a completed shard, after checking that its files are all there whole.

        Files are checked against the marker's file table (sizes: one ``stat`` each), or,
        for a marker without one (integrity 0), the shard files the arrays' shapes imply;
        zarr itself would read a missing shard file as zeros.
        """
        fs, sdir = self.fs, f"shards/{shard}"
        marker = self.markers[shard]
        for rel, rec in marker.get("files", {}).items():
            p = fs.path(f"{sdir}/{rel}")
            size = fs.size(f"{sdir}/{rel}")
            if size != rec["bytes"]:
                state = "missing" if size is None else f"{size} bytes, the marker records {rec['bytes']}"
                raise StoreError(f"{p}: {state} (shard {shard}: {self._shard_videos(shard)}); {self._fix()}")
        arrays: dict[str, Any] = {}
        names = {"features", "timestamps", *self.dtype.extras}
        names |= {rel.split("/")[0] for rel in marker.get("files", {}) if rel.endswith("/zarr.json")}
        for k in sorted(names):
            try:
                arrays[k] = zarr.open_array(fs.zarr_store(f"{sdir}/{k}", read_only=True), mode="r")
            except Exception as e:  # zarr raises many kinds (not found, JSON, metadata)
                raise StoreError(f"{fs.path(f'{sdir}/{k}/zarr.json')}: array metadata unreadable ({type(e).__name__}: "
                                 f"{e}) (shard {shard}: {self._shard_videos(shard)}); {self._fix()}") from e
            if "files" not in marker:
                for key, _, _ in expected_files(arrays[k], int(marker["num_frames"])):
                    if not fs.size(f"{sdir}/{k}/{key}"):
                        raise StoreError(f"{fs.path(f'{sdir}/{k}/{key}')}: missing or empty (shard {shard}: {self._shard_videos(shard)}); "
                                         f"{self._fix()}")
        return arrays

    def _shard_videos(self, shard: str, rows: tuple[int, int] | None = None) -> str:
        """"videos a, b" of a shard (only those overlapping ``rows`` [start, stop) if given)."""
        vids = [v["video_id"] for v in self.markers[shard]["videos"]
                if rows is None or (int(v["offset"]) < rows[1] and int(v["offset"]) + int(v["length"]) > rows[0])]
        return "videos " + (", ".join(vids[:6]) + (f" and {len(vids) - 6} more" if len(vids) > 6 else "")
                            if vids else "none")

    def _read(self, shard: str, key: str, array: Any, read: Any, rows: np.ndarray) -> np.ndarray:
        """``read()`` of ``array`` (rows ``rows`` of ``key`` in ``shard``); a failed read (bad
        checksum, cut file) becomes a :class:`StoreError` naming the shard file that fails."""
        try:
            return read()
        except Exception as e:  # zarr/numcodecs raise ValueError, RuntimeError, ... on damage
            raise self._damage(shard, key, array, rows, e) from e

    def _damage(self, shard: str, key: str, array: Any, rows: np.ndarray, error: Exception) -> StoreError:
        """Which shard file of ``array`` holding ``rows`` fails to read, as a StoreError."""
        per = frames_per_file(array)
        bad, why = None, error
        for i in sorted({int(r) // per for r in np.atleast_1d(rows)}):
            try:
                array[i * per : min(array.shape[0], (i + 1) * per)]
            except Exception as e:
                bad, why = i, e
                break
        i = bad if bad is not None else int(np.atleast_1d(rows)[0]) // per
        path = self.fs.path(f"shards/{shard}/{key}/{shard_file_key(array, i)}")
        span = (i * per, (i + 1) * per)
        return StoreError(f"{path}: damaged, cannot be read ({type(why).__name__}: {str(why)[:120]}) "
                          f"(shard {shard} frames {span[0]}..{span[1] - 1}: {self._shard_videos(shard, span)}); "
                          f"{self._fix()}")

    def load_into_memory(self) -> None:
        """Read every completed shard into RAM (decoded lazily per access as usual)."""
        mem = {}
        for shard in self.markers:
            arrays = self._open_shard(shard)
            mem[shard] = {k: self._read(shard, k, a, lambda a=a: a[...], np.arange(a.shape[0]))
                          for k, a in arrays.items()}
        self._memory = mem

    def features(self, video_id: str, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Features of a video as float32 (T, H, W, C); ``indices`` selects frames (0-based)."""
        return self.dtype.decode(self.stored_features(video_id, indices))

    def stored_features(self, video_id: str, indices: Sequence[int] | np.ndarray | None = None,
                        out: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The stored arrays of a video's frames, not decoded: ``features`` (T, H, W, C) in the
        storage dtype (float16 by default) and the dtype's extras (int8: ``scales`` (T, H, W));
        ``self.dtype.decode`` of them is :meth:`features`. Training keeps float16 until the
        device (half the bytes through the loader and the host-to-device copy). ``out``: an
        array ``(len(indices), H, W, C)`` of the storage dtype to read ``features`` into (a
        slice of a batch: no copy), with ``indices`` given."""
        e = self.meta(video_id)
        arrays = self._arrays(e.shard)
        keys = ["features", *self.dtype.extras]
        if indices is None:
            if out is not None:
                raise ValueError("stored_features(out=...) needs the frame indices")
            sel: Any = slice(e.offset, e.offset + e.length)
            span = np.arange(e.offset, e.offset + e.length)
            return {k: self._read(e.shard, k, arrays[k], lambda k=k: np.asarray(arrays[k][sel]), span)
                    for k in keys}
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= e.length):
            raise IndexError(f"frame index out of range [0, {e.length}) for {video_id!r}")
        uniq, inverse = np.unique(idx, return_inverse=True)
        rows = uniq + e.offset
        ordered = len(uniq) == len(idx) and bool((uniq == idx).all())  # already sorted, no repeats: no reorder copy
        into = out if ordered else None
        res = {k: self._read(e.shard, k, arrays[k],
                             lambda k=k: self._rows(e.shard, k, arrays[k], rows, into if k == "features" else None), rows)
               for k in keys}
        if not ordered:
            res = {k: np.take(v, inverse, axis=0, out=out if k == "features" else None) for k, v in res.items()}
        return res

    def _frame_reader(self, shard: str, key: str, array: Any) -> FrameReader | None:
        """The :class:`~pipeline.store.frames.FrameReader` of an array when it has its layout
        and the store is local, else None (read with zarr)."""
        if isinstance(array, np.ndarray):
            return None
        if (shard, key) not in self._frame_readers:
            local = isinstance(self.fs, LocalFS)  # a remote store: zarr's reads (ranged GETs)
            self._frame_readers[shard, key] = (frame_reader(self.fs.path(f"shards/{shard}/{key}"), array)
                                               if local else None)
        return self._frame_readers[shard, key]

    def _rows(self, shard: str, key: str, array: Any, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows (sorted, unique) of an array (into ``out`` when given): by
        :class:`~pipeline.store.frames.FrameReader` when the array has its layout (one pread per
        frame, no zarr event loop), else zarr."""
        reader = self._frame_reader(shard, key, array)
        if reader is not None:
            return reader.read(rows, out)
        res = _take(array, rows)
        if out is None:
            return res
        out[...] = res
        return out

    def gather_stored(self, video_ids: Sequence[str], frames: Sequence[int] | np.ndarray, out: np.ndarray,
                      dest: Sequence[int] | np.ndarray | None = None,
                      views: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Frame ``frames[i]`` of video ``video_ids[i]`` into ``out[dest[i]]`` (default ``dest = i``),
        not decoded: ``out`` is a C-contiguous ``(n, H, W, C)`` array of the storage dtype (e.g.
        a batch tensor's ``(B x V, H, W, C)`` view). With ``views``: the PEA view ``views[i]``
        of that frame instead (``pea_features``). Returns ``out``.

        One gathered read per shard for a whole batch (one file open per shard file, one
        ``pread`` + decompression per frame, straight into ``out``) instead of one call per
        video. Reads the features array alone, so a store whose dtype has extras (int8 and its
        scales) is refused: read it with :meth:`features` / :meth:`pea_features`.
        """
        if self.dtype.extras:
            raise ValueError(f"gather_stored reads stored features without their {sorted(self.dtype.extras)}; "
                             f"read a {self.dtype.name} store with features() / pea_features()")
        n = len(video_ids)
        idx = np.asarray(frames, dtype=np.int64)
        dst = np.arange(n) if dest is None else np.asarray(dest, dtype=np.int64)
        view = None if views is None else np.asarray(views, dtype=np.int64)
        if idx.shape != (n,) or dst.shape != (n,) or (view is not None and view.shape != (n,)):
            raise IndexError(f"{n} video ids need as many frames, destinations and views; got {idx.shape}, "
                             f"{dst.shape} and {None if view is None else view.shape}")
        if (out.shape[1:] != tuple(self.feature_shape) or out.dtype != np.dtype(self.dtype.feature_dtype)
                or not out.flags.c_contiguous):
            raise ValueError(f"out must be C-contiguous {self.dtype.feature_dtype} (n, "
                             f"{', '.join(map(str, self.feature_shape))}), got {out.dtype} {out.shape}")
        if view is not None:
            self._require_pea()
            if n and (view.min() < 0 or view.max() >= self.pea_views_count):
                raise IndexError(f"PEA view index out of range [0, {self.pea_views_count})")
        key = "features" if view is None else PEA_PREFIX + "features"
        entries = [self.meta(v) for v in video_ids]
        rows = np.empty(n, dtype=np.int64)
        for i, e in enumerate(entries):
            if not 0 <= idx[i] < e.length:
                raise IndexError(f"frame index {int(idx[i])} out of range [0, {e.length}) for {e.video_id!r}")
            rows[i] = e.offset + idx[i]
        shards = np.array([e.shard for e in entries])
        for shard in dict.fromkeys(shards.tolist()):
            where = np.flatnonzero(shards == shard)
            array = self._arrays(shard)[key]
            self._read(shard, key, array, lambda: self._gather(shard, key, array, rows[where], dst[where],
                                                               None if view is None else view[where], out), rows[where])
        return out

    def _gather(self, shard: str, key: str, array: Any, rows: np.ndarray, dest: np.ndarray,
                view: np.ndarray | None, out: np.ndarray) -> None:
        """:meth:`gather_stored` within one shard: rows (any order, repeats) into ``out[dest]``."""
        reader = self._frame_reader(shard, key, array)
        if view is None or int(array.shape[1]) == 1:  # the stored row is the destination's shape
            target = out if view is None else out.reshape(len(out), 1, *out.shape[1:])  # (n, K = 1, H, W, C)
            if reader is not None:
                reader.read(rows, target, dest)
            else:
                uniq, inverse = np.unique(rows, return_inverse=True)
                target[dest] = _take(array, uniq)[inverse]
            return
        if reader is not None:  # K > 1 views per row: every view of the row is in one chunk
            block = reader.read(rows)
        else:
            uniq, inverse = np.unique(rows, return_inverse=True)
            block = _take(array, uniq)[inverse]
        out[dest] = block[np.arange(len(rows)), view]

    # ---- PEA return views (Co-Settle; ``extract --pea-views K``) -------------------------
    @property
    def pea_views_count(self) -> int:
        """K, the PEA return views stored per frame (0 when extracted without them)."""
        return int(self.content.get("pea", {}).get("views", 0))

    def _require_pea(self) -> None:
        if not self.pea_views_count:
            raise StoreError(
                f"{self.path} was extracted without PEA views; re-extract with `freezeframe extract ... "
                f"--pea-views K` (open_clip and timm ViTs) to store them")

    def pea_features(self, video_id: str, indices: Sequence[int] | np.ndarray,
                     views: Sequence[int] | np.ndarray) -> np.ndarray:
        """PEA view ``views[i]`` of frame ``indices[i]``: ``(n, H, W, C)`` float32."""
        self._require_pea()
        e = self.meta(video_id)
        idx, view = np.asarray(indices, dtype=np.int64), np.asarray(views, dtype=np.int64)
        if idx.shape != view.shape:
            raise IndexError(f"{len(idx)} frame indices but {len(view)} view indices")
        if idx.size and (idx.min() < 0 or idx.max() >= e.length):
            raise IndexError(f"frame index out of range [0, {e.length}) for {video_id!r}")
        if view.size and (view.min() < 0 or view.max() >= self.pea_views_count):
            raise IndexError(f"PEA view index out of range [0, {self.pea_views_count})")
        arrays = self._arrays(e.shard)
        keys = [PEA_PREFIX + "features", *(PEA_PREFIX + k for k in self.dtype.extras)]
        uniq, inverse = np.unique(idx, return_inverse=True)
        rows = uniq + e.offset
        raw = {k: self._read(e.shard, k, arrays[k], lambda k=k: self._rows(e.shard, k, arrays[k], rows),
                             rows)[inverse, view] for k in keys}
        return decode_pea(self.dtype, raw)

    def pea_offsets(self, video_id: str) -> np.ndarray:
        """Window offsets ``(T, K, 2)`` int ``(oy, ox)`` of every stored PEA view of a video."""
        self._require_pea()
        e = self.meta(video_id)
        return np.asarray(self._arrays(e.shard)[PEA_OFFSETS][e.offset : e.offset + e.length], dtype=np.int64)

    # ---- spatial test crops (the 30-view test; ``extract test_crops=3``) -------------------
    @property
    def test_crops_count(self) -> int:
        """Spatial crops stored per frame of a video with crops: 3 (``extract test_crops=3``) or 1."""
        return int((self.content.get("test_crops") or {}).get("crops", 1))

    def has_crops(self, video_id: str) -> bool:
        """Whether the 2 side crops of every frame of ``video_id`` are stored (its split was one of
        the extraction's ``test_crop_splits``)."""
        return self.meta(video_id).crops

    def stored_crops(self, video_id: str, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """The stored side crops of frames ``indices`` (n,) of a video, not decoded: ``crop_features``
        ``(n, 2, H, W, C)`` in the storage dtype (axis 1: left, right; top, bottom for portrait)
        and the dtype's extras (int8: ``crop_scales`` (n, 2, H, W)); :class:`StoreError` when the
        video has none."""
        e = self.meta(video_id)
        if not e.crops:
            raise StoreError(
                f"video {video_id!r} of {self.path} has no stored test crops (split {e.split!r} at extraction); "
                "re-extract with `--set test_crops=3` and its split in test_crop_splits, or test with "
                "test.spatial_crops=1")
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= e.length):
            raise IndexError(f"frame index out of range [0, {e.length}) for {video_id!r}")
        arrays = self._arrays(e.shard)
        uniq, inverse = np.unique(idx, return_inverse=True)
        rows = uniq + e.offset
        keys = [CROP_PREFIX + "features", *(CROP_PREFIX + k for k in self.dtype.extras)]
        return {k: self._read(e.shard, k, arrays[k], lambda k=k: _take(arrays[k], rows), rows)[inverse] for k in keys}

    def crop_views(self, video_id: str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The 3 spatial crops of frames ``indices`` (n,): ``(n, 3, H, W, C)`` float32, crops in
        the order first side, centre (the main features), second side."""
        sides = decode_crops(self.dtype, self.stored_crops(video_id, indices))
        centre = self.features(video_id, indices)
        return np.stack([sides[:, 0], centre, sides[:, 1]], axis=1)

    def timestamps(self, video_id: str) -> np.ndarray:
        """Presentation time of each stored frame, seconds, shape (T,)."""
        e = self.meta(video_id)
        a = self._arrays(e.shard)["timestamps"]
        return self._read(e.shard, "timestamps", a, lambda: np.asarray(a[e.offset : e.offset + e.length]),
                          np.arange(e.offset, e.offset + e.length))


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
        async_array = array._async_array

        async def read_all() -> list:
            return await asyncio.gather(*[async_array.getitem(slice(a, b)) for a, b in runs])

        block = np.concatenate([np.asarray(b) for b in sync(read_all())])
    offsets = np.concatenate([np.arange(a, b) for a, b in runs])
    return block[np.searchsorted(offsets, rows)]


def open_store(path: StoreRoot, *, in_memory: bool = False,
               storage_options: Mapping[str, Any] | None = None) -> FeatureStore:
    """Open a feature store for reading (see :class:`FeatureStore`): a path or an fsspec URL."""
    return FeatureStore(path, in_memory=in_memory, storage_options=storage_options)
