"""AdViSe's classification head (PySlowFast ``ResNetBasicHead`` with a 2-layer ``MLPHead``).

``(B, C, T, H, W)`` -> global average over T, H, W -> ``(B, C)`` -> Linear(C, mlp_dim, no bias)
-> BatchNorm1d(mlp_dim) -> ReLU -> Linear(mlp_dim, num_classes) -> logits ``(B, num_classes)``.
Dropout is 0 in the released config, so there is none. The global average is the only place
where frames are combined when the TMM has ``temporal_kernel=1``.

Parameter count: ``C*mlp_dim + 2*mlp_dim + mlp_dim*K + K`` (e.g. 530,436 for C=512, K=4).
"""
from __future__ import annotations

from torch import Tensor, nn

from pipeline.errors import ConfigMismatchError

__all__ = ["MLPHead"]


class MLPHead(nn.Module):
    """Global average pooling + 2-layer MLP with BatchNorm.

    Args:
        in_channels: C of the incoming ``(B, C, T, H, W)`` map.
        num_classes: K, number of logits.
        mlp_dim: hidden width of the MLP (AdViSe ``SSL.MLP_DIM`` = 1024).

    Note: in train mode BatchNorm1d needs B > 1 clips per batch.
    """

    def __init__(self, in_channels: int, num_classes: int, mlp_dim: int = 1024) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.mlp_dim = mlp_dim
        self.fc1 = nn.Linear(in_channels, mlp_dim, bias=False)
        self.bn = nn.BatchNorm1d(mlp_dim)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(mlp_dim, num_classes)

    def forward_pooled(self, z: Tensor) -> Tensor:
        """MLP on already pooled features: ``(B, C)`` -> ``(B, num_classes)``."""
        return self.fc2(self.relu(self.bn(self.fc1(z))))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, T, H, W)`` -> logits ``(B, num_classes)``."""
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ConfigMismatchError(
                f"MLPHead expects (B, {self.in_channels}, T, H, W) input, got {tuple(x.shape)}"
            )
        return self.forward_pooled(x.mean(dim=(2, 3, 4)))
