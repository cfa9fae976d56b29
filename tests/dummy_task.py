"""A training task defined only here: the plug-in API needs no edit elsewhere to add one.

``dummy-anchor``: classify one clip per video, plus a penalty pulling the loss towards its own
running mean (``anchor``), a piece of task state that changes every step and must be
checkpointed: a resumed run that forgot it would end with other weights. Dropout on the logits
draws from the global torch RNG, which the loop checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from train.data import ClipConfig, ClipDataset
from train.losses import accuracy, cross_entropy
from train.tasks import Task, register_task


@dataclass(frozen=True)
class AnchorConfig:
    """num_frames/stride: the training clip; weight: penalty factor; momentum of the running mean."""

    num_frames: int = 4
    stride: int = 2
    weight: float = 0.5
    momentum: float = 0.5


@register_task("dummy-anchor")
class AnchorTask(Task):
    section = "anchor"
    Config = AnchorConfig

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.anchor = torch.zeros(())  # running mean of the cross-entropy
        self.last_ce = torch.zeros(())
        self.updates = 0

    def train_dataset(self, seed: int) -> ClipDataset:
        clip = ClipConfig(num_frames=self.options.num_frames, stride=self.options.stride)
        return ClipDataset(self.store, self.cfg.data.train_split, clip, seed)

    def step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        x, y = batch
        logits = nn.functional.dropout(model(x), p=0.2)  # draws from the global RNG: resume must restore it
        ce = cross_entropy(logits, y)
        self.last_ce = ce.detach()
        return {"loss": ce + self.options.weight * (ce - self.anchor) ** 2, "acc": accuracy(logits.detach(), y),
                "anchor": self.anchor.clone()}

    def after_step(self, model: nn.Module, step: int) -> None:
        m = self.options.momentum
        self.anchor = m * self.anchor + (1 - m) * self.last_ce
        self.updates += 1

    def state_dict(self) -> dict:
        return {"anchor": self.anchor, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.anchor, self.updates = state["anchor"], int(state["updates"])
