"""``distill``: a student TMM trained from scratch to match a frozen teacher on clip streams.

Teachers (``distill.teacher``, :mod:`train.models.distill`):

* ``store`` — the pooled features of a second store (``distill.teacher_store``) over each
  clip's time span, or (``teacher_store`` empty) the clip's own frozen features pooled over its
  valid frames and grid; computed in the dataset; the student's head has the teacher's width C_t.
* ``run`` — a trained run's model (``distill.teacher_run``: its directory or checkpoint; any
  task whose weights are a plain VideoModel: finetune, prp, moco), frozen; the student's head
  has the teacher's number of outputs and learns its logits (``kl``) or outputs (regression).

The student's head width is the teacher's (``model.num_classes`` is not used); ``model.mlp_dim``
and the TMM options apply. The student sees ``distill.views`` of the clip (feature-space
augmentations); the teacher sees the clip itself.
Batch: ``{"clip": (B, T, H, W, C), "target": (B, C_t)}`` (store) or ``{"clip", "teacher_clip"}`` (run).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.config import from_dict
from pipeline.errors import ConfigMismatchError, FreezeframeError
from pipeline.store import FeatureStore, open_store
from train.clipdata import StreamClipDataset, view
from train.models import ModelConfig, build_model
from train.models.distill import DistillConfig, FrozenTeacher, StoreTeacher, distill_loss
from train.online import StreamClip
from train.rundir import load_init
from train.streams import StreamConfig
from train.tasks.base import Task
from train.tasks.registry import register_task


@dataclass
class DistillTaskConfig(DistillConfig):
    """``[distill]``: teacher and loss (:class:`train.models.distill.DistillConfig`), the
    student's view and the clip stream (``[distill.stream]``)."""

    views: tuple[str, ...] = ("grid-crop",)
    stream: StreamConfig = field(default_factory=StreamConfig)


@register_task("distill")
class DistillTask(Task):
    section = "distill"
    command = "longform"  # dataset configs: [common] + [longform] (with [longform.distill] options)
    Config = DistillTaskConfig

    def __init__(self, cfg: Any, store: Any, device: torch.device) -> None:
        super().__init__(cfg, store, device)
        self.store_teacher: StoreTeacher | None = None
        self.teacher: FrozenTeacher | None = None
        self.out_dim = 0

    def preflight(self) -> None:
        super().preflight()
        opts = self.options
        if opts.teacher == "store" and not opts.teacher_store:
            self.out_dim = int(self.store.feature_shape[-1])  # the clip's own pooled features
        elif opts.teacher == "store":
            teacher_store = open_store(opts.teacher_store)
            if isinstance(self.store, FeatureStore):
                missing = [v for v in self.store.split_ids(self.cfg.data.train_split) if v not in teacher_store]
                if missing:
                    raise ConfigMismatchError(
                        f"{len(missing)} training videos are not in the teacher store {teacher_store.path} "
                        f"(e.g. {missing[0]!r}); extract it from the same manifest")
            self.store_teacher = StoreTeacher(teacher_store)
            self.out_dim = self.store_teacher.dim
        else:
            if not opts.teacher_run:
                raise FreezeframeError("distill.teacher='run' needs distill.teacher_run (a run directory or checkpoint)")
            ckpt = load_init(opts.teacher_run)
            saved = from_dict(ModelConfig, ckpt["config"]["model"])
            fc2 = ckpt["model"].get("head.fc2.weight")
            if fc2 is not None:  # pretext tasks choose their head's widths (moco: the projection)
                saved = dataclasses.replace(saved, num_classes=int(fc2.shape[0]), mlp_dim=int(fc2.shape[1]))
            model = build_model(saved)
            try:
                model.load_state_dict(ckpt["model"])
            except RuntimeError as e:
                raise ConfigMismatchError(f"the teacher run {opts.teacher_run} is not a plain VideoModel "
                                          f"(finetune, prp or moco run): {e}") from e
            if saved.channel_pool is None and saved.tmm.in_channels != self.store.feature_shape[2]:
                raise ConfigMismatchError(f"the teacher takes {saved.tmm.in_channels} channels but the store has "
                                          f"{self.store.feature_shape[2]}; use a teacher trained on this backbone")
            self.teacher = FrozenTeacher(model)
            self.out_dim = model.num_classes

    def _item(self, ds: StreamClipDataset, k: int, rng: np.random.Generator) -> dict[str, Any]:
        return self.make_item(ds.features(k), ds.clips.mask(k), ds.clips.video_ids[ds.clips.video[k]],
                              ds.timestamps(k), rng)

    def make_item(self, clip: np.ndarray, mask: np.ndarray, video_id: str, timestamps: np.ndarray,
                  rng: np.random.Generator) -> dict[str, Any]:
        """Item of clip features (T, H, W, C) with (T,) valid-frame ``mask`` and (T,) ``timestamps``."""
        item: dict[str, Any] = {"clip": view(clip, self.options.views, rng)}
        if self.teacher is not None:
            item["teacher_clip"] = torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32))
        elif self.store_teacher is not None:
            item["target"] = torch.from_numpy(self.store_teacher.target(video_id, timestamps[mask]))
        else:  # the frozen features of the clip, pooled over its valid frames and the grid
            item["target"] = torch.from_numpy(clip[mask].mean(axis=(0, 1, 2)).astype(np.float32))
        return item

    def online_item(self, clip: StreamClip, rng: np.random.Generator) -> dict[str, Any]:
        return self.make_item(clip.features, clip.mask, clip.video_id, clip.timestamps, rng)

    def train_dataset(self, seed: int) -> StreamClipDataset:
        return StreamClipDataset(self.store, self.cfg.data.train_split, self.options.stream, seed, self._item)

    def build(self) -> nn.Module:
        return build_model(dataclasses.replace(self.cfg.model, num_classes=self.out_dim))

    def step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        out = model(batch["clip"])
        if self.teacher is not None:
            self.teacher.to(batch["teacher_clip"].device)
            target = self.teacher(batch["teacher_clip"])
        else:
            target = batch["target"]
        return {"loss": distill_loss(out, target, self.options)}
