"""AdViSe's "R3D" temporal modelling module (TMM): a stack of 3-D bottleneck residual blocks.

Each block (PySlowFast ``ResBlock`` + ``BottleneckTransform``, as configured by AdViSe)::

    a: Conv3d C_in -> h, kernel (kt, 1, 1), padding (kt//2, 0, 0) -> BatchNorm3d -> ReLU
    b: Conv3d h -> h,    kernel (1, 3, 3),  padding (0, 1, 1)     -> BatchNorm3d -> ReLU
    c: Conv3d h -> C_out, kernel (1, 1, 1)                       -> BatchNorm3d
    shortcut: Conv3d 1x1x1 C_in -> C_out + BatchNorm3d if C_in != C_out, else identity
    out = ReLU(c + shortcut)

No conv has a bias, every stride is 1 (so T, H, W are preserved), and blocks after the first
take C_out channels. ``temporal_kernel=1`` reproduces the released code (no temporal receptive
field: frames are only mixed by the head's global average); ``temporal_kernel=3`` is the paper's
text (each block sees frames t-1..t+1).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from pipeline.errors import ConfigMismatchError, FreezeframeError

__all__ = ["ModelConfigError", "TMMConfig", "BottleneckBlock", "TMM"]


class ModelConfigError(FreezeframeError, ValueError):
    """A model configuration value is invalid."""


@dataclass
class TMMConfig:
    """Widths and depth of the TMM.

    Attributes:
        in_channels: feature width C of the store (the IFM width, 1280 for MobileNetV2). When
            ``ModelConfig.channel_pool`` is set the TMM sees that many channels instead (see
            ``train.models.expected_in_channels``).
        hidden: bottleneck width h (AdViSe yaml: 256).
        out_channels: C_out (AdViSe yaml: 512; the paper's efficiency tables: 1024).
        blocks: number of bottleneck blocks N (yaml: 4; efficiency tables: 1).
        temporal_kernel: kt of conv a, odd; 1 = released code, 3 = paper's text.
    """

    in_channels: int = 1280
    hidden: int = 256
    out_channels: int = 512
    blocks: int = 1
    temporal_kernel: int = 3


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_temporal_kernel(kt: object) -> int:
    """Return ``kt`` if it is a positive odd integer, else raise ``ModelConfigError``."""
    _positive("model.tmm.temporal_kernel", kt)
    assert isinstance(kt, int)
    if kt % 2 == 0:
        raise ModelConfigError(
            f"model.tmm.temporal_kernel must be odd so that 'same' padding keeps T unchanged, "
            f"got {kt}; use 1 (released AdViSe code) or 3 (paper's text)"
        )
    return kt


class BottleneckBlock(nn.Module):
    """One bottleneck residual block; ``(B, C_in, T, H, W)`` -> ``(B, C_out, T, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, temporal_kernel: int) -> None:
        super().__init__()
        kt = check_temporal_kernel(temporal_kernel)
        self.conv_a = nn.Conv3d(in_channels, hidden, (kt, 1, 1), padding=(kt // 2, 0, 0), bias=False)
        self.bn_a = nn.BatchNorm3d(hidden)
        self.conv_b = nn.Conv3d(hidden, hidden, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn_b = nn.BatchNorm3d(hidden)
        self.conv_c = nn.Conv3d(hidden, out_channels, (1, 1, 1), bias=False)
        self.bn_c = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm3d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn_a(self.conv_a(x)))
        y = self.relu(self.bn_b(self.conv_b(y)))
        y = self.bn_c(self.conv_c(y))
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.relu(y + skip)


class TMM(nn.Module):
    """Stack of ``blocks`` bottleneck blocks; ``(B, C_in, T, H, W)`` -> ``(B, C_out, T, H, W)``.

    Args:
        in_channels: channels of the input map (after any channel pooling).
        out_channels: C_out; ``hidden``: h; ``blocks``: N; ``temporal_kernel``: odd kt.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 512,
        hidden: int = 256,
        blocks: int = 1,
        temporal_kernel: int = 3,
    ) -> None:
        super().__init__()
        _positive("TMM in_channels", in_channels)
        _positive("model.tmm.out_channels", out_channels)
        _positive("model.tmm.hidden", hidden)
        _positive("model.tmm.blocks", blocks)
        check_temporal_kernel(temporal_kernel)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.temporal_kernel = temporal_kernel
        self.blocks = nn.Sequential(
            *[
                BottleneckBlock(in_channels if i == 0 else out_channels, out_channels, hidden, temporal_kernel)
                for i in range(blocks)
            ]
        )

    @classmethod
    def from_config(cls, cfg: TMMConfig, in_channels: int | None = None) -> "TMM":
        """Build from ``cfg``; ``in_channels`` overrides ``cfg.in_channels`` (e.g. after channel pooling)."""
        return cls(
            in_channels=cfg.in_channels if in_channels is None else in_channels,
            out_channels=cfg.out_channels,
            hidden=cfg.hidden,
            blocks=cfg.blocks,
            temporal_kernel=cfg.temporal_kernel,
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ConfigMismatchError(
                f"TMM expects (B, {self.in_channels}, T, H, W) input, got {tuple(x.shape)}"
            )
        return self.blocks(x)
