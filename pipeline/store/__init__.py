"""The feature store: a zarr v3 group of per-shard feature arrays plus JSON completion markers.

One module per concern (this package re-exports their public names, so
``from pipeline.store import open_store, ShardWriter`` is the way in):

* :mod:`~pipeline.store.fs`: the file system under a store (a local folder or an fsspec URL
  such as ``s3://bucket/x.zarr``): atomic writes, create-once, claims (flock or leases);
* :mod:`~pipeline.store.layout`: paths, shard names, completion markers, shard claims;
* :mod:`~pipeline.store.header`: create the header once, compare it on every later run;
* :mod:`~pipeline.store.writer`: storage dtypes and codecs, :class:`ShardWriter`;
* :mod:`~pipeline.store.reader`: :class:`FeatureStore`, :func:`open_store`;
* :mod:`~pipeline.store.integrity`: chunk checksums, the marker's file table and digest;
* :mod:`~pipeline.store.checks`: :func:`store_status`, :func:`check_store` / :func:`verify_store`,
  :func:`repair_store`, the failure verdict (:func:`failure_verdict`);
* :mod:`~pipeline.store.totals`: what one job did, added up from the markers (:func:`job_totals`).

A store shard has exactly one writer. A writer holds the shard's claim (:func:`shard_claim`)
while it works, so two runs started on the same store by mistake share the shards instead
of deleting each other's work; its marker is written last, so a shard without a marker is
incomplete and is redone. The layout is in :mod:`pipeline.store.layout` and
docs/architecture.md.
"""
from pipeline.store.checks import (
    Problem,
    StoreStatus,
    VerifyReport,
    check_store,
    failure_reason,
    failure_reasons,
    failure_verdict,
    repair_store,
    store_status,
    verify_store,
)
from pipeline.store.fs import DEFAULT_LEASE_S, Claim, LeaseLost, StoreFS, store_fs
from pipeline.store.header import content_mismatch, init_store, read_header
from pipeline.store.integrity import INTEGRITY_VERSION
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
    marker_key,
    marker_path,
    read_markers,
    scan_markers,
    shard_claim,
    shard_lock,
    shard_locked,
    shard_name,
)
from pipeline.store.reader import FeatureStore, open_store
from pipeline.store.totals import JobTotals, job_totals, wait_for_shards
from pipeline.store.writer import (
    CODECS,
    CROP_PREFIX,
    PEA_OFFSETS,
    PEA_PREFIX,
    STORAGE_DTYPES,
    ShardWriter,
    StorageDtype,
    decode_crops,
    decode_pea,
    encode_crops,
    encode_pea,
)

__all__ = [
    "Claim", "DEFAULT_LEASE_S", "LeaseLost", "StoreFS", "marker_key", "shard_claim", "store_fs",
    "ATTR_KEY", "CODECS", "CROP_PREFIX", "decode_crops", "encode_crops", "FORMAT_VERSION", "HEADER_FILE", "INTEGRITY_VERSION", "PEA_OFFSETS", "PEA_PREFIX",
    "STORAGE_DTYPES", "Failure", "FeatureStore", "Problem", "ShardWriter", "StorageDtype", "StoreStatus",
    "VerifyReport", "VideoEntry", "check_store", "content_mismatch", "create_once", "decode_pea", "encode_pea",
    "JobTotals", "failure_reason", "failure_reasons", "failure_verdict", "file_lock", "file_locked", "job_totals", "init_store", "lock_path", "marker_path", "open_store", "read_header",
    "read_markers", "repair_store", "scan_markers", "shard_lock", "shard_locked", "shard_name", "store_status",
    "verify_store", "wait_for_shards",
]
