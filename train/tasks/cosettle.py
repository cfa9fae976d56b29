"""``cosettle``: train Co-Settle's projection g on cached patch tokens (``docs/cosettle.md``).

Each video gives one triplet ``[A = t1, B = t2 = t1 + int(0.15 n), A']`` per epoch
(``train.cosettle_data``); g maps every token, and the loss is the cycle A -> B -> A' on 2 x 2
pooled nodes plus lambda x the channel-softmax KL anchor (``train.losses``). The recipe of
the release (AdamW betas (0.9, 0.95), weight decay 0.05 on weight matrices only, lr 1e-4 x
batch / 256, 1 warmup epoch then cosine, 5 epochs, 512 videos per step) is this task's
default (:attr:`CosettleTask.defaults`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from pipeline.config import runtime
from pipeline.errors import ConfigMismatchError
from train.cosettle_data import CosettleDataset, ReturnViewOptions, resolve_return_view
from train.losses import cosettle_loss
from train.models.projection import LINEAR_INITS, PROJECTION_ARCHS, Projection, init_for_backbone
from train.tasks.base import Task
from train.tasks.registry import register_task

__all__ = ["CosettleConfig", "CosettleTask", "store_backbone"]


@dataclass
class CosettleConfig:
    """The ``cosettle`` section.

    return_view: ``auto`` (the store's PEA views; refused without them) | ``pea`` | ``online``
        (the frozen encoder computes A' from the videos during training) | ``plain`` (A' = A,
        for backbones without a positional embedding; not Co-Settle's objective).
    pea_ratio: r of the online view's PEA window (``--asy_pos_ratio`` 10).
    manifest: the videos of the online view (default: the manifest recorded in the store header).
    gap_fraction: t2 - t1 = int(gap_fraction x stored frames) (``--clip_gap`` 0.15).
    tau: walk temperature (0.03 in train.sh); lam: weight of the KL anchor (``--lambda_reg`` 3).
    pool_window: average-pooling window of the cycle's nodes (2, hard-coded in the release).
    arch: projection ``linear`` (released default) | ``mlp2``.
    init: ``auto`` (the released init of the store backbone's family) or a ``LINEAR_INITS`` name.
    """

    return_view: str = "auto"
    pea_ratio: float = 10.0
    manifest: str | None = runtime(None)  # a path: the videos are identified by the store's manifest sha256
    gap_fraction: float = 0.15
    tau: float = 0.03
    lam: float = 3.0
    pool_window: int = 2
    arch: str = "linear"
    init: str = "auto"


def store_backbone(header: dict) -> str:
    """The backbone name recorded in a store header (``""`` when absent)."""
    backbone = header.get("content", {}).get("backbone", "")
    return backbone.get("name", "") if isinstance(backbone, dict) else str(backbone)


@register_task("cosettle")
class CosettleTask(Task):
    """Batch: ``{"views": (B, 3, H, W, C), "frames": (B, 2)}`` (+ ``pixels``, ``offsets`` for the
    online return view); the model is the projection g."""

    encoder: Any = None

    section = "cosettle"
    Config = CosettleConfig
    command = "cosettle"
    uses_model_config = False
    #: the released recipe; the loop's peak lr is base_lr x batch / 64, so base_lr 2.5e-5 is
    #: the release's 1e-4 x batch / 256
    defaults: ClassVar[dict[str, Any]] = {
        "optim": {"base_lr": 2.5e-5, "betas": [0.9, 0.95], "weight_decay": 0.05, "decay_matrices_only": True,
                  "epochs": 5, "warmup_epochs": 1.0, "min_lr": 0.0, "batch_size": 512},
    }

    def preflight(self) -> None:
        super().preflight()
        o = self.options
        PROJECTION_ARCHS.get(o.arch)
        if o.init != "auto":
            LINEAR_INITS.get(o.init)
        h, w, _ = self.store.feature_shape
        if h < o.pool_window or w < o.pool_window:
            raise ConfigMismatchError(
                f"the store's {h}x{w} token grid is smaller than the {o.pool_window}x{o.pool_window} pooling "
                f"window of the cycle; extract at a larger image size or set cosettle.pool_window=1")
        if not 0 < o.gap_fraction < 1:
            raise ConfigMismatchError(f"cosettle.gap_fraction must be in (0, 1), got {o.gap_fraction}")
        view = resolve_return_view(o.return_view, self.store)  # refuses stores without PEA views
        if view == "online":
            from train.cosettle_online import OnlineEncoder  # lazy: only this view needs the encoder

            self.encoder = OnlineEncoder(self.store, o.pea_ratio, self.device)

    def train_dataset(self, seed: int) -> CosettleDataset:
        o = self.options
        return CosettleDataset(self.store, self.cfg.data.train_split, o.return_view, o.gap_fraction, seed,
                               ReturnViewOptions(ratio=o.pea_ratio, manifest=o.manifest))

    def build(self) -> nn.Module:
        o = self.options
        init = init_for_backbone(store_backbone(self.store.header)) if o.init == "auto" else o.init
        return Projection(self.store.feature_shape[2], o.arch, init)  # global RNG: seeded by the loop

    def step(self, model: nn.Module, batch: Any) -> dict[str, Tensor]:
        views = batch["views"]  # (B, 3, H, W, C)
        if "pixels" in batch:  # online return view: the frozen encoder computes A' now
            views = torch.cat([views[:, :2], self.encoder(batch["pixels"], batch["offsets"]).unsqueeze(1)], dim=1)
        o = self.options
        out = cosettle_loss(views.float(), model(views).float(), tau=o.tau, lam=o.lam, window=o.pool_window)
        return {"loss": out.loss, "acc": out.acc, "cycle": out.cycle.detach(), "kl": out.kl.detach(),
                "cos_identity": out.cos_identity.detach().squeeze()}
