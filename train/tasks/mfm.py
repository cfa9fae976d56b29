"""``mfm``: masked feature modelling on clip streams of long videos.

Tube masks are drawn per item in the dataset (seeded by (seed, epoch, index)) on the token
grid the model sees (after ``model.spatial_pool``); the student is the TMM with masked tokens
hidden (``mfm.hide``), a pointwise decoder predicts the layer-normalised frozen tokens, and the
loss counts masked positions only (:mod:`train.models.mfm`).
Batch: ``{"clip": (B, T, H, W, C), "mask": (B, H', W') bool}``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from train.clipdata import StreamClipDataset, view
from train.models import build_model
from train.models.mfm import MaskedFeatureModel, MFMConfig, masked_count, mfm_loss, tube_mask_np
from train.online import StreamClip
from train.streams import StreamConfig
from train.tasks.base import Task
from train.tasks.registry import register_task


@dataclass
class MFMTaskConfig(MFMConfig):
    """``[mfm]``: masking and loss (:class:`train.models.mfm.MFMConfig`), input augmentations
    (``views``, none by default) and the clip stream (``[mfm.stream]``)."""

    views: tuple[str, ...] = ()
    stream: StreamConfig = field(default_factory=StreamConfig)


@register_task("mfm")
class MFMTask(Task):
    section = "mfm"
    command = "longform"  # dataset configs: [common] + [longform] (with [longform.mfm] options)
    Config = MFMTaskConfig

    def _grid(self) -> tuple[int, int]:
        h, w, _ = self.store.feature_shape
        k = self.cfg.model.spatial_pool
        return (k, k) if k is not None else (int(h), int(w))

    def preflight(self) -> None:
        super().preflight()
        h, w = self._grid()
        masked_count(h * w, self.options.mask_ratio)  # refuses a ratio this grid cannot realise

    def _item(self, ds: StreamClipDataset, k: int, rng: np.random.Generator) -> dict[str, Any]:
        return self.make_item(ds.features(k), rng)

    def make_item(self, features: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        """Item of clip features (T, H, W, C): the (augmented) clip and a tube mask."""
        h, w = self._grid()
        return {"clip": view(features, self.options.views, rng),
                "mask": torch.from_numpy(tube_mask_np(h, w, self.options.mask_ratio, rng))}

    def online_item(self, clip: StreamClip, rng: np.random.Generator) -> dict[str, Any]:
        return self.make_item(clip.features, rng)

    def train_dataset(self, seed: int) -> StreamClipDataset:
        return StreamClipDataset(self.store, self.cfg.data.train_split, self.options.stream, seed, self._item)

    def build(self) -> nn.Module:
        return MaskedFeatureModel(build_model(self.cfg.model), self.options.decoder_hidden, self.options.hide)

    def step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        return mfm_loss(model, batch["clip"], batch["mask"], self.options)
