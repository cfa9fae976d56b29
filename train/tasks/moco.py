"""``moco``: MoCo contrastive pre-training on clip streams of long videos.

Query = the TMM + the MoCo v2 projection head (``MLPHead(C_out, proj_dim, proj_hidden)``, i.e.
the VideoModel's head with those widths: ``model.num_classes`` / ``model.mlp_dim`` are not used);
key = its momentum copy; negatives from a queue tagged with video ids. The key encoder and
the queue are task state, saved in every checkpoint, so a resumed run is exact.

Positives (``moco.positive``): ``views`` — two feature-space views (``moco.views``
augmentations) of the same clip; ``nearby`` — the clip and the T frames starting up to
``moco.nearby_frames`` frames before or after it in the same video (then each view also gets
the augmentations). Batch: ``{"q": (B, T, H, W, C), "k": (B, T, H, W, C), "video": (B,)}``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.errors import ConfigMismatchError, FreezeframeError
from pipeline.registry import Registry
from train.clipdata import StreamClipDataset, view
from train.models import build_model
from train.models.moco import MoCoConfig, MoCoState
from train.online import StreamClip
from train.schema import per_rank_batch
from train.streams import StreamConfig
from train.tasks.base import Task
from train.tasks.registry import register_task


@dataclass
class MoCoTaskConfig(MoCoConfig):
    """``[moco]``: MoCo options (see :class:`train.models.moco.MoCoConfig`), the positive pair
    and the clip stream (``[moco.stream]``, :class:`train.streams.StreamConfig`)."""

    positive: str = "views"
    views: tuple[str, ...] = ("grid-crop", "hflip")
    nearby_frames: int = 8
    stream: StreamConfig = field(default_factory=StreamConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        POSITIVES.get(self.positive)


Positive = Any  # (dataset, clip id, rng) -> (clip_q, clip_k) numpy (T, H, W, C)
POSITIVES: Registry[Positive] = Registry("MoCo positive pair")
POSITIVES.add("views", lambda ds, k, rng, cfg: (ds.features(k), None))
POSITIVES.add("nearby", lambda ds, k, rng, cfg: (
    ds.features(k), ds.shifted(k, int(rng.integers(-cfg.nearby_frames, cfg.nearby_frames + 1)))))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(model, "module", model)


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def planned_steps(cfg: Any, items: int) -> int:
    """Optimiser steps of the whole run (for momentum schedules): per-rank batches x epochs."""
    if items == 0:  # a stream (train.online_fit): no planned length but max_steps
        return cfg.max_steps or 1
    world = _world()
    per_epoch = max(1, items // max(1, per_rank_batch(cfg.optim, world) * world))
    return per_epoch * cfg.optim.epochs


@register_task("moco")
class MoCoTask(Task):
    section = "moco"
    command = "longform"  # dataset configs: [common] + [longform] (with [longform.moco] options)
    Config = MoCoTaskConfig

    def __init__(self, cfg: Any, store: Any, device: torch.device) -> None:
        super().__init__(cfg, store, device)
        self.moco: MoCoState | None = None
        self._items = 0

    def preflight(self) -> None:
        super().preflight()
        world = _world()
        batch = per_rank_batch(self.cfg.optim, world) * world  # every rank's keys are enqueued (all_gather)
        if self.options.queue_size and self.options.queue_size < batch:
            raise ConfigMismatchError(f"moco.queue_size={self.options.queue_size} is smaller than a step's batch "
                                      f"({batch} over {world} rank(s)); use a queue of several batches")

    def _item(self, ds: StreamClipDataset, k: int, rng: np.random.Generator) -> dict[str, Any]:
        a, b = POSITIVES.get(self.options.positive)(ds, k, rng, self.options)
        return self.make_item(a, b, int(ds.clips.video[k]), rng)

    def make_item(self, a: np.ndarray, b: np.ndarray | None, video: int, rng: np.random.Generator) -> dict[str, Any]:
        """Item of clip features ``a`` (T, H, W, C) and its positive partner ``b`` (None: ``a``)."""
        views = self.options.views
        return {"q": view(a, views, rng), "k": view(a if b is None else b, views, rng), "video": video}

    def online_item(self, clip: StreamClip, rng: np.random.Generator) -> dict[str, Any]:
        """Item of a clip read from a stream (positive = two views of it)."""
        return self.make_item(clip.features, None, clip.video, rng)

    def online_preflight(self) -> None:
        if self.options.positive != "views":
            raise FreezeframeError("online MoCo takes its positives as two views of a clip; set moco.positive='views'")
        if self.options.momentum_schedule != "constant" and self.cfg.max_steps is None:
            raise FreezeframeError("a stream has no planned length: the cosine momentum schedule needs max_steps "
                                   "(or set moco.momentum_schedule='constant')")

    def train_dataset(self, seed: int) -> StreamClipDataset:
        ds = StreamClipDataset(self.store, self.cfg.data.train_split, self.options.stream, seed, self._item)
        self._items = len(ds)
        return ds

    def build(self) -> nn.Module:
        opts = self.options
        query = build_model(dataclasses.replace(self.cfg.model, num_classes=opts.proj_dim, mlp_dim=opts.proj_hidden))
        self.moco = MoCoState(query, opts, planned_steps(self.cfg, self._items))
        return query

    def step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        assert self.moco is not None
        self.moco.to(batch["q"].device)
        return self.moco.loss(model, batch["q"], batch["k"], batch["video"])

    def after_step(self, model: nn.Module, step: int) -> None:
        assert self.moco is not None
        self.moco.after_step(unwrap(model), step)

    def state_dict(self) -> dict:
        return self.moco.state_dict() if self.moco is not None else {}

    def load_state_dict(self, state: dict) -> None:
        assert self.moco is not None
        self.moco.load_state_dict(state)
