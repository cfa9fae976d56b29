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

How it is computed (exact, bounded; profile and timings in ``docs/benchmarks.md``). The grid
is cut into **bands** of whole rows along its longer side (the grid is transposed when it
is wider than tall; the radius is symmetric, so nothing changes). For a band of ``m`` query
cells, a radius-restricted context frame can only supply cells whose row is within
``ceil(radius) - 1`` rows of the band: those rows are one contiguous slice of the frame's
``N`` cells, so the band is multiplied with that slice only (``addmm`` with a 0 / -inf bias
that applies the exact radius), never with the ~55 % of cells beyond the radius (DAVIS:
30 x 55 grid, radius 20). Each distinct ``(frame, restricted)`` context slot is multiplied
once and gives its own top-k; a frame repeated in the context (frame 0 early in the video)
repeats its candidates instead of its affinities, and the top-k of those candidates is the
top-k over all context cells (the global top-k is inside the union of the slots' top-k).
Each frame is normalised once (to float32) and kept while it is in the context. Memory
beyond the features (``T x N x C`` in their stored dtype) and labels: the normalised context (``(K + 1) x N x C``),
one ``(m, N)`` affinity block (``m`` = one band, at most ``max(w, max_affinity_elements /
N)`` cells) and ``(m, K x topk)`` candidates.

Layouts: features ``(T, h, w, C)`` float (any scale; normalised here), labels on the grid
``(T, h, w, L)`` float distributions over ``L`` labels, label maps in pixels ``(H, W)``
int. The grid covers the full frame: cell ``(i, j)`` spans pixels
``[i * H / h, (i + 1) * H / h) x [j * W / w, (j + 1) * W / w)`` of the original frame
(features come from a full-frame resize, never a crop).
"""
from __future__ import annotations

import math
from collections import Counter
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
        max_affinity_elements: bound on one affinity block's float count (memory knob; a
            block holds at least one grid row of queries).
        band_cells: query cells per band, rounded up to whole grid rows (speed knob: smaller
            bands skip more cells beyond the radius, larger ones make larger matrix products).
    """

    context: int = 20
    radius: float = 20.0
    temperature: float = 0.7
    topk: int = 7
    radius_on_first: bool = False
    label_downsample: Literal["bilinear", "area"] = "bilinear"
    upsample: Upsample = "bilinear"
    max_affinity_elements: int = runtime(2**24)
    band_cells: int = runtime(256)

    def __post_init__(self) -> None:
        if self.context < 0:
            raise ValueError(f"context must be >= 0, got {self.context}")
        if self.band_cells < 1:
            raise ValueError(f"band_cells must be >= 1, got {self.band_cells}")
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


@dataclass(frozen=True)
class _Band:
    """Query cells ``[q0, q1)`` (whole rows) and the key cells ``[k0, k1)`` a radius-restricted
    frame can supply to them; ``bias`` ``(q1 - q0, k1 - k0)`` is 0 within the radius, -inf beyond."""

    q0: int
    q1: int
    k0: int
    k1: int
    bias: Tensor


def _bands(h: int, w: int, cfg: PropagationConfig, device: torch.device) -> list[_Band]:
    """Row bands of an ``h x w`` grid (row-major cells) with their key windows (see the module doc)."""
    n = h * w
    rows = max(1, min(-(-cfg.band_cells // w), cfg.max_affinity_elements // (w * n)))
    reach = math.ceil(cfg.radius) - 1  # |dy| < radius  <=>  |dy| <= ceil(radius) - 1
    yy, xx = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1).float()
    out = []
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        k0, k1 = max(0, r0 - reach) * w, min(h, r1 + reach) * w
        near = torch.cdist(pos[r0 * w : r1 * w], pos[k0:k1]) < cfg.radius
        bias = torch.zeros(near.shape, device=device).masked_fill_(~near, float("-inf"))
        out.append(_Band(r0 * w, r1 * w, k0, k1, bias))
    return out


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
    wide = w > h  # bands run along the longer side: transpose a wide grid (the radius is symmetric)
    if wide:
        feats, first_labels, h, w = feats.transpose(1, 2), first_labels.transpose(0, 1), w, h
    x = feats.to(dev).reshape(t_len, n, c)  # stored dtype (float16 stores): each frame becomes float32 when normalised
    labels = torch.zeros(t_len, n, first_labels.shape[-1], dtype=torch.float32, device=dev)
    labels[0] = first_labels.to(dev, torch.float32).reshape(n, -1)
    bands = _bands(h, w, cfg, dev)
    keys: dict[int, Tensor] = {}  # frame -> (N, C) unit rows, while it is in the context
    for t in range(1, t_len):
        ctx = context_indices(t, cfg.context)
        for f in set(ctx) | {t}:
            if f not in keys:
                keys[f] = F.normalize(x[f].float(), dim=-1, eps=1e-12)
        labels[t] = _propagate_frame(keys, labels, t, ctx, bands, cfg)
        for f in [f for f in keys if f not in ctx]:  # frame t stays: it is in the next context
            if f != t:
                del keys[f]
    out = labels.reshape(t_len, h, w, -1)
    return (out.transpose(1, 2) if wide else out).contiguous().cpu()


def _propagate_frame(
    keys: dict[int, Tensor], labels: Tensor, t: int, ctx: Sequence[int], bands: Sequence[_Band],
    cfg: PropagationConfig,
) -> Tensor:
    """``(N, L)`` labels of frame ``t`` from context frames ``ctx`` (``ctx[0]`` is long-term).

    ``keys[f]`` ``(N, C)`` are frame ``f``'s unit rows; ``labels`` ``(T, N, L)``. Each distinct
    ``(frame, restricted)`` slot gives its top-k per query, repeated as often as the slot
    occurs in ``ctx``; the top-k of those candidates is the top-k over all context cells."""
    n = labels.shape[1]
    slots = Counter((f, i > 0 or cfg.radius_on_first) for i, f in enumerate(ctx))
    flat = labels.reshape(-1, labels.shape[-1])  # (T*N, L): row f*N + j is cell j of frame f
    out = torch.empty(n, labels.shape[-1], dtype=torch.float32, device=labels.device)
    for b in bands:
        q = keys[t][b.q0 : b.q1]  # (m, C)
        vals, rows = [], []
        for (f, restricted), times in slots.items():
            if restricted:
                a = torch.addmm(b.bias, q, keys[f][b.k0 : b.k1].T)  # (m, k1 - k0), -inf beyond the radius
                offset = f * n + b.k0
            else:
                a = q @ keys[f].T  # (m, N)
                offset = f * n
            top, idx = torch.topk(a, min(cfg.topk, a.shape[1]), dim=1)
            vals += [top] * times
            rows += [idx + offset] * times
        top, pick = torch.topk(torch.cat(vals, dim=1), cfg.topk, dim=1)  # (m, k)
        idx = torch.gather(torch.cat(rows, dim=1), 1, pick)
        wts = torch.softmax(top / cfg.temperature, dim=1)  # dividing after top-k selects the same cells
        out[b.q0 : b.q1] = torch.einsum("mk,mkl->ml", wts, flat[idx])
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
        g = frame.permute(2, 0, 1)[None].float().contiguous()  # (1, L, h, w); contiguous: 2x faster upsampling
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
