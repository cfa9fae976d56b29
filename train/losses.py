"""Training losses as pure functions on tensors (no modules, no state).

Every task computes its loss with a function from here, so a loss is written and tested once.
Logits are ``(N, K)``; targets ``(N,)`` int64 class indices in ``[0, K)``; losses are scalar
means over ``N``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_entropy", "accuracy"]


def cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy with label smoothing ``eps``, computed in float32.

    Per sample: ``-(1 - eps) * log p[y] - eps / K * sum_k log p[k]`` with ``p = softmax(logits)``
    (torch's definition of label smoothing). ``logits``: ``(N, K)`` any float dtype (cast to
    float32 first, so bf16 autocast logits give a float32 loss); ``targets``: ``(N,)`` int64.
    """
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Fraction of rows whose arg-max is the target: ``(N, K), (N,) -> ()`` float32 in [0, 1]."""
    return (logits.argmax(1) == targets).float().mean()
