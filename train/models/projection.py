"""Co-Settle's projection g ("adapter", released ``ST_adapter.py``): a per-token head on frozen tokens.

``(..., D)`` -> ``(..., D)``, applied to every patch token independently (no spatial or
temporal mixing), so it runs on cached store tokens ``(B, T, H, W, D)`` exactly as on the
encoder's output.

========  ==================================================
arch      layers
========  ==================================================
linear    Linear(D, D) -> Tanh -> LayerNorm(D)   (every released run)
mlp2      Linear(D, D) -> Tanh -> Linear(D, D) -> LayerNorm(D)
========  ==================================================

Initialisation follows the released code, where the adapter takes whatever init the host
model's constructor applies (``docs/cosettle.md``): MAE / MoCo v3 ``xavier_uniform`` (bias 0),
DINO-family ``trunc_normal(std=0.02)`` (bias 0), CLIP PyTorch's default ``nn.Linear`` init;
LayerNorm weight 1, bias 0. :data:`BACKBONE_INIT` maps our backbone names to those schemes.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from pipeline.errors import ConfigMismatchError
from pipeline.registry import Registry

__all__ = [
    "BACKBONE_INIT",
    "FastTanh",
    "LINEAR_INITS",
    "PROJECTION_ARCHS",
    "Projection",
    "ProjectionConfig",
    "init_for_backbone",
]

#: name -> in-place init of one nn.Linear (weight and bias)
LINEAR_INITS: Registry[Callable[[nn.Linear], None]] = Registry("projection init")


@LINEAR_INITS.register("xavier_uniform")
def _xavier(layer: nn.Linear) -> None:
    """MAE ``_init_weights`` (``models_mae.py`` L98-108), MoCo v3: xavier_uniform, bias 0."""
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)


@LINEAR_INITS.register("trunc_normal")
def _trunc_normal(layer: nn.Linear) -> None:
    """DINO / iBOT / BLIP / I-JEPA / DINOv2 ``_init_weights``: trunc_normal(std 0.02), bias 0.

    timm's ``trunc_normal_`` truncates at +-2 (absolute, i.e. +-100 std), as the DINO code does.
    """
    nn.init.trunc_normal_(layer.weight, std=0.02, a=-2.0, b=2.0)
    nn.init.zeros_(layer.bias)


@LINEAR_INITS.register("torch_default")
def _torch_default(layer: nn.Linear) -> None:
    """CLIP: ``initialize_parameters`` never touches the adapter, so nn.Linear's own init stays."""
    layer.reset_parameters()


#: our backbone names -> the released init of the same family. MobileNetV2 has no released
#: counterpart; it gets PyTorch's default (documented in docs/cosettle.md).
BACKBONE_INIT: dict[str, str] = {
    "clip-vit-b16": "torch_default",
    "clip-vit-l14": "torch_default",
    "dinov2-vits14": "trunc_normal",
    "dinov2-vitb14": "trunc_normal",
    "dinov2-vits14-reg": "trunc_normal",
    "mae-vitb16": "xavier_uniform",
    "mobilenetv2-imagenet": "torch_default",
}


def init_for_backbone(backbone: str) -> str:
    """The init scheme name for a store's backbone (``torch_default`` for unknown names)."""
    return BACKBONE_INIT.get(backbone, "torch_default")


class _SigmoidTanh(torch.autograd.Function):
    """``tanh(x) = 2 sigmoid(2x) - 1`` forward, ``grad (1 - y^2)`` backward (``tanh_backward``).

    torch's CPU ``tanh`` kernel costs 6x its ``sigmoid`` (9.5 vs 1.5 ms on the 3.6 M values of
    a Co-Settle step, ``docs/benchmarks.md``); this form costs 2.5x less. It differs from
    ``torch.tanh`` by at most 2 float32 ulps of 1 (2.4e-7 absolute; tested), the rounding of
    ``2 s - 1``; in float64 by 4e-16.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        y = torch.mul(x, 2.0).sigmoid_().mul_(2.0).sub_(1.0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


class FastTanh(nn.Module):
    """``nn.Tanh`` computed as ``2 sigmoid(2x) - 1`` (:class:`_SigmoidTanh`); no parameters, so
    a state dict saved with ``nn.Tanh`` loads unchanged."""

    def forward(self, x: Tensor) -> Tensor:
        return _SigmoidTanh.apply(x)


@dataclass
class ProjectionConfig:
    """``arch``: ``linear`` | ``mlp2``; ``init``: a :data:`LINEAR_INITS` name, or ``auto`` =
    :func:`init_for_backbone` of the store's backbone."""

    arch: str = "linear"
    init: str = "auto"


PROJECTION_ARCHS: Registry[int] = Registry("projection arch")  # name -> number of Linear layers
PROJECTION_ARCHS.add("linear", 1)
PROJECTION_ARCHS.add("mlp2", 2)


class Projection(nn.Module):
    """g: ``(..., D)`` -> ``(..., D)``; Linear -> Tanh [-> Linear] -> LayerNorm, per token.

    Args:
        dim: D, the token width (768 for ViT-B).
        arch: ``linear`` or ``mlp2``.
        init: a :data:`LINEAR_INITS` name (not ``auto``: resolve it with :func:`init_for_backbone`).
        generator: optional seeded RNG for the init (the global RNG is used when None).
    """

    def __init__(self, dim: int, arch: str = "linear", init: str = "torch_default",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        n_linear = PROJECTION_ARCHS.get(arch)
        init_fn = LINEAR_INITS.get(init)
        self.dim, self.arch, self.init = int(dim), arch, init
        with _seeded(generator):  # nn.Linear draws a default init when built: keep it off the global RNG too
            self.linears = nn.ModuleList(nn.Linear(dim, dim, bias=True) for _ in range(n_linear))
            for layer in self.linears:
                init_fn(layer)
        self.act = FastTanh()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., D)`` -> ``(..., D)`` (LayerNormed, not L2-normalised)."""
        if x.shape[-1] != self.dim:
            raise ConfigMismatchError(
                f"the projection was built for D={self.dim} channels but the tokens have {x.shape[-1]}; "
                f"use a projection trained on a store of the same backbone"
            )
        x = self.act(self.linears[0](x))
        for layer in self.linears[1:]:
            x = layer(x)
        return self.norm(x)


@contextmanager
def _seeded(generator: torch.Generator | None) -> Iterator[None]:
    """Run a block with torch's default RNG seeded from ``generator`` (restored afterwards).

    ``reset_parameters`` takes no generator, so the default RNG is forked instead."""
    if generator is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        yield
