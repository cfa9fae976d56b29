"""Training losses as pure functions on tensors (no modules, no state).

Every task computes its loss with a function from here, so a loss is written and tested once.
Logits are ``(N, K)``; targets ``(N,)`` int64 class indices in ``[0, K)``; losses are scalar
means over ``N``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.registry import Registry

__all__ = ["cross_entropy", "accuracy", "info_nce", "masked_feature_loss", "distill_kl", "feature_regression",
           "REGRESSION_LOSSES"]


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


def info_nce(q: Tensor, k: Tensor, queue: Tensor, temperature: float, keep: Tensor | None = None) -> Tensor:
    """MoCo InfoNCE, mean over the batch.

    For query ``i``: ``-log( exp(q_i.k_i/t) / (exp(q_i.k_i/t) + sum_{j: keep[i,j]} exp(q_i.n_j/t)) )``.

    Args:
        q: (B, D) queries, L2-normalised. k: (B, D) their positive keys, L2-normalised.
        queue: (K, D) negative keys, L2-normalised (K may be 0).
        temperature: t > 0.
        keep: (B, K) bool, which queue entries are negatives of each query (None: all).
            A query with no negative left gets loss 0 from its positive alone (log 1).
    """
    pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    neg = q @ queue.t()  # (B, K)
    if keep is not None:
        neg = neg.masked_fill(~keep, float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / temperature
    return torch.logsumexp(logits, dim=1).sub(logits[:, 0]).mean()


REGRESSION_LOSSES: Registry = Registry("regression loss")
"""``loss(pred, target) -> (N,)`` per-row loss of (N, D) predictions against (N, D) targets."""


@REGRESSION_LOSSES.register("smooth_l1")
def _smooth_l1(pred: Tensor, target: Tensor, beta: float = 1.0) -> Tensor:
    return F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(dim=-1)


@REGRESSION_LOSSES.register("cosine")
def _cosine(pred: Tensor, target: Tensor, beta: float = 1.0) -> Tensor:
    return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-6)


@REGRESSION_LOSSES.register("mse")
def _mse(pred: Tensor, target: Tensor, beta: float = 1.0) -> Tensor:
    return (pred - target).pow(2).mean(dim=-1)


def masked_feature_loss(pred: Tensor, target: Tensor, mask: Tensor, kind: str = "smooth_l1",
                        beta: float = 1.0) -> Tensor:
    """Mean regression loss over masked positions only.

    Args:
        pred, target: (..., D) predictions and (already normalised) targets, same shape.
        mask: (...) bool, True = masked position (the only ones that count).
        kind: a :data:`REGRESSION_LOSSES` name ("smooth_l1", "cosine", "mse").
        beta: Smooth-L1 threshold.
    Raises ValueError if no position is masked (the loss would be undefined).
    """
    if not bool(mask.any()):
        raise ValueError("masked_feature_loss: no masked position (mask ratio too low for the grid)")
    return REGRESSION_LOSSES.get(kind)(pred[mask], target[mask], beta).mean()


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton distillation: ``t^2 * KL(softmax(teacher/t) || softmax(student/t))``, batch mean.

    Shapes (B, K) both. The ``t^2`` keeps gradient magnitudes comparable across temperatures.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * temperature**2


def feature_regression(student: Tensor, teacher: Tensor, kind: str = "cosine", beta: float = 1.0) -> Tensor:
    """Mean regression of (B, D) teacher features by (B, D) student features."""
    return REGRESSION_LOSSES.get(kind)(student, teacher, beta).mean()
