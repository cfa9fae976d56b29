"""Parameter / MAC formulas of train.stats, checked by hand and against the real modules."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from train.models import TMM, MLPHead, ModelConfig, ModelConfigError, TMMConfig, build_model
from train.stats import TMMStats, head_params, tmm_stats, tmm_stats_for_config


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def _conv_weights(m: nn.Module) -> int:
    return sum(c.weight.numel() for c in m.modules() if isinstance(c, nn.Conv3d))


def _measured_conv_macs(m: nn.Module, x: torch.Tensor) -> int:
    """MACs of every Conv3d call, measured with forward hooks: out.numel() * C_in/groups * prod(k)."""
    total = 0

    def hook(mod: nn.Conv3d, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)

    handles = [c.register_forward_hook(hook) for c in m.modules() if isinstance(c, nn.Conv3d)]
    try:
        with torch.no_grad():
            m.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return total


def test_small_config_by_hand() -> None:
    # C_in=8, h=4, C_out=16, N=2, kt=3, T=4, grid 2x2, head: mlp_dim=8, K=3
    # block 1 convs: a 8*4*3=96, b 4*4*9=144, c 4*16=64, shortcut 8*16=128 -> 432
    # block 2 convs: a 16*4*3=192, b 144, c 64, no shortcut             -> 400
    # conv weights: 432 + 400 = 832
    # BN affine: block 1 2*4+2*4+2*16+2*16 = 80, block 2 2*4+2*4+2*16 = 48 -> 128; total 960
    # MACs: 832 weights * (T*H*W = 4*2*2 = 16 positions) = 13312
    # head: 16*8 (fc1, no bias) + 2*8 (BN1d) + 8*3 + 3 (fc2) = 128 + 16 + 27 = 171
    s = tmm_stats(8, 16, 4, 2, 3, frames=4, grid=2, num_classes=3, mlp_dim=8)
    assert s == TMMStats(tmm_conv_params=832, tmm_params=960, head_params=171, tmm_macs=13312)
    assert tmm_stats(8, 16, 4, 2, 3, frames=4, grid=(2, 2), num_classes=3, mlp_dim=8) == s


@pytest.mark.parametrize(
    "c_in,c_out,h,n,kt,t,grid",
    [
        (8, 16, 4, 2, 3, 4, (2, 2)),
        (8, 16, 4, 2, 1, 4, (2, 2)),
        (12, 12, 4, 3, 3, 5, (3, 2)),  # C_in == C_out: no shortcut anywhere
        (6, 10, 3, 1, 5, 6, (1, 4)),
    ],
)
def test_formulas_match_real_modules(
    c_in: int, c_out: int, h: int, n: int, kt: int, t: int, grid: tuple[int, int]
) -> None:
    s = tmm_stats(c_in, c_out, h, n, kt, frames=t, grid=grid, num_classes=4, mlp_dim=32)
    tmm = TMM(c_in, c_out, h, n, kt)
    head = MLPHead(c_out, 4, mlp_dim=32)
    assert s.tmm_conv_params == _conv_weights(tmm)
    assert s.tmm_params == _n_params(tmm)
    assert s.head_params == _n_params(head)
    x = torch.randn(1, c_in, t, *grid, generator=torch.Generator().manual_seed(0))
    assert s.tmm_macs == _measured_conv_macs(tmm, x)


def test_advise_head_counts() -> None:
    # Reference (advise.md 1.4): 512*1024 + 2*1024 + 1024*4 + 4 = 524288 + 2048 + 4100
    assert head_params(512, 4, 1024) == 530_436
    assert _n_params(MLPHead(512, 4, 1024)) == 530_436
    # 1024*1024 + 2048 + 4100
    assert head_params(1024, 4, 1024) == 1_054_724
    assert tmm_stats(768, 512, 256, 4, 1, frames=8, grid=14).head_params == 530_436
    assert tmm_stats(768, 1024, 256, 1, 3, frames=8, grid=14).head_params == 1_054_724


def test_released_yaml_tmm_counts() -> None:
    # Released yaml (kt=1): C_in 768, h 256, C_out 512, N 4, T 8, 14x14 grid.
    # block 1: 768*256 + 256*256*9 + 256*512 + 768*512 = 196608+589824+131072+393216 = 1310720
    # blocks 2-4: 512*256 + 589824 + 131072 = 851968 each -> 2555904; convs 3866624
    # BN: block 1 512+512+1024+1024 = 3072, blocks 2-4 2048 each -> 9216 in all
    s = tmm_stats(768, 512, 256, 4, 1, frames=8, grid=14)
    assert s.tmm_conv_params == 3_866_624
    assert s.tmm_params == 3_866_624 + 9_216
    assert s.tmm_macs == 3_866_624 * 8 * 14 * 14


def test_stats_for_config_applies_compression() -> None:
    cfg = ModelConfig(
        tmm=TMMConfig(in_channels=12, hidden=4, out_channels=8, blocks=2, temporal_kernel=3),
        mlp_dim=16,
        num_classes=5,
        spatial_pool=2,
        channel_pool=6,
    )
    s = tmm_stats_for_config(cfg, frames=3, grid=5)
    assert s == tmm_stats(6, 8, 4, 2, 3, frames=3, grid=2, num_classes=5, mlp_dim=16)
    model = build_model(cfg)
    assert s.tmm_params == _n_params(model.tmm) and s.head_params == _n_params(model.head)
    store_x = torch.randn(1, 3, 5, 5, 12, generator=torch.Generator().manual_seed(0))
    assert s.tmm_macs == _measured_conv_macs(model, store_x)
    with pytest.raises(ModelConfigError, match="arch"):
        tmm_stats_for_config(ModelConfig(arch="avgpool"), frames=8, grid=7)


def test_invalid_arguments() -> None:
    with pytest.raises(ModelConfigError, match="odd"):
        tmm_stats(8, 16, 4, 1, 2, frames=4, grid=2)
    with pytest.raises(ModelConfigError, match="frames"):
        tmm_stats(8, 16, 4, 1, 3, frames=0, grid=2)
