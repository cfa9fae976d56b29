"""Manifest builders: one per dataset's official annotation format.

Each builder reads the annotation files *as distributed* and returns
:class:`pipeline.manifest.ManifestRow` rows in a deterministic order (split, then path;
shard order for tar shards). Any problem (malformed line, unknown label, duplicate id,
missing video, ...) is collected and reported together in one
:class:`pipeline.errors.ManifestError`.

Usage::

    from manifests import build_manifest
    rows = build_manifest("ucf101", root="/data/UCF-101", annotations="/data/ucfTrainTestlist",
                          split_number=1)

    # or with the defaults of manifests/configs/<dataset>.toml:
    rows = build_from_config("ucf101", root=..., annotations=...)

Formats: ``ucf101``, ``hmdb51``, ``diving48``, ``kinetics400``, ``ssv2``, ``ava``,
``folder``, ``folder-per-class``, ``webdataset`` (see each module's docstring).
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from manifests._common import BUILDERS, VIDEO_EXTENSIONS, ManifestBuilder, ManifestWarning, run_builder
from pipeline.errors import ManifestError
from pipeline.manifest import ManifestRow

# Importing the format modules registers their builders.
from manifests import (  # noqa: E402,F401  (imported for registration)
    ava,
    diving48,
    folder,
    folder_per_class,
    hmdb51,
    kinetics400,
    ssv2,
    ucf101,
    webdataset,
)

CONFIG_DIR = Path(__file__).parent / "configs"

__all__ = [
    "BUILDERS",
    "CONFIG_DIR",
    "ManifestBuilder",
    "ManifestWarning",
    "VIDEO_EXTENSIONS",
    "build_from_config",
    "build_manifest",
    "dataset_config",
    "dataset_names",
]


def build_manifest(fmt: str, **options: Any) -> list[ManifestRow]:
    """Build the manifest rows of format ``fmt`` with the builder's keyword ``options``.

    Raises:
        ManifestError: unknown format or option, or every problem found in the data.
    """
    return run_builder(BUILDERS, fmt, options)


def dataset_names() -> list[str]:
    """Datasets with a ``configs/<name>.toml``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def dataset_config(name: str) -> dict[str, Any]:
    """The parsed ``configs/<name>.toml``: ``format``, ``[manifest]`` builder options,
    ``[annotations]``/``[layout]`` descriptions and ``[extract]`` defaults (ExtractConfig fields)."""
    path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        raise ManifestError(
            f"no dataset config {name!r}; choose one of: {', '.join(dataset_names())}"
        )
    with open(path, "rb") as f:
        return tomllib.load(f)


def build_from_config(name: str, **options: Any) -> list[ManifestRow]:
    """:func:`build_manifest` with the dataset's ``[manifest]`` defaults; ``options`` win."""
    cfg = dataset_config(name)
    return build_manifest(cfg["format"], **{**cfg.get("manifest", {}), **options})
