"""Stage-2 models (TMM, head, VideoModel) and the shared parameter-free pooling."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import from_dict
from pipeline.errors import ConfigMismatchError, FreezeframeError
from pipeline.pooling import PoolingError, channel_pool, compress, spatial_pool
from train.models import (
    MODELS,
    TMM,
    MLPHead,
    ModelConfig,
    ModelConfigError,
    TMMConfig,
    arch_signature,
    build_model,
    check_arch_compatible,
    check_input_channels,
    expected_in_channels,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomise_bn(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial BN affine + running stats, so eval-mode checks exercise them."""
    g = _gen(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm3d)):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_spatial_pool_matches_adaptive_avg_pool2d(lead: tuple[int, ...]) -> None:
    x = torch.randn(*lead, 7, 7, 5, generator=_gen())
    out = spatial_pool(x, 3)
    assert out.shape == (*lead, 3, 3, 5)
    ref = nn.AdaptiveAvgPool2d(3)(x.reshape(-1, 7, 7, 5).permute(0, 3, 1, 2))
    ref = ref.permute(0, 2, 3, 1).reshape(*lead, 3, 3, 5)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # hand check of one cell: 7 -> 3 cell 0 covers rows/cols 0..2 (floor(0)..ceil(7/3)-1)
    torch.testing.assert_close(out[..., 0, 0, :], x[..., 0:3, 0:3, :].mean(dim=(-3, -2)))


def test_spatial_pool_non_square_and_none() -> None:
    x = torch.randn(2, 4, 6, 3, generator=_gen())  # (N, H=4, W=6, C)
    assert spatial_pool(x, None) is x
    out = spatial_pool(x, 2)
    ref = nn.AdaptiveAvgPool2d((2, 2))(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with pytest.raises(PoolingError, match="spatial_pool=5"):
        spatial_pool(x, 5)  # larger than min(H, W) = 4


@pytest.mark.parametrize("c_in,c_out", [(12, 4), (10, 4), (8, 8)])
def test_channel_pool_matches_adaptive_avg_pool1d(c_in: int, c_out: int) -> None:
    x = torch.randn(2, 3, 4, 4, c_in, generator=_gen())
    out = channel_pool(x, c_out)
    assert out.shape == (2, 3, 4, 4, c_out)
    ref = nn.AdaptiveAvgPool1d(c_out)(x.reshape(-1, 1, c_in)).reshape(2, 3, 4, 4, c_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_channel_pool_averages_adjacent_triplets() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(1, 12)
    out = channel_pool(x, 4)
    assert out.tolist() == [[1.0, 4.0, 7.0, 10.0]]  # means of (0,1,2), (3,4,5), ...
    assert channel_pool(x, None) is x
    with pytest.raises(PoolingError):
        channel_pool(x, 13)
    with pytest.raises(PoolingError, match="floating-point"):
        channel_pool(x.to(torch.int8), 4)


def test_compress_order_and_dtype() -> None:
    x = torch.randn(2, 7, 7, 12, generator=_gen())
    out = compress(x, 2, 3)
    assert out.shape == (2, 2, 2, 3)
    torch.testing.assert_close(out, spatial_pool(channel_pool(x, 3), 2), rtol=0, atol=0)
    half = compress(x.half(), 2, 3)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), out, rtol=0, atol=2e-3)


# ---------------------------------------------------------------- TMM


@pytest.mark.parametrize("kt", [1, 3])
def test_tmm_output_shape(kt: int) -> None:
    tmm = TMM(in_channels=6, out_channels=8, hidden=4, blocks=2, temporal_kernel=kt)
    out = tmm(torch.randn(2, 6, 5, 3, 4, generator=_gen()))
    assert out.shape == (2, 8, 5, 3, 4)
    assert (out >= 0).all()  # final ReLU


def test_tmm_rejects_even_kernel() -> None:
    with pytest.raises(ModelConfigError, match="odd"):
        TMM(in_channels=4, out_channels=4, hidden=2, temporal_kernel=2)
    with pytest.raises(ModelConfigError, match="odd"):
        build_model(ModelConfig(tmm=TMMConfig(in_channels=4, temporal_kernel=4)))


def test_tmm_shortcut_only_when_widths_differ_and_no_biases() -> None:
    tmm = TMM(in_channels=6, out_channels=8, hidden=4, blocks=3, temporal_kernel=3)
    shortcuts = [b.shortcut for b in tmm.blocks]
    assert isinstance(shortcuts[0], nn.Sequential)
    assert isinstance(shortcuts[0][0], nn.Conv3d) and shortcuts[0][0].kernel_size == (1, 1, 1)
    assert isinstance(shortcuts[0][1], nn.BatchNorm3d)
    assert shortcuts[1:] == [None, None]
    assert tmm.blocks[1].conv_a.in_channels == 8  # later blocks take C_out

    same = TMM(in_channels=8, out_channels=8, hidden=4, blocks=2)
    assert all(b.shortcut is None for b in same.blocks)

    convs = [m for m in tmm.modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) == 3 * 3 + 1
    assert all(c.bias is None for c in convs)
    assert all(c.stride == (1, 1, 1) for c in convs)
    assert tmm.blocks[0].conv_a.kernel_size == (3, 1, 1) and tmm.blocks[0].conv_a.padding == (1, 0, 0)
    assert tmm.blocks[0].conv_b.kernel_size == (1, 3, 3) and tmm.blocks[0].conv_b.padding == (0, 1, 1)


def _changed_frames(tmm: TMM, t: int, frames: int = 7) -> list[int]:
    """Output frames that change when input frame ``t`` is perturbed (eval mode)."""
    _randomise_bn(tmm)
    tmm.eval()
    x = torch.randn(2, tmm.in_channels, frames, 3, 3, generator=_gen(2))
    y = x.clone()
    y[:, :, t] += 3.0 * torch.randn(2, tmm.in_channels, 3, 3, generator=_gen(3))
    with torch.no_grad():
        diff = (tmm(x) - tmm(y)).abs().amax(dim=(0, 1, 3, 4))
    assert diff.max() > 1e-3  # the perturbation does reach the output
    return [i for i in range(frames) if diff[i] > 1e-6]


def test_kt1_has_no_temporal_receptive_field() -> None:
    torch.manual_seed(0)
    tmm = TMM(in_channels=6, out_channels=8, hidden=4, blocks=2, temporal_kernel=1)
    assert _changed_frames(tmm, t=3) == [3]


@pytest.mark.parametrize("blocks,expected", [(1, [2, 3, 4]), (2, [1, 2, 3, 4, 5])])
def test_kt3_receptive_field_grows_one_frame_per_block(blocks: int, expected: list[int]) -> None:
    torch.manual_seed(0)
    tmm = TMM(in_channels=6, out_channels=8, hidden=8, blocks=blocks, temporal_kernel=3)
    assert _changed_frames(tmm, t=3) == expected


# ---------------------------------------------------------------- head and VideoModel


def test_head_shape_and_structure() -> None:
    head = MLPHead(8, num_classes=5, mlp_dim=16)
    assert head(torch.randn(3, 8, 2, 2, 2, generator=_gen())).shape == (3, 5)
    assert head.fc1.bias is None and head.fc2.bias is not None
    assert sum(p.numel() for p in head.parameters()) == 8 * 16 + 2 * 16 + 16 * 5 + 5


def _tiny_cfg(**kw: object) -> ModelConfig:
    tmm = TMMConfig(in_channels=8, hidden=4, out_channels=6, blocks=2, temporal_kernel=3)
    base: dict[str, object] = {"tmm": tmm, "mlp_dim": 16, "num_classes": 3}
    return ModelConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_video_model_shapes_and_registry() -> None:
    assert set(MODELS.names()) == {"avgpool", "tmm"}
    model = build_model(_tiny_cfg())
    x = torch.randn(2, 4, 5, 5, 8, generator=_gen())  # (B, T, H, W, C) store layout
    assert model.forward_features(x).shape == (2, 6, 4, 5, 5)
    assert model(x).shape == (2, 3)
    assert isinstance(model.tmm, TMM) and isinstance(model.head, MLPHead)
    # float16 store features are accepted and cast to the model's dtype
    model.eval()
    torch.testing.assert_close(model(x.half()), model(x.half().float()))
    with pytest.raises(ConfigMismatchError, match="dequantise"):
        model(x.to(torch.int8))
    with pytest.raises(FreezeframeError, match="unknown model.arch"):
        build_model(_tiny_cfg(arch="lstm"))


def test_avgpool_baseline_is_mean_through_head() -> None:
    model = build_model(_tiny_cfg(arch="avgpool"))
    assert isinstance(model.tmm, nn.Identity)
    assert model.head.in_channels == 8
    _randomise_bn(model)
    model.eval()
    x = torch.randn(3, 4, 5, 5, 8, generator=_gen())
    with torch.no_grad():
        expected = model.head.forward_pooled(x.mean(dim=(1, 2, 3)))
        torch.testing.assert_close(model(x), expected)
        torch.testing.assert_close(model.forward_features(x), x.permute(0, 4, 1, 2, 3))


@pytest.mark.parametrize("arch", ["tmm", "avgpool"])
def test_compression_inside_model_equals_pooling_beforehand(arch: str) -> None:
    torch.manual_seed(0)
    pooled = build_model(_tiny_cfg(arch=arch, spatial_pool=2, channel_pool=4))
    plain_cfg = _tiny_cfg(arch=arch)
    plain_cfg.tmm.in_channels = 4
    plain = build_model(plain_cfg)
    _randomise_bn(pooled)
    plain.load_state_dict(pooled.state_dict())  # same shapes: both see 4 channels
    pooled.eval()
    plain.eval()
    x = torch.randn(2, 3, 5, 5, 8, generator=_gen())
    with torch.no_grad():
        assert pooled.forward_features(x).shape[-2:] == (2, 2)
        torch.testing.assert_close(pooled(x), plain(compress(x, 2, 4)))


def test_reset_head_changes_classes_and_keeps_tmm() -> None:
    model = build_model(_tiny_cfg())
    tmm_before = {k: v.clone() for k, v in model.tmm.state_dict().items()}
    old_head = model.head
    model.reset_head(7)
    assert model.head is not old_head and model.num_classes == 7
    assert model.head.in_channels == 6 and model.head.mlp_dim == 16
    for k, v in model.tmm.state_dict().items():
        assert torch.equal(v, tmm_before[k]), k
    assert model(torch.randn(2, 3, 4, 4, 8, generator=_gen())).shape == (2, 7)
    assert any(p is q for p in model.parameters() for q in model.head.parameters())


def test_input_channel_checks() -> None:
    cfg = _tiny_cfg()
    assert expected_in_channels(cfg) == 8
    assert expected_in_channels(_tiny_cfg(channel_pool=4)) == 4
    check_input_channels(cfg, 8)
    with pytest.raises(ConfigMismatchError, match="model.tmm.in_channels=6"):
        check_input_channels(cfg, 6)
    check_input_channels(_tiny_cfg(channel_pool=4), 6)  # store already wider than 4: fine
    with pytest.raises(ConfigMismatchError, match="channel_pool=4"):
        check_input_channels(_tiny_cfg(channel_pool=4), 3)
    model = build_model(cfg)
    with pytest.raises(ConfigMismatchError, match="expects 8 channels"):
        model(torch.randn(2, 3, 4, 4, 6, generator=_gen()))


def test_arch_signature_matches_state_dict_shapes() -> None:
    a, b = _tiny_cfg(), _tiny_cfg(spatial_pool=2)
    assert arch_signature(a) == arch_signature(b)  # spatial pooling changes no shape
    # equal signatures <=> loadable state_dict
    build_model(b).load_state_dict(build_model(a).state_dict())

    c = _tiny_cfg()
    c.tmm.temporal_kernel = 1
    with pytest.raises(ConfigMismatchError, match="tmm.temporal_kernel: checkpoint 3 vs config 1"):
        check_arch_compatible(arch_signature(a), arch_signature(c))
    with pytest.raises(RuntimeError):
        build_model(c).load_state_dict(build_model(a).state_dict())

    finetune = _tiny_cfg(num_classes=10)
    with pytest.raises(ConfigMismatchError, match="num_classes"):
        check_arch_compatible(arch_signature(a), arch_signature(finetune))
    check_arch_compatible(arch_signature(a), arch_signature(finetune), new_head=True)

    avg = arch_signature(_tiny_cfg(arch="avgpool"))
    assert not any(k.startswith("tmm.") for k in avg)
    with pytest.raises(ConfigMismatchError, match="arch"):
        check_arch_compatible(arch_signature(a), avg)


def test_model_config_from_toml_dict() -> None:
    cfg = from_dict(
        ModelConfig,
        {"arch": "avgpool", "channel_pool": 256, "tmm": {"in_channels": 768, "temporal_kernel": 1}},
    )
    assert cfg.tmm.in_channels == 768 and cfg.tmm.temporal_kernel == 1 and cfg.tmm.hidden == 256
    assert expected_in_channels(cfg) == 256
    assert build_model(cfg).head.in_channels == 256
