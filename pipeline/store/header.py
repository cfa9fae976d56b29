"""The store header: created once by the first writer, compared on every later run.

``header["content"]`` holds everything that determines the stored values (backbone, weights
hash, decode/geometry, dtype, codec, pooling, manifest hash, shard size); the rest of the
header is provenance (full config, environment) that may differ between runs, plus
``format_version`` and ``integrity`` (:mod:`pipeline.store.integrity`; absent = 0).

Creation is atomic from a rerun's point of view: the header file is the commit point
(published whole by a hard link), and everything else a new store needs (the root group's
``zarr.json`` carrying the same header, the ``shards`` group, ``markers/``) is derived from
it and completed by whichever run finds it missing. A run killed at any moment of creation
leaves either no header (the rerun starts over) or a header that the rerun completes.
"""
from __future__ import annotations

import json

from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata

from pipeline.config import diff_dicts
from pipeline.errors import ConfigMismatchError, StoreError
from pipeline.store.fs import StoreFS, StoreRoot, store_fs
from pipeline.store.integrity import INTEGRITY_VERSION
from pipeline.store.layout import ATTR_KEY, FORMAT_VERSION, HEADER_FILE, create_once


def content_mismatch(existing: dict, wanted: dict) -> list[str]:
    """One line per dotted key of two header ``content`` dicts that differs:
    ``dtype: store has 'float16', this run asks 'int8'``."""
    return diff_dicts(existing, wanted, have_name="store has", want_name="this run asks")


def init_store(path: StoreRoot, header: dict, *, integrity: int = INTEGRITY_VERSION) -> dict:
    """Create the store with ``header`` or verify that an existing store matches it; return
    the store's header.

    An existing store whose ``content`` differs is refused *before any work starts*
    (:class:`ConfigMismatchError` listing every differing key). Safe to call from many
    processes at once: the header file is created with an atomic link
    (:func:`~pipeline.store.layout.create_once`); every caller then completes whatever
    part of the creation is missing (a creator killed midway, or still at work), with the
    same bytes, each file replaced atomically. ``integrity`` is recorded in a new header
    (0 only in tests of stores made before checksums).
    """
    root = store_fs(path)
    root.makedirs("")
    if not root.exists(HEADER_FILE):
        # a store whose header file was lost keeps its header in the root group: restore that
        # one (the shards were made with it), never this run's
        kept = (read_group_metadata(root, "zarr.json") or {}).get("attributes", {}).get(ATTR_KEY)
        create_once(root, HEADER_FILE, kept if isinstance(kept, dict) and "content" in kept else
                    {**header, "format_version": FORMAT_VERSION, "integrity": integrity})
    existing = read_header(root)
    diffs = content_mismatch(existing.get("content", {}), header.get("content", {}))
    if diffs:
        raise ConfigMismatchError(
            f"the store {root} was made with a different config; refusing to mix features.\n"
            + "\n".join(f"  - {d}" for d in diffs)
            + "\nUse a new --store path, or rerun with the store's settings "
            f"(`freezeframe status {root} --config` prints them)."
        )
    complete_creation(root, existing)
    return existing


def group_metadata_bytes(attributes: dict) -> bytes:
    """The ``zarr.json`` of a zarr v3 group with these attributes, as zarr writes it."""
    return GroupMetadata(attributes=attributes).to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def root_group_bytes(header: dict) -> bytes:
    """The root ``zarr.json`` of a store: a group whose attributes carry the header."""
    return group_metadata_bytes({ATTR_KEY: header})


def complete_creation(root: StoreFS, header: dict) -> None:
    """Write what a new store needs besides its header, where missing: the root group
    (attributes = ``header``), the ``shards`` group, ``markers/``. A present but unreadable
    group metadata file is damage, not an interrupted creation: :class:`StoreError`."""
    for meta, content in (("zarr.json", lambda: root_group_bytes(header)),
                          ("shards/zarr.json", lambda: group_metadata_bytes({}))):
        if not root.exists(meta):
            root.write_atomic(meta, content())
        elif read_group_metadata(root, meta) is None:
            raise StoreError(f"{root.path(meta)} is damaged (not zarr group metadata); run `freezeframe verify "
                             f"{root} --repair` (it rewrites it from the header), then rerun")
    root.makedirs("markers")


def read_group_metadata(root: StoreRoot, key: str) -> dict | None:
    """The group ``zarr.json`` at ``key`` of a store as a dict, or None if it is missing,
    unreadable or not a group."""
    try:
        d = json.loads(store_fs(root).read_bytes(key))
    except (OSError, ValueError):
        return None
    ok = isinstance(d, dict) and d.get("node_type") == "group" and d.get("zarr_format") == 3
    return d if ok else None


def read_header(path: StoreRoot) -> dict:
    """The header of the store at ``path`` (:class:`StoreError` if it is not a store or its
    header cannot be read)."""
    fs = store_fs(path)
    target = fs.path(HEADER_FILE)
    if not fs.exists(HEADER_FILE):
        if fs.exists("zarr.json") and fs.exists("markers"):
            raise StoreError(f"{target} is missing; run `freezeframe verify {path} --repair` "
                             "(it restores it from the root zarr.json)")
        raise StoreError(
            f"{path} is not a freezeframe store (no {HEADER_FILE}); "
            "create one with `freezeframe extract`."
        )
    try:
        header = json.loads(fs.read_bytes(HEADER_FILE))
    except (OSError, ValueError) as e:
        header, why = None, f"{type(e).__name__}: {e}"
    else:
        why = "no 'content'"
    if not isinstance(header, dict) or not isinstance(header.get("content"), dict):
        raise StoreError(f"{target} is damaged ({why}); run `freezeframe verify {path} --repair` "
                         "(it restores it from the root zarr.json)")
    return header
