"""Apply a trained Co-Settle projection g to a store: a new store of ``g(tokens)`` for every frame.

The new store has the source's layout (same shards, videos, splits, labels and timestamps),
so every stage-2 command and any zarr reader uses it like an extracted store. Its header is
the source's, with ``content.projection`` (the run, its checkpoint's sha256, the projection's
arch and dimension) and ``content.source_content_hash``; the PEA views of the source are not
carried over (they are inputs of g's training, not of downstream tools).

``load_projection(run)`` returns g (eval mode, frozen) and that provenance; the metrics
command uses it too (``freezeframe represent --projection RUN``).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import config_hash
from pipeline.errors import FreezeframeError
from pipeline.provenance import sha256_file
from pipeline.store import Failure, FeatureStore, ShardWriter, init_store, marker_path, open_store, shard_lock
from train.config import load_train_config
from train.models.projection import Projection
from train.rundir import resolve_init

__all__ = ["ProjectionError", "LoadedProjection", "apply_projection", "load_projection"]


class ProjectionError(FreezeframeError):
    """A run cannot be used as a projection, or it does not fit the store."""


@dataclass
class LoadedProjection:
    """g in eval mode (no gradients) and its provenance (JSON-ready)."""

    module: Projection
    provenance: dict[str, Any]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        """``(..., D)`` float -> ``(..., D)`` float32, in chunks of ``batch`` frames along dim 0."""
        out = [self.module(part.float()) for part in torch.split(tokens, batch)]
        return torch.cat(out) if out else tokens.float()


def load_projection(run: str | os.PathLike) -> LoadedProjection:
    """g of a ``cosettle`` run (its final checkpoint, else the last one)."""
    ckpt_path = resolve_init(str(run))
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = load_train_config(state["config"])
    if cfg.task != "cosettle":
        raise ProjectionError(f"{run} is a {cfg.task!r} run; a projection comes from `freezeframe pretrain --task cosettle`")
    weights = state["model"]
    dim = int(weights["norm.weight"].shape[0])
    g = Projection(dim, cfg.task_cfg.arch, generator=torch.Generator())  # init overwritten below; global RNG untouched
    g.load_state_dict(weights)
    g.eval().requires_grad_(False)
    prov = {"run": str(Path(run).resolve()), "checkpoint": str(ckpt_path.resolve()),
            "checkpoint_sha256": sha256_file(ckpt_path), "step": int(state.get("step", -1)),
            "arch": cfg.task_cfg.arch, "dim": dim, "config_hash": state.get("config_hash"),
            "trained_on_store_content_hash": state.get("store_content_hash")}
    return LoadedProjection(g, prov)


def check_fits(g: LoadedProjection, store: FeatureStore) -> None:
    c = store.feature_shape[2]
    if c != g.provenance["dim"]:
        raise ProjectionError(
            f"the projection maps D={g.provenance['dim']} tokens but {store.path} holds C={c} channels; "
            f"use a projection trained on a store of the same backbone")


def projected_header(source: dict, g: LoadedProjection, dtype: str) -> dict:
    """The new store's header: the source's, plus the projection, minus the PEA views."""
    header = copy.deepcopy(source)
    content = header["content"]
    source_hash = header.get("content_hash")
    content.pop("pea", None)
    content["dtype"] = dtype
    content["projection"] = g.provenance
    content["source_content_hash"] = source_hash
    header["content_hash"] = config_hash(content)
    header["projected_from"] = {"content_hash": source_hash}
    return header


def apply_projection(source: str | os.PathLike, run: str | os.PathLike, out: str | os.PathLike,
                     dtype: str | None = None, console=None) -> Path:
    """Write ``out``: every frame of ``source`` mapped by the projection of ``run``.

    Resumable like extraction: shards with a completion marker are skipped, each shard is
    written under its lock. ``dtype``: storage dtype of the new store (default: the source's).
    """
    from rich.console import Console  # lazy: rich is only needed when writing
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    con = console or Console(stderr=True)
    src = open_store(source)
    g = load_projection(run)
    check_fits(g, src)
    content = src.content
    dtype = dtype or content.get("dtype", "float16")
    root = Path(out)
    if root.resolve() == src.path.resolve():
        raise ProjectionError("the projected store must be a new path, not the source store")
    init_store(root, projected_header(src.header, g, dtype))
    shape = tuple(src.feature_shape)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=con, transient=True) as bar:
        task = bar.add_task("projecting", total=len(src))
        for shard, marker in src.markers.items():
            videos = marker["videos"]
            with shard_lock(root, shard) as mine:
                if not mine or marker_path(root, shard).exists():
                    bar.advance(task, len(videos))
                    continue
                writer = ShardWriter.create(root, shard, feature_shape=shape, dtype=dtype,
                                            codec=content.get("codec", "zstd"),
                                            frames_per_file=int(content.get("frames_per_file", 256)))
                for v in videos:
                    vid = v["video_id"]
                    writer.begin_video({k: v.get(k) for k in ("video_id", "split", "label", "label_name")})
                    feats = g(torch.from_numpy(src.features(vid))).numpy()
                    writer.append(np.ascontiguousarray(feats, dtype=np.float32), src.timestamps(vid))
                    writer.end_video()
                    bar.advance(task)
                writer.finish([Failure(**f) for f in marker.get("failures", [])], {"projected_from": str(src.path)})
    return root
