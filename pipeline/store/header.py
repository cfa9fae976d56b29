"""The store header: created once by the first writer, compared on every later run.

``header["content"]`` holds everything that determines the stored values (backbone, weights
hash, decode/geometry, dtype, codec, pooling, manifest hash, shard size); the rest of the
header is provenance (full config, environment) that may differ between runs.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import zarr

from pipeline.config import diff_dicts
from pipeline.errors import ConfigMismatchError, StoreError
from pipeline.store.layout import ATTR_KEY, FORMAT_VERSION, HEADER_FILE, create_once


def content_mismatch(existing: dict, wanted: dict) -> list[str]:
    """One line per dotted key of two header ``content`` dicts that differs:
    ``dtype: store has 'float16', this run asks 'int8'``."""
    return diff_dicts(existing, wanted, have_name="store has", want_name="this run asks")


def init_store(path: str | os.PathLike, header: dict, *, wait_s: float = 60.0) -> dict:
    """Create the store with ``header`` or verify that an existing store matches it.

    An existing store whose ``content`` differs is refused *before any work starts*
    (:class:`ConfigMismatchError` listing every differing key). Safe to call from many
    processes at once: the header file is created with an atomic link
    (:func:`~pipeline.store.layout.create_once`), and losers verify against the winner's
    header, waiting up to ``wait_s`` seconds for the winner to create the zarr group.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    header = {**header, "format_version": FORMAT_VERSION}
    target = root / HEADER_FILE
    if create_once(target, header):
        group = zarr.open_group(str(root), mode="a")
        group.attrs[ATTR_KEY] = header
        group.require_group("shards")
        (root / "markers").mkdir(exist_ok=True)
        return header
    existing = json.loads(target.read_text())
    diffs = content_mismatch(existing.get("content", {}), header.get("content", {}))
    if diffs:
        raise ConfigMismatchError(
            f"the store {root} was made with a different config; refusing to mix features.\n"
            + "\n".join(f"  - {d}" for d in diffs)
            + "\nUse a new --store path, or rerun with the store's settings "
            f"(`freezeframe status {root} --config` prints them)."
        )
    deadline = time.monotonic() + wait_s
    while not (root / "zarr.json").exists() or not (root / "markers").exists():
        if time.monotonic() > deadline:
            raise StoreError(f"{root}: header exists but the zarr group was never created; "
                             "delete the store folder and rerun `freezeframe extract`")
        time.sleep(0.05)
    return existing


def read_header(path: str | os.PathLike) -> dict:
    """The header of the store at ``path`` (:class:`StoreError` if it is not a store)."""
    target = Path(path) / HEADER_FILE
    if not target.exists():
        raise StoreError(
            f"{path} is not a freezeframe store (no {HEADER_FILE}); "
            "create one with `freezeframe extract`."
        )
    return json.loads(target.read_text())
