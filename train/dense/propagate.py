"""Label propagation through a video by feature affinities (the CRW protocol).

For every frame ``t >= 1`` the context is the first frame plus the ``context`` frames
before ``t`` (``t - context .. t - 1``; indices below 0 repeat frame 0, as CRW pads the
video with copies of its first frame). Features are L2-normalised per cell; the affinity
of a query cell to every context cell is their dot product divided by ``temperature``;
cells of the short-term context farther than ``radius`` cells (Euclidean distance on the
grid, strictly less than ``radius`` is kept) are excluded (the first frame is not
restricted, as in CRW's ``long_mem``); the ``topk`` largest affinities over all context
cells are kept and soft-maxed, and the query's label distribution is the weighted sum of
those cells' label distributions (the first frame carries its ground truth, later frames
their own propagated soft labels).

Memory is bounded: affinities are computed for chunks of query cells so that one chunk's
``(n, K, N)`` block never exceeds ``max_affinity_elements`` floats, and each distinct
context frame is multiplied once per chunk (frame 0 repeats early in the video). Beyond the
features themselves (``T x N x C`` floats, normalised row by row when used), the peak is
the context keys (``K x N x C``) plus two affinity blocks.

Layouts: features ``(T, h, w, C)`` float (any scale; normalised here), labels on the grid
``(T, h, w, L)`` float distributions over ``L`` labels, label maps in pixels ``(H, W)``
int. The grid covers the full frame: cell ``(i, j)`` spans pixels
``[i * H / h, (i + 1) * H / h) x [j * W / w, (j + 1) * W / w)`` of the original frame
(features come from a full-frame resize, never a crop).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.config import runtime
from pipeline.errors import FreezeframeError

__all__ = [
    "PropagationConfig",
    "PropagationError",
    "context_indices",
    "radius_mask",
    "propagate",
    "labels_to_grid",
    "grid_to_labels",
    "iter_grid_to_labels",
]

Upsample = Literal["bilinear", "nearest"]


class PropagationError(FreezeframeError, ValueError):
    """Propagation parameters that do not fit the features (e.g. top-k above the grid's cells)."""


@dataclass(frozen=True)
class PropagationConfig:
    """Parameters of the propagation (defaults: DAVIS-2017 / JHMDB; VIP uses ``topk=10``).

    Attributes:
        context: short-term context frames before the target (plus the first frame).
        radius: spatial radius in feature cells (short-term context; strict ``<``).
        temperature: affinities are divided by it before top-k and softmax.
        topk: context cells kept per query cell.
        radius_on_first: also restrict the first frame by ``radius`` (CRW: no).
        label_downsample: how first-frame pixel labels reach the grid: ``bilinear`` samples
            the one-hot maps at cell centres (CRW's ``cv2.resize`` INTER_LINEAR), ``area``
            averages them over each cell.
        upsample: grid labels back to pixels: ``bilinear`` (CRW) or ``nearest``.
        max_affinity_elements: bound on one affinity block's float count (memory knob).
    """

    context: int = 20
    radius: float = 20.0
    temperature: float = 0.7
    topk: int = 7
    radius_on_first: bool = False
    label_downsample: Literal["bilinear", "area"] = "bilinear"
    upsample: Upsample = "bilinear"
    max_affinity_elements: int = runtime(2**24)

    def __post_init__(self) -> None:
        if self.context < 0:
            raise ValueError(f"context must be >= 0, got {self.context}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.radius <= 0:
            raise ValueError(f"radius must be > 0 cells, got {self.radius}")
        if self.upsample not in ("bilinear", "nearest"):
            raise ValueError(f"upsample must be 'bilinear' or 'nearest', got {self.upsample!r}")
        if self.label_downsample not in ("bilinear", "area"):
            raise ValueError(f"label_downsample must be 'bilinear' or 'area', got {self.label_downsample!r}")


def context_indices(t: int, context: int) -> list[int]:
    """Context frames of target ``t >= 1``: ``[0] + [max(0, s) for s in t-context .. t-1]``."""
    return [0] + [max(0, s) for s in range(t - context, t)]


def radius_mask(h: int, w: int, radius: float, device: torch.device | None = None) -> Tensor:
    """``(h*w, h*w)`` bool: cell pairs closer than ``radius`` cells (Euclidean, strict)."""
    yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1).float()
    return torch.cdist(pos, pos) < radius


@torch.no_grad()
def propagate(
    feats: Tensor,
    first_labels: Tensor,
    cfg: PropagationConfig = PropagationConfig(),
    device: torch.device | str | None = None,
) -> Tensor:
    """Propagate the first frame's grid labels through the video.

    Args:
        feats: ``(T, h, w, C)`` features of every frame (normalised here).
        first_labels: ``(h, w, L)`` label distributions of frame 0 on the grid.
        cfg: the protocol parameters.
        device: where to compute (default: ``feats``' device).

    Returns:
        ``(T, h, w, L)`` float32 soft labels on the CPU; frame 0 is ``first_labels``.
    """
    if feats.ndim != 4:
        raise ValueError(f"feats must be (T, h, w, C), got shape {tuple(feats.shape)}")
    t_len, h, w, c = feats.shape
    if first_labels.shape[:2] != (h, w) or first_labels.ndim != 3:
        raise ValueError(f"first_labels must be ({h}, {w}, L), got shape {tuple(first_labels.shape)}")
    dev = torch.device(device) if device is not None else feats.device
    n = h * w
    if cfg.topk > n:
        raise PropagationError(
            f"topk {cfg.topk} exceeds the {n} cells of one {h}x{w} frame; lower --topk or extract at a larger size"
        )
    x = feats.to(dev, torch.float32).reshape(t_len, n, c)  # no copy when already float32 there
    norms = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (T, N, 1): L2 normalisation on the fly
    labels = torch.zeros(t_len, n, first_labels.shape[-1], dtype=torch.float32, device=dev)
    labels[0] = first_labels.to(dev, torch.float32).reshape(n, -1)
    far = ~radius_mask(h, w, cfg.radius, dev)  # (n, n) True = excluded
    for t in range(1, t_len):
        ctx = context_indices(t, cfg.context)
        labels[t] = _propagate_frame(x, norms, labels, t, ctx, far, cfg)
    return labels.reshape(t_len, h, w, -1).cpu()


def _propagate_frame(
    x: Tensor, norms: Tensor, labels: Tensor, t: int, ctx: Sequence[int], far: Tensor, cfg: PropagationConfig
) -> Tensor:
    """``(N, L)`` labels of frame ``t`` from context frames ``ctx`` (``ctx[0]`` is long-term).

    ``x`` ``(T, N, C)`` raw features and ``norms`` ``(T, N, 1)`` their L2 norms: only the
    context and query rows are normalised, so no normalised copy of the video is held."""
    n = x.shape[1]
    k_len = len(ctx)
    uniq, inv = np.unique(np.asarray(ctx), return_inverse=True)
    u = torch.as_tensor(uniq, device=x.device)
    keys = (x[u] / norms[u]).reshape(len(uniq) * n, -1)  # (U*N, C) unit rows
    inv_t = torch.as_tensor(inv, device=x.device)
    ctx_labels = labels[torch.as_tensor(np.asarray(ctx), device=x.device)].reshape(k_len * n, -1)  # (K*N, L)
    identity = bool(np.array_equal(inv, np.arange(k_len)))  # no repeated frame: skip the gather
    first_slot = 0 if cfg.radius_on_first else 1  # slots from here on are radius-restricted
    chunk = max(1, cfg.max_affinity_elements // max(1, k_len * n))
    out = torch.empty(n, labels.shape[-1], dtype=torch.float32, device=x.device)
    for q0 in range(0, n, chunk):
        q = x[t, q0 : q0 + chunk] / norms[t, q0 : q0 + chunk]  # (m, C) unit rows
        a = (q @ keys.T).view(q.shape[0], len(uniq), n)  # (m, U, N): one GEMM
        if not identity:
            a = a[:, inv_t]  # (m, K, N): repeated frames are distinct context slots
        a[:, first_slot:].masked_fill_(far[q0 : q0 + chunk][:, None, :], float("-inf"))
        top, idx = torch.topk(a.reshape(q.shape[0], k_len * n), cfg.topk, dim=1)  # (m, k)
        wts = torch.softmax(top / cfg.temperature, dim=1)  # dividing after top-k selects the same cells
        out[q0 : q0 + chunk] = torch.einsum("mk,mkl->ml", wts, ctx_labels[idx])
    return out


def labels_to_grid(
    label_map: np.ndarray | Tensor,
    label_values: Sequence[int],
    grid: tuple[int, int],
    mode: Literal["bilinear", "area"] = "bilinear",
) -> Tensor:
    """One-hot pixel labels ``(H, W)`` -> grid distributions ``(h, w, L)`` float32.

    Channel ``l`` is the indicator of ``label_values[l]``. ``bilinear`` samples at cell
    centres (align_corners=False, no antialiasing, as ``cv2.resize`` INTER_LINEAR), ``area``
    averages over each cell (exact when the grid divides the image).
    """
    lab = torch.as_tensor(np.asarray(label_map)).long()
    onehot = torch.stack([(lab == v) for v in label_values]).float()[None]  # (1, L, H, W)
    if mode == "area":
        g = F.adaptive_avg_pool2d(onehot, grid)
    else:
        g = F.interpolate(onehot, size=grid, mode="bilinear", align_corners=False, antialias=False)
    return g[0].permute(1, 2, 0).contiguous()


def iter_grid_to_labels(
    soft: Tensor, size: tuple[int, int], label_values: Sequence[int], mode: Upsample = "bilinear"
) -> Iterator[np.ndarray]:
    """Frame by frame (bounded memory): ``(T, h, w, L)`` -> ``(H, W)`` label maps (values from
    ``label_values``) by upsampling each distribution to ``size`` then taking the argmax."""
    values = np.asarray(label_values)
    for frame in soft:
        g = frame.permute(2, 0, 1)[None].float()  # (1, L, h, w)
        if mode == "nearest":
            up = F.interpolate(g, size=size, mode="nearest")
        else:
            up = F.interpolate(g, size=size, mode="bilinear", align_corners=False)
        yield values[up[0].argmax(0).numpy()]


def grid_to_labels(
    soft: Tensor, size: tuple[int, int], label_values: Sequence[int], mode: Upsample = "bilinear"
) -> np.ndarray:
    """All frames of :func:`iter_grid_to_labels` stacked: ``(T, H, W)``."""
    return np.stack(list(iter_grid_to_labels(soft, size, label_values, mode)))
