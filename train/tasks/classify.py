"""``finetune``: supervised classification of one random clip per video, optionally starting
from the temporal module of an earlier run (``init``) with a fresh head; evaluated with the
multi-view test (``train.evals.multiview``)."""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from pipeline.config import from_dict
from pipeline.errors import ConfigMismatchError, FreezeframeError
from train.data import ClipConfig, ClipDataset, check_label_preserving, check_relabel
from train.losses import accuracy, cross_entropy
from train.models import ModelConfig, arch_signature, build_model, check_arch_compatible
from train.rundir import load_init
from train.tasks.registry import register_task
from train.tasks.base import Task


@register_task("finetune")
class ClassifyTask(Task):
    """Batch: ``(clips (B, T, H, W, C), labels (B,))``."""

    section = "clip"
    Config = ClipConfig
    command = "finetune"
    evaluations = ("multiview",)
    accepts_init = True

    def preflight(self) -> None:
        super().preflight()
        for split in (self.cfg.data.train_split, self.cfg.data.test_split):
            labels = {self.store.meta(v).label for v in self.store.split_ids(split)}
            if None in labels:
                raise FreezeframeError(f"split {split!r} has unlabelled videos; fine-tuning needs labels")
            top = max(labels) if labels else -1  # type: ignore[type-var]
            if top >= self.cfg.model.num_classes:
                raise ConfigMismatchError(
                    f"the store has labels up to {top} but model.num_classes={self.cfg.model.num_classes}; "
                    f"set model.num_classes={top + 1}")
        if self.cfg.data.relabel:
            check_relabel(self.cfg.data.relabel, self.cfg.model.num_classes, tuple(self.cfg.data.augment))
        if self.cfg.data.augment:
            names = {self.store.meta(v).label_name for v in self.store.video_ids}
            check_label_preserving(tuple(self.cfg.data.augment), sorted(str(n) for n in names if n is not None))
        if self.cfg.init:
            check_arch_compatible(load_init(self.cfg.init)["arch"], arch_signature(self.cfg.model), new_head=True)

    def train_dataset(self, seed: int) -> ClipDataset:
        return ClipDataset(self.store, self.cfg.data.train_split, self.options, seed, self.cfg.data.augment,
                           self.cfg.data.relabel)

    def build(self) -> nn.Module:
        """A new model; with ``init``, its temporal module is loaded from that run (the head stays fresh)."""
        model = super().build()
        if self.cfg.init:
            ckpt = load_init(self.cfg.init)
            saved = from_dict(ModelConfig, ckpt["config"]["model"])
            pre = build_model(saved)  # built after the new model: the RNG order of earlier releases
            # the temporal module only: pretext runs may carry other modules (an MFM decoder) or
            # another head (a MoCo projection), which fine-tuning replaces anyway
            pre.tmm.load_state_dict({k[len("tmm."):]: v for k, v in ckpt["model"].items() if k.startswith("tmm.")})
            model.tmm.load_state_dict(pre.tmm.state_dict())
        return model

    def step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        x, y = batch
        logits = model(x)
        return {"loss": cross_entropy(logits, y, self.cfg.optim.label_smoothing),
                "acc": accuracy(logits.detach(), y)}
