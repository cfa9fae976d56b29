"""The feature store: a zarr v3 group of per-shard feature arrays plus JSON completion markers.

One module per concern (this package re-exports their public names, so
``from pipeline.store import open_store, ShardWriter`` is the way in):

* :mod:`~pipeline.store.layout`: paths, shard names, completion markers, shard locks;
* :mod:`~pipeline.store.header`: create the header once, compare it on every later run;
* :mod:`~pipeline.store.writer`: storage dtypes and codecs, :class:`ShardWriter`;
* :mod:`~pipeline.store.reader`: :class:`FeatureStore`, :func:`open_store`;
* :mod:`~pipeline.store.checks`: :func:`store_status`, :func:`verify_store`.

A store shard has exactly one writer. A writer holds the shard's lock (:func:`shard_lock`)
while it works, so two runs started on the same store by mistake share the shards instead
of deleting each other's work; its marker is written last, so a shard without a marker is
incomplete and is redone. The layout is in :mod:`pipeline.store.layout` and
docs/architecture.md.
"""
from pipeline.store.checks import StoreStatus, store_status, verify_store
from pipeline.store.header import content_mismatch, init_store, read_header
from pipeline.store.layout import (
    ATTR_KEY,
    FORMAT_VERSION,
    HEADER_FILE,
    Failure,
    VideoEntry,
    create_once,
    file_lock,
    file_locked,
    lock_path,
    marker_path,
    read_markers,
    shard_lock,
    shard_locked,
    shard_name,
)
from pipeline.store.reader import FeatureStore, open_store
from pipeline.store.writer import CODECS, STORAGE_DTYPES, ShardWriter, StorageDtype

__all__ = [
    "ATTR_KEY", "CODECS", "FORMAT_VERSION", "HEADER_FILE", "STORAGE_DTYPES", "Failure", "FeatureStore",
    "ShardWriter", "StorageDtype", "StoreStatus", "VideoEntry", "content_mismatch", "create_once",
    "file_lock", "file_locked",
    "init_store", "lock_path", "marker_path", "open_store", "read_header", "read_markers", "shard_lock",
    "shard_locked", "shard_name", "store_status", "verify_store",
]
