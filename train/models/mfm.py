"""Masked feature modelling (MFM) on cached frozen tokens: tube masks, hidden inputs, a light decoder.

Input and target are the same frozen tokens, so masked positions must be hidden from the
student. Data flow for a clip of store features ``x`` (B, T, H, W, C)::

    z       = model.prepare(x)                    (B, C', T, H', W')  compressed as for training
    mask    = tube_mask(B, H', W', ratio)         (B, H', W') bool, repeated over all T frames
    target  = layer_norm(z over C')               frozen, per token, no affine (data2vec practice)
    z_in    = z with masked positions replaced    by the learned mask token ("token") or by 0 ("drop")
    pred    = decoder(model.tmm(z_in))            (B, C', T, H', W')  pointwise 2-layer MLP decoder
    loss    = masked_feature_loss(pred, target, mask)   Smooth-L1 or cosine, masked positions only

Tube masking: one spatial mask per clip, the same for every frame (VideoMAE). Frozen features
of a static shot barely change over time, so a per-frame mask would be solved by copying the
neighbouring frame.

``hide="drop"`` zeroes the masked tokens (no learned token). The TMM is convolutional, so a
position cannot be skipped the way an MAE encoder drops tokens; zeroing removes the content
but keeps the grid. This is our choice (``docs/longform.md``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import FreezeframeError
from pipeline.registry import Registry
from train.losses import REGRESSION_LOSSES, masked_feature_loss

from .video_model import VideoModel

__all__ = ["MFMConfig", "HIDE_MODES", "tube_mask", "tube_mask_np", "masked_count", "token_targets", "MaskedFeatureModel", "mfm_loss"]


class MaskError(FreezeframeError, ValueError):
    """The mask ratio cannot be realised on this token grid."""


@dataclass
class MFMConfig:
    """Masked feature modelling options.

    Attributes:
        mask_ratio: fraction of the H' x W' token positions masked (tube: all frames); 0.5
            mirrors the paper's VideoMAE setting, 0.75 / 0.9 are the usual VideoMAE values.
        hide: "token" (learned mask token, MaskFeat) or "drop" (zeroed) (:data:`HIDE_MODES`).
        decoder_hidden: width of the pointwise decoder MLP.
        loss: "smooth_l1", "cosine" or "mse"; beta: Smooth-L1 threshold.
    """

    mask_ratio: float = 0.5
    hide: str = "token"
    decoder_hidden: int = 512
    loss: str = "smooth_l1"
    beta: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        HIDE_MODES.get(self.hide)
        REGRESSION_LOSSES.get(self.loss)


HIDE_MODES: Registry[str] = Registry("MFM hide mode")
HIDE_MODES.add("token", "learned mask token")
HIDE_MODES.add("drop", "zeroed token")


def masked_count(positions: int, ratio: float) -> int:
    """``round(ratio * positions)``; refuses 0 or all positions (nothing to learn from)."""
    n = int(round(ratio * positions))
    if n < 1 or n >= positions:
        raise MaskError(
            f"mask ratio {ratio} masks {n} of {positions} token positions; with this grid use a "
            f"ratio that masks between 1 and {positions - 1} (or a larger grid / less spatial pooling)"
        )
    return n


def tube_mask(batch: int, h: int, w: int, ratio: float, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> Tensor:
    """(B, H, W) bool: exactly ``masked_count(H*W, ratio)`` positions True per clip, uniformly chosen."""
    n = masked_count(h * w, ratio)
    scores = torch.rand(batch, h * w, generator=generator)
    idx = scores.argsort(dim=1)[:, :n]
    mask = torch.zeros(batch, h * w, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    return mask.view(batch, h, w).to(device)


def tube_mask_np(h: int, w: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """One clip's tube mask (H, W) bool from a numpy generator (datasets draw masks per item)."""
    n = masked_count(h * w, ratio)
    mask = np.zeros(h * w, dtype=bool)
    mask[rng.choice(h * w, size=n, replace=False)] = True
    return mask.reshape(h, w)


def token_targets(z: Tensor) -> Tensor:
    """Layer-normalised tokens over channels, no affine: (B, C, T, H, W) -> same shape, no grad."""
    with torch.no_grad():
        return F.layer_norm(z.detach().movedim(1, -1), (z.shape[1],), eps=1e-6).movedim(-1, 1)


class MaskedFeatureModel(VideoModel):
    """A :class:`VideoModel`'s compression and temporal module, a mask token and a pointwise decoder.

    There is no classification head (``head`` is an identity): a fine-tuning run loads the
    ``tmm.*`` weights and makes a fresh head. ``forward(x, mask)`` does the whole MFM pass, so
    DistributedDataParallel sees every parameter used in one forward.

    Args:
        base: the student VideoModel (its temporal module is taken over, not copied).
        decoder_hidden: hidden width of the decoder Conv3d(1x1x1) -> GELU -> Conv3d(1x1x1).
        hide: "token" or "drop" (:data:`HIDE_MODES`).
    """

    def __init__(self, base: VideoModel, decoder_hidden: int = 512, hide: str = "token") -> None:
        c_in, c_out = base.in_channels, base.head.in_channels
        super().__init__(base.tmm, nn.Identity(), c_in, base.spatial_pool, base.channel_pool)  # type: ignore[arg-type]
        HIDE_MODES.get(hide)
        self.hide_mode = hide
        self.mask_token = nn.Parameter(torch.zeros(c_in))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(
            nn.Conv3d(c_out, decoder_hidden, 1), nn.GELU(), nn.Conv3d(decoder_hidden, c_in, 1)
        )

    def hide(self, z: Tensor, mask: Tensor) -> Tensor:
        """Replace masked positions of ``z`` (B, C, T, H, W) by the mask token or 0.

        ``mask`` (B, H, W) bool (a tube: the same for every frame). ``torch.where`` selects,
        so the values at masked positions reach neither the output nor its gradient.
        """
        m = mask[:, None, None, :, :]  # (B, 1, 1, H, W)
        if self.hide_mode == "token":
            fill = self.mask_token.to(z.dtype)[None, :, None, None, None]
        else:
            fill = torch.zeros((), dtype=z.dtype, device=z.device)
        return torch.where(m, fill, z)

    def predict(self, z: Tensor, mask: Tensor) -> Tensor:
        """Predictions (B, C, T, H, W) for prepared tokens ``z`` with ``mask`` hidden."""
        return self.decoder(self.tmm(self.hide(z, mask)))

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        """Store features ``x`` (B, T, H, W, C) and a tube ``mask`` (B, H', W') bool on the
        compressed grid -> ``(pred, target, masked)``: (B, T, H', W', C') predictions,
        layer-normalised frozen targets, and (B, T, H', W') bool masked positions."""
        z = self.prepare(x)
        b, _, t, h, w = z.shape
        if mask.shape != (b, h, w):
            raise MaskError(f"mask {tuple(mask.shape)} does not match the token grid ({b}, {h}, {w})")
        pred = self.predict(z, mask)
        target = token_targets(z)
        return pred.movedim(1, -1), target.movedim(1, -1), mask[:, None, :, :].expand(b, t, h, w)


def mfm_loss(model: nn.Module, x: Tensor, mask: Tensor, cfg: MFMConfig) -> dict[str, Tensor]:
    """The MFM loss of store features ``x`` (B, T, H, W, C) with tube ``mask`` (B, H', W'):
    ``loss`` (masked positions only) and ``masked`` (fraction of positions masked)."""
    pred, target, masked = model(x, mask)
    loss = masked_feature_loss(pred.float(), target.float(), masked, cfg.loss, cfg.beta)
    return {"loss": loss, "masked": masked.float().mean()}
