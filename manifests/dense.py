"""Dense-benchmark manifests (DAVIS-2017, JHMDB, VIP): the public entry point.

Usage::

    from manifests.dense import build_dense
    videos = build_dense("davis2017", root="/data/DAVIS", split="val")
    videos[0].frames, videos[0].labels, videos[0].row()

Formats: ``davis2017`` (:mod:`manifests.davis`), ``jhmdb`` (:mod:`manifests.jhmdb`),
``vip`` (:mod:`manifests.vip`).
"""
from __future__ import annotations

from typing import Any

from manifests._common import run_builder
from manifests._dense import (
    DENSE_BUILDERS,
    LABEL_KINDS,
    DenseVideo,
    read_dense_manifest,
    with_video_files,
    write_dense_manifest,
)

# Importing the format modules registers their builders.
from manifests import davis, jhmdb, vip  # noqa: E402,F401  (imported for registration)

__all__ = [
    "DENSE_BUILDERS",
    "LABEL_KINDS",
    "DenseVideo",
    "build_dense",
    "read_dense_manifest",
    "with_video_files",
    "write_dense_manifest",
]


def build_dense(fmt: str, **options: Any) -> list[DenseVideo]:
    """Build the videos of dense format ``fmt`` with the builder's keyword ``options``.

    Raises:
        ManifestError: unknown format or option, missing option, or every problem found in
            the data.
    """
    return run_builder(DENSE_BUILDERS, fmt, options)
