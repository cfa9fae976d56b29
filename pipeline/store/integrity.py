"""What makes a store checkable: chunk checksums, the shard file table and the marker digest.

Integrity version 1 (``header["integrity"]``, ``marker["integrity"]``):

* every chunk of every array ends in a CRC32C (zarr's ``crc32c`` codec, last of the inner
  chunk codecs of the sharding codec; the shard index has its own, zarr's default), whatever
  the dtype and codec, so a flipped bit or a cut file fails the read instead of decoding to
  other numbers;
* every chunk is written, even one equal to the fill value (``write_empty_chunks``), so the
  shard files of an array are exactly ``ceil(frames / frames_per_file)`` and a missing one
  is damage, never "all zeros";
* the completion marker records every file of its shard (path, bytes, SHA-256) and a digest
  of what it describes (videos with offsets, lengths, labels, splits; failures; frame count;
  the file table), so an edited marker or files swapped between shards are caught. (Not a
  CRC32C of the file: a shard file is a sequence of blocks that each end in their own
  CRC32C, and the CRC32C of such a sequence depends only on the block lengths, so it would
  not tell two shard files of the same layout apart.)

Version 0 is a store written before all this: it reads as before, ``verify`` says it has no
checksums. Checksum cost in bytes and write time: docs/benchmarks.md.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

from zarr.codecs import Crc32cCodec, ShardingCodec

from pipeline.config import config_hash
from pipeline.store.fs import StoreRoot, store_fs

INTEGRITY_VERSION = 1

#: zarr array config of every store array: every chunk is written, so files are predictable.
ARRAY_CONFIG: dict[str, Any] = {"write_empty_chunks": True}

#: The marker fields the digest covers (stats and the finish time are not content).
DIGEST_FIELDS = ("shard", "num_frames", "videos", "failures", "files")


def checksummed(codecs: list) -> list:
    """Bytes-to-bytes codecs of a chunk with the CRC32C last (it checks what is on disk)."""
    return [*codecs, Crc32cCodec()]


def has_chunk_checksums(array: Any) -> bool:
    """Whether every chunk of a zarr array (and its shard index) carries a CRC32C."""
    codecs = list(array.metadata.codecs)
    for c in codecs:
        if isinstance(c, ShardingCodec):
            return any(isinstance(x, Crc32cCodec) for x in c.codecs) and any(
                isinstance(x, Crc32cCodec) for x in c.index_codecs)
    return any(isinstance(c, Crc32cCodec) for c in codecs)


def sha256_key(root: StoreRoot, key: str, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of the file at ``key`` of a store, read in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with store_fs(root).open_read(key) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: StoreRoot, folder: str) -> dict[str, dict[str, Any]]:
    """Every file of the store folder ``folder`` (a shard: ``shards/<name>``; hidden
    temporaries excluded): relative POSIX path -> ``{"bytes": size, "sha256": hex}``, sorted by
    path."""
    fs = store_fs(root)
    return {rel: {"bytes": size, "sha256": sha256_key(fs, f"{folder}/{rel}")}
            for rel, size in fs.files(folder).items()}


def marker_digest(marker: dict) -> str:
    """Digest of what a marker describes (:data:`DIGEST_FIELDS`)."""
    return config_hash({k: marker.get(k) for k in DIGEST_FIELDS})


def shard_file_key(array: Any, index: int) -> str:
    """Key (relative to the array folder) of the ``index``-th shard file along frames,
    e.g. ``c/3/0/0/0``."""
    return array.metadata.encode_chunk_key((index,) + (0,) * (len(array.shape) - 1))


def frames_per_file(array: Any) -> int:
    """Frames per shard file of a store array (its shard shape along frames)."""
    shards = getattr(array, "shards", None)
    return int((shards or array.chunks)[0])


def expected_files(array: Any, frames: int) -> list[tuple[str, int, int]]:
    """The shard files an array of ``frames`` rows must have: (key, first row, stop row)."""
    per = frames_per_file(array)
    return [(shard_file_key(array, i), i * per, min(frames, (i + 1) * per))
            for i in range(math.ceil(frames / per))]
