"""Parameter and MAC counts of the TMM and head, from closed-form formulas (``freezeframe stats``).

Conventions (the paper's): MACs count only convolutions, one multiply-accumulate per weight per
output position; every conv has stride 1 and "same" padding, so each conv runs at all
``T x H x W`` positions of the clip (padded borders included) and

    tmm_macs = tmm_conv_params * T * H * W

Per block i (C_i = C_in for i = 0, else C_out; kt = temporal kernel; h = hidden):

    conv weights = C_i*h*kt (a) + h*h*9 (b) + h*C_out (c) [+ C_i*C_out shortcut, i=0 and C_in != C_out]
    BN affine    = 2*h + 2*h + 2*C_out [+ 2*C_out shortcut BN]

Head (Linear without bias, BN1d, Linear with bias): ``C_out*m + 2*m + m*K + K``.
BatchNorm running statistics are buffers, not parameters, and are not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from train.models import ModelConfig, ModelConfigError, expected_in_channels, validate_model_config
from train.models.tmm import check_temporal_kernel

__all__ = ["TMMStats", "tmm_stats", "head_params", "tmm_stats_for_config"]


@dataclass
class TMMStats:
    """Counts for one TMM + head configuration.

    Attributes:
        tmm_conv_params: conv weights of the TMM (shortcut conv included).
        tmm_params: all trainable TMM parameters (convs + BatchNorm affine).
        head_params: all trainable head parameters.
        tmm_macs: multiply-accumulates of the TMM convs per clip (T x H x W output positions).
    """

    tmm_conv_params: int
    tmm_params: int
    head_params: int
    tmm_macs: int


def _pos(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def head_params(in_channels: int, num_classes: int = 4, mlp_dim: int = 1024) -> int:
    """Trainable parameters of ``MLPHead(in_channels, num_classes, mlp_dim)``."""
    c, k, m = _pos("in_channels", in_channels), _pos("num_classes", num_classes), _pos("mlp_dim", mlp_dim)
    return c * m + 2 * m + m * k + k


def tmm_stats(
    in_channels: int,
    out_channels: int,
    hidden: int,
    blocks: int,
    temporal_kernel: int,
    frames: int,
    grid: int | tuple[int, int],
    num_classes: int = 4,
    mlp_dim: int = 1024,
) -> TMMStats:
    """Counts for a TMM of ``blocks`` bottleneck blocks on ``frames`` x grid inputs, plus its head.

    Args:
        in_channels: C_in seen by the TMM (after any channel pooling).
        out_channels, hidden, blocks, temporal_kernel: C_out, h, N, odd kt.
        frames: T, frames per clip.
        grid: H = W (int) or (H, W), after any spatial pooling.
        num_classes, mlp_dim: head size.
    """
    c_in, c_out, h = _pos("in_channels", in_channels), _pos("out_channels", out_channels), _pos("hidden", hidden)
    n, t = _pos("blocks", blocks), _pos("frames", frames)
    kt = check_temporal_kernel(temporal_kernel)
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    positions = t * _pos("grid height", gh) * _pos("grid width", gw)

    conv = 0
    bn = 0
    for i in range(n):
        c_i = c_in if i == 0 else c_out
        conv += c_i * h * kt + h * h * 9 + h * c_out
        bn += 2 * h + 2 * h + 2 * c_out
        if c_i != c_out:  # only possible for the first block
            conv += c_i * c_out
            bn += 2 * c_out
    return TMMStats(
        tmm_conv_params=conv,
        tmm_params=conv + bn,
        head_params=head_params(c_out, num_classes, mlp_dim),
        tmm_macs=conv * positions,
    )


def tmm_stats_for_config(cfg: ModelConfig, frames: int, grid: int | tuple[int, int]) -> TMMStats:
    """``tmm_stats`` for a ``ModelConfig`` with ``arch="tmm"``, applying its compression.

    ``grid`` is the store's grid (H, W); ``cfg.spatial_pool`` (if set) replaces it and
    ``cfg.channel_pool`` (if set) replaces ``cfg.tmm.in_channels``, as in ``VideoModel``.
    """
    validate_model_config(cfg)
    if cfg.arch != "tmm":
        raise ModelConfigError(f"tmm_stats_for_config needs model.arch='tmm', got {cfg.arch!r}")
    eff_grid = grid if cfg.spatial_pool is None else (cfg.spatial_pool, cfg.spatial_pool)
    return tmm_stats(
        in_channels=expected_in_channels(cfg),
        out_channels=cfg.tmm.out_channels,
        hidden=cfg.tmm.hidden,
        blocks=cfg.tmm.blocks,
        temporal_kernel=cfg.tmm.temporal_kernel,
        frames=frames,
        grid=eff_grid,
        num_classes=cfg.num_classes,
        mlp_dim=cfg.mlp_dim,
    )
