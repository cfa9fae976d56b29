"""Parameter-free feature compression (AdViSe's "SFU"), shared by extraction and training.

Both poolings are adaptive average pools (PyTorch ``AdaptiveAvgPool1d`` / ``AdaptiveAvgPool2d``
semantics: output cell ``i`` of ``n`` averages input cells ``floor(i*L/n) .. ceil((i+1)*L/n) - 1``).
They are deterministic and have no parameters, so applying one once when the store is written
gives the same features as applying it at every training step.

All functions take channels-last float tensors with any number of leading dims:
``(N, H, W, C)`` at extraction, ``(B, T, H, W, C)`` at training. The dtype is preserved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import FreezeframeError

__all__ = ["PoolingError", "spatial_pool", "channel_pool", "compress"]


class PoolingError(FreezeframeError, ValueError):
    """A pooling size is invalid for the features it is applied to."""


def _check_size(name: str, size: int, available: int, what: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise PoolingError(f"{name} must be a positive integer or None (no pooling), got {size!r}")
    if size > available:
        raise PoolingError(
            f"{name}={size} is larger than the features' {what} ({available}); pooling can only "
            f"compress. Use {name} <= {available}, or None to keep the features as they are."
        )


def _check_float(x: Tensor) -> None:
    if not torch.is_floating_point(x):
        raise PoolingError(
            f"pooling needs floating-point features, got {x.dtype}; dequantise int8 stores first"
        )


def spatial_pool(x: Tensor, k: int | None) -> Tensor:
    """Adaptive average pooling of the spatial grid to ``k x k``.

    Args:
        x: ``(..., H, W, C)`` channels-last float features (at least 3 dims).
        k: output side; ``None`` returns ``x`` unchanged. Must satisfy ``k <= min(H, W)``.

    Returns:
        ``(..., k, k, C)``, same dtype and device as ``x``.
    """
    if k is None:
        return x
    if x.dim() < 3:
        raise PoolingError(f"spatial_pool expects (..., H, W, C) features, got shape {tuple(x.shape)}")
    _check_float(x)
    *lead, h, w, c = x.shape
    _check_size("spatial_pool", k, min(h, w), "grid side min(H, W)")
    flat = x.reshape(-1, h, w, c).permute(0, 3, 1, 2)  # (N, C, H, W), channels-last strides
    out = F.adaptive_avg_pool2d(flat, (k, k))  # (N, C, k, k)
    return out.permute(0, 2, 3, 1).reshape(*lead, k, k, c)


def channel_pool(x: Tensor, c: int | None) -> Tensor:
    """Adaptive average pooling over groups of adjacent channels (e.g. 768 -> 256 averages triplets).

    Args:
        x: ``(..., C)`` float features (at least 1 dim).
        c: output channel count; ``None`` returns ``x`` unchanged. Must satisfy ``c <= C``.

    Returns:
        ``(..., c)``, same dtype and device as ``x``.
    """
    if c is None:
        return x
    if x.dim() < 1:
        raise PoolingError("channel_pool expects (..., C) features, got a scalar")
    _check_float(x)
    *lead, ch = x.shape
    _check_size("channel_pool", c, ch, "channel count C")
    out = F.adaptive_avg_pool1d(x.reshape(-1, 1, ch), c)  # (N, 1, c)
    return out.reshape(*lead, c)


def compress(x: Tensor, spatial: int | None, channels: int | None) -> Tensor:
    """Channel pooling first, then spatial pooling (the released AdViSe order).

    ``(..., H, W, C)`` -> ``(..., spatial, spatial, channels)`` (``None`` keeps that axis).
    """
    return spatial_pool(channel_pool(x, channels), spatial)
