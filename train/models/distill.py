"""Teacher-student distillation pieces: frozen teachers and the distillation losses.

Two kinds of frozen teacher (the student is always a VideoModel trained from scratch):

* :class:`FrozenTeacher` wraps a trained model (any run's TMM + head: a fine-tuned or PRP
  model); the student's head has the teacher's number of outputs and learns its logits with
  ``kl`` (KL at a temperature) or its outputs with a regression loss.
* :class:`StoreTeacher` reads a second feature store of another backbone for the same videos:
  the target of a clip is that store's tokens over the clip's time span, averaged over frames
  and grid, shape (C_t,); the student's head has C_t outputs and regresses it (``cosine``,
  ``smooth_l1`` or ``mse``). With the training store itself as teacher store, this is the
  "frozen, temporally pooled teacher" analogue of ``docs/longform.md``.

Frames of the two stores are matched by presentation time (:func:`align_by_time`), not by
index, so the stores may be extracted at different frame rates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.errors import ConfigMismatchError
from pipeline.registry import Registry
from pipeline.store import FeatureStore
from train.losses import REGRESSION_LOSSES, distill_kl, feature_regression

__all__ = ["DistillConfig", "DISTILL_LOSSES", "distill_loss", "FrozenTeacher", "StoreTeacher", "align_by_time"]


@dataclass
class DistillConfig:
    """Distillation options.

    Attributes:
        teacher: "run" (a trained run's model) or "store" (a second store's pooled features).
        teacher_run: run directory or checkpoint of the teacher (teacher = "run").
        teacher_store: store of the teacher's features ("" = the training store itself).
        loss: "kl" (logits, teacher = "run") or a regression loss ("cosine", "smooth_l1", "mse").
        temperature: KL temperature.
    """

    teacher: str = "store"
    teacher_run: str = ""
    teacher_store: str = ""
    loss: str = "cosine"
    temperature: float = 4.0

    def __post_init__(self) -> None:
        DISTILL_LOSSES.get(self.loss)
        if self.teacher not in ("run", "store"):
            raise ValueError(f"teacher must be 'run' or 'store', got {self.teacher!r}")
        if self.teacher == "store" and self.loss == "kl":
            raise ValueError("loss 'kl' needs logits: use teacher='run', or a regression loss with teacher='store'")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


DistillLoss = Callable[[Tensor, Tensor, DistillConfig], Tensor]
"""``loss(student_out (B, D), teacher_out (B, D), cfg) -> scalar``."""

DISTILL_LOSSES: Registry[DistillLoss] = Registry("distillation loss")
DISTILL_LOSSES.add("kl", lambda s, t, cfg: distill_kl(s, t, cfg.temperature))
for _name in REGRESSION_LOSSES.names():
    DISTILL_LOSSES.add(_name, lambda s, t, cfg, _n=_name: feature_regression(s, t, _n))


def distill_loss(student_out: Tensor, teacher_out: Tensor, cfg: DistillConfig) -> Tensor:
    """The configured distillation loss; shapes must match (B, D)."""
    if student_out.shape != teacher_out.shape:
        raise ConfigMismatchError(
            f"student output {tuple(student_out.shape)} vs teacher output {tuple(teacher_out.shape)}; "
            f"set model.num_classes to the teacher's output width ({teacher_out.shape[-1]})"
        )
    return DISTILL_LOSSES.get(cfg.loss)(student_out.float(), teacher_out.float(), cfg)


class FrozenTeacher(nn.Module):
    """A trained model, frozen: no parameter requires grad, always in eval mode, no autograd.

    ``train(True)`` is ignored (BatchNorm statistics never move), so the teacher is the same
    function for the whole run.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def align_by_time(source_ts: np.ndarray, teacher_ts: np.ndarray, tolerance: float | None = None) -> np.ndarray:
    """Index of the teacher frame nearest in time to each source frame, shape like ``source_ts``.

    ``tolerance`` (seconds; default half the teacher's median frame gap) bounds the distance;
    a farther match means the stores do not cover the same span, which is refused.
    """
    teacher_ts = np.asarray(teacher_ts, dtype=np.float64)
    source_ts = np.asarray(source_ts, dtype=np.float64)
    if len(teacher_ts) == 0:
        raise ConfigMismatchError("the teacher store has no frame for this video")
    pos = np.clip(np.searchsorted(teacher_ts, source_ts), 1, max(1, len(teacher_ts) - 1))
    left = np.clip(pos - 1, 0, len(teacher_ts) - 1)
    right = np.clip(pos, 0, len(teacher_ts) - 1)
    idx = np.where(np.abs(teacher_ts[left] - source_ts) <= np.abs(teacher_ts[right] - source_ts), left, right)
    if tolerance is None:
        gaps = np.diff(teacher_ts)
        tolerance = 0.5 * float(np.median(gaps)) + 1e-9 if len(gaps) else float("inf")
    worst = float(np.max(np.abs(teacher_ts[idx] - source_ts))) if len(idx) else 0.0
    if worst > tolerance:
        raise ConfigMismatchError(
            f"a frame at {source_ts[np.argmax(np.abs(teacher_ts[idx] - source_ts))]:.3f} s has no teacher "
            f"frame within {tolerance:.3f} s (nearest is {worst:.3f} s away); extract the teacher store "
            f"from the same videos and time window"
        )
    return idx


class StoreTeacher:
    """Pooled features of a second store for the same videos (read-only, nothing to train).

    ``target(video_id, timestamps)`` -> (C_t,) float32: the teacher tokens of the frames nearest
    to ``timestamps`` (seconds, the student clip's frames), averaged over frames and grid.
    """

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self._ts: dict[str, np.ndarray] = {}

    @property
    def dim(self) -> int:
        return int(self.store.feature_shape[-1])

    def target(self, video_id: str, timestamps: np.ndarray) -> np.ndarray:
        if video_id not in self.store:
            raise ConfigMismatchError(
                f"video {video_id!r} is not in the teacher store {self.store.path}; extract the "
                f"teacher store from the same manifest"
            )
        if video_id not in self._ts:
            self._ts[video_id] = self.store.timestamps(video_id)
        idx = align_by_time(timestamps, self._ts[video_id])
        return self.store.features(video_id, idx).mean(axis=(0, 1, 2))
