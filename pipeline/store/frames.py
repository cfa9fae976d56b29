"""Fast reads of scattered frames of a store array: one file open per shard file, one
``pread`` per frame chunk, decompressed in this thread (no zarr event loop).

A training clip is 8-32 frames spread over one video; through zarr, every read goes through
its event loop thread and codec pipeline, which costs several times the decompression itself
(``make bench-train``, docs/benchmarks.md). The arrays :class:`~pipeline.store.ShardWriter`
writes have one frame per inner chunk inside shard files of ``frames_per_file`` frames
(zarr v3 ``sharding_indexed``), so a frame is one byte range of one file, found in the
shard file's index. :class:`FrameReader` reads exactly that layout, and only it:

    sharding_indexed(chunk = 1 frame, index at the end: bytes + crc32c,
                     codecs: bytes(little) -> zstd -> crc32c)

which is what the default codec (``zstd``) with chunk checksums (integrity >= 1) writes.
Any other array (blosc, no compression, no checksums, another chunking) is read by zarr:
:func:`frame_reader` returns None for it. Checksums are verified exactly as zarr does (crc32c
of the chunk and of the index), and a failure is a ``ValueError`` the store reader turns into
its usual :class:`~pipeline.errors.StoreError` naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from numcodecs import Zstd
from numcodecs.checksum32 import crc32c_checksum

from pipeline.store.integrity import frames_per_file, shard_file_key

__all__ = ["FrameReader", "frame_reader"]

_EMPTY = np.uint64(2**64 - 1)  # zarr's marker of a chunk that was never written (fill value)


def _layout_ok(meta: dict[str, Any]) -> bool:
    """True when the array metadata is exactly the layout :class:`FrameReader` reads."""
    codecs = meta.get("codecs", [])
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return False
    conf = codecs[0]["configuration"]
    inner = [c.get("name") for c in conf.get("codecs", [])]
    index = [c.get("name") for c in conf.get("index_codecs", [])]
    endian = [c.get("configuration", {}).get("endian", "little") for c in conf.get("codecs", [])
              if c.get("name") == "bytes"]
    shape = meta.get("shape", [])
    return (inner == ["bytes", "zstd", "crc32c"] and index == ["bytes", "crc32c"] and endian == ["little"]
            and conf.get("index_location", "end") == "end" and len(shape) >= 1
            and list(conf.get("chunk_shape", [])) == [1, *shape[1:]])


class FrameReader:
    """Frames (rows) of one zarr v3 array in the layout above, read without zarr.

    ``rows`` are absolute row numbers of the array; the result is ``(len(rows), *frame_shape)``
    in the array's dtype (e.g. float16), rows in the order asked (repeats allowed).
    """

    def __init__(self, folder: Path, array: Any) -> None:
        self.folder = folder
        self.array = array
        self.per_file = frames_per_file(array)
        self.frame_shape = tuple(int(s) for s in array.shape[1:])
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.fill = array.metadata.fill_value
        self._zstd = Zstd()
        self._index_bytes = self.per_file * 16 + 4

    def file(self, number: int) -> Path:
        """Path of shard file ``number`` (rows ``number * per_file`` onwards)."""
        return self.folder / shard_file_key(self.array, number)

    def read(self, rows: np.ndarray, out: np.ndarray | None = None, dest: np.ndarray | None = None) -> np.ndarray:
        """``(len(rows), *frame_shape)`` frames, decompressed straight into ``out`` when given.

        ``dest``: row ``rows[j]`` goes to ``out[dest[j]]`` instead of ``out[j]`` (``out`` given,
        C-contiguous, any length): a batch gathered from several videos of one shard file set
        is then one call, written into its places in the batch tensor without a copy."""
        rows = np.asarray(rows, dtype=np.int64)
        if dest is None:
            if out is None:
                out = np.empty((len(rows), *self.frame_shape), dtype=self.dtype)
            elif out.shape != (len(rows), *self.frame_shape):
                raise ValueError(f"out must be C-contiguous {self.dtype} {(len(rows), *self.frame_shape)}, "
                                 f"got {out.dtype} {out.shape}")
            dest = np.arange(len(rows))
        else:
            dest = np.asarray(dest, dtype=np.int64)
            if out is None or dest.shape != rows.shape or out.shape[1:] != self.frame_shape or (
                    len(dest) and (dest.min() < 0 or dest.max() >= len(out))):
                raise ValueError(f"dest needs out (n, {', '.join(map(str, self.frame_shape))}) and one index in "
                                 f"[0, n) per row, got dest {dest.shape} for {rows.shape} rows and out "
                                 f"{None if out is None else out.shape}")
        if out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous {self.dtype} (n, {', '.join(map(str, self.frame_shape))}), "
                             f"got {out.dtype} {out.shape}")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.array.shape[0]):
            raise IndexError(f"rows out of range [0, {self.array.shape[0]}) of {self.folder}")
        files = rows // self.per_file
        for number in np.unique(files):
            where = np.flatnonzero(files == number)
            self._read_file(int(number), rows[where], dest[where], out)
        return out

    def _read_file(self, number: int, rows: np.ndarray, dest: np.ndarray, out: np.ndarray) -> None:
        """Rows ``rows`` (all in shard file ``number``) into ``out[dest]``."""
        path = self.file(number)
        fd = os.open(path, os.O_RDONLY)  # a missing file: FileNotFoundError, turned into a StoreError upstream
        try:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, self._index_bytes, size - self._index_bytes)
            index = np.frombuffer(_checked(raw, path, "index"), dtype="<u8").reshape(self.per_file, 2)
            done: dict[int, int] = {}
            for row, j in zip(rows.tolist(), dest.tolist()):
                inner = row % self.per_file
                if inner in done:  # the same frame twice in one clip (wrap-around, rate < 1)
                    out[j] = out[done[inner]]
                    continue
                offset, nbytes = index[inner]
                if offset == _EMPTY:
                    out[j] = self.fill
                else:
                    chunk = _checked(os.pread(fd, int(nbytes), int(offset)), path, f"chunk {inner}")
                    self._zstd.decode(chunk, out=out[j])  # decompressed straight into the result
                done[inner] = j
        finally:
            os.close(fd)


def _checked(data: bytes, path: Path, what: str) -> bytes:
    """``data`` without its trailing crc32c, after checking it (zarr's ``crc32c`` codec)."""
    if len(data) < 4 or crc32c_checksum(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ValueError(f"{path}: {what} fails its crc32c checksum (or is cut)")
    return data[:-4]


def frame_reader(folder: Path, array: Any) -> FrameReader | None:
    """A :class:`FrameReader` of the zarr array in ``folder``, or None when its layout is not
    the one it reads (then read it with zarr)."""
    try:
        meta = array.metadata.to_dict()
    except AttributeError:
        return None
    return FrameReader(folder, array) if _layout_ok(meta) else None
