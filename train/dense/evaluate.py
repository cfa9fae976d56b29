"""Propagate a benchmark's first-frame labels with a dense store's features, then score.

:func:`propagate_store` reads each video's features ``(T, h, w, C)`` from a store made by
:func:`extract.dense.extract_dense`, checks that the store's recorded geometry (frame
names, frame size) is the manifest's, optionally maps the tokens through a projection,
propagates (:mod:`train.dense.propagate`) and writes results in the official layout.
:data:`SCORERS` turns a results folder into the benchmark's scores (``to_json``-able).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from extract.dense import video_geometry
from manifests.dense import DenseVideo
from manifests.vip import CLASS_NAMES
from pipeline.errors import FreezeframeError
from pipeline.registry import Registry
from pipeline.store import open_store
from train.dense.adapters import adapter_for, propagate_labels_of
from train.dense.propagate import PropagationConfig
from train.dense.results import score_davis, score_jhmdb, score_vip

__all__ = ["BENCHMARKS", "Benchmark", "DenseEvalConfig", "propagate_store", "score_results"]

#: tokens (T, h, w, C) -> tokens (T, h, w, C'), e.g. a trained Co-Settle projection.
Projection = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Benchmark:
    """A dense benchmark: its manifest format, protocol defaults and scorer."""

    manifest_format: str
    size_policy: str
    topk: int
    score: Callable[[Sequence[DenseVideo], str | os.PathLike], Any]
    headline: str  # the key of the headline score in to_json()


def _davis(videos, results):  # noqa: ANN001, ANN202
    return score_davis(videos, results).to_json()


def _vip(videos, results):  # noqa: ANN001, ANN202
    return score_vip(videos, results).to_json(CLASS_NAMES)


def _jhmdb(videos, results):  # noqa: ANN001, ANN202
    return score_jhmdb(videos, results).to_json()


#: benchmark name -> protocol (table of the CRW protocol: top-k 7, VIP 10)
BENCHMARKS: Registry[Benchmark] = Registry("dense benchmark")
BENCHMARKS.add("davis2017", Benchmark("davis2017", "davis", 7, _davis, "JF_mean"))
BENCHMARKS.add("jhmdb", Benchmark("jhmdb", "jhmdb", 7, _jhmdb, "PCK"))
BENCHMARKS.add("vip", Benchmark("vip", "vip", 10, _vip, "mIoU"))


@dataclass(frozen=True)
class DenseEvalConfig:
    """A propagation evaluation: which benchmark, and the propagation parameters."""

    benchmark: str = "davis2017"
    propagation: PropagationConfig = field(default_factory=PropagationConfig)


class GeometryMismatchError(FreezeframeError):
    """The store's frames are not the manifest's frames."""


def propagate_store(
    store_path: str | os.PathLike,
    videos: Sequence[DenseVideo],
    out_dir: str | os.PathLike,
    cfg: PropagationConfig = PropagationConfig(),
    *,
    projection: Projection | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write results for every video of ``videos`` under ``out_dir``; returns ``out_dir``.

    Raises:
        GeometryMismatchError: a video is missing from the store, or its stored frames or
            frame size differ from the manifest's (listing every such video).
    """
    store = open_store(store_path)
    geometry = video_geometry(store_path)
    problems = []
    for v in videos:
        g = geometry.get(v.video_id)
        if g is None:
            problems.append(f"{v.video_id}: not in the store")
        elif tuple(g["frames"]) != v.frame_names:
            problems.append(f"{v.video_id}: the store holds frames {g['frames'][:3]}..., the manifest {list(v.frame_names[:3])}...")
        elif v.size != (0, 0) and tuple(g["frame_size"]) != v.size:
            problems.append(f"{v.video_id}: stored frame size {g['frame_size']}, manifest {list(v.size)}")
    if problems:
        raise GeometryMismatchError(
            "\n".join([f"store {store_path} does not match the benchmark manifest ({len(problems)} video(s)); "
                       "extract the same folder with `freezeframe dense-extract`"] + [f"  - {p}" for p in problems])
        )
    out = Path(out_dir)
    for i, v in enumerate(videos):
        feats = torch.from_numpy(store.features(v.video_id))
        if projection is not None:
            with torch.no_grad():
                feats = projection(feats)
        soft = propagate_labels_of(v, feats, cfg, device)
        adapter_for(v).write(v, soft, out, cfg)
        if progress is not None:
            progress(v.video_id, i + 1, len(videos))
    return out


def score_results(benchmark: str, videos: Sequence[DenseVideo], results_dir: str | os.PathLike) -> dict:
    """The benchmark's scores of a results folder, as a JSON-able dict."""
    return BENCHMARKS.get(benchmark).score(videos, results_dir)
