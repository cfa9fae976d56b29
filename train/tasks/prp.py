"""``prp``: playback-rate perception pretraining (AdViSe's pretext task).

Each video gives ``clips_per_video`` clips, each resampled at a random rate from
``prp.rates``; the model classifies the rate (cross-entropy with label smoothing).
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from pipeline.errors import ConfigMismatchError
from train.data import PRPDataset, flatten_clips
from train.losses import accuracy, cross_entropy
from train.sampling import PRPConfig
from train.tasks.registry import register_task
from train.tasks.base import Task


@register_task("prp")
class PRPTask(Task):
    """Batch: ``(clips (B, K, T, H, W, C), rate labels (B, K))``; the step sees ``B*K`` clips."""

    section = "prp"
    Config = PRPConfig
    command = "pretrain"

    def preflight(self) -> None:
        super().preflight()
        rates = len(self.options.rates)
        if self.cfg.model.num_classes != rates:
            raise ConfigMismatchError(
                f"PRP has {rates} rate classes but model.num_classes={self.cfg.model.num_classes}; "
                f"set model.num_classes={rates}")

    def train_dataset(self, seed: int) -> PRPDataset:
        return PRPDataset(self.store, self.cfg.data.train_split, self.options, seed, self.cfg.data.augment)

    def step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        x, y = flatten_clips(batch)  # (B*K, T, H, W, C), (B*K,)
        logits = model(x)
        return {"loss": cross_entropy(logits, y, self.cfg.optim.label_smoothing),
                "acc": accuracy(logits.detach(), y)}
