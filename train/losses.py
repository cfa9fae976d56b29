"""Training losses as pure functions on tensors (no modules, no state).

Every task computes its loss with a function from here, so a loss is written and tested once.
Classification: logits are ``(N, K)``; targets ``(N,)`` int64 class indices in ``[0, K)``;
losses are scalar means over ``N``. Co-Settle (released ``forward_asy_cycle_loss``,
``forward_kl_loss``, ``forward_adapter``; ``docs/cosettle.md``): a view is a token grid
``(B, H, W, D)``; the three views of a sample are stacked ``(B, 3, H, W, D)`` in the order
``[A, B, A']`` (A = frame t1, B = frame t2, A' = the return view of t1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.errors import FreezeframeError
from pipeline.registry import Registry

__all__ = ["cross_entropy", "accuracy", "info_nce", "masked_feature_loss", "distill_kl", "feature_regression",
           "REGRESSION_LOSSES", "CYCLE_EPS", "CosettleLoss", "CosettleLossError", "CycleOutput", "cosettle_loss",
           "cycle_from_nodes", "cycle_loss", "kl_anchor", "kl_anchor_unit", "l2_normalize", "pool_nodes", "stochastic",
           "walk"]


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


# --------------------------------------------------------------------------------------
# Co-Settle: cycle consistency through [A, B, A'] and the KL anchor
# --------------------------------------------------------------------------------------
class CosettleLossError(FreezeframeError, ValueError):
    """The token grids cannot be used by the Co-Settle objective (shape, grid too small)."""


#: ``EPS`` of the released model files: ``log(P + EPS)``
CYCLE_EPS = 1e-6


class _GridPool(torch.autograd.Function):
    """Non-overlapping ``w x w`` average pooling of ``(N, H, W, D)`` grids (D contiguous).

    Forward: the ``w^2`` strided slices summed in place then divided by ``w^2``, the same sum
    order as ``F.avg_pool2d`` on CPU; backward: the incoming node gradients / ``w^2``
    broadcast back to their windows in one copy (zeros on a dropped odd edge). ``avg_pool2d``
    on the permuted channels-last view and its backward cost 2.8x more per step
    (``docs/benchmarks.md``, Co-Settle).
    """

    @staticmethod
    def forward(ctx, x: Tensor, window: int) -> Tensor:  # type: ignore[override]
        n, h, w, d = x.shape
        hh, ww = h // window, w // window
        ctx.shape, ctx.window = (n, h, w, d), window
        grid = x[:, : hh * window, : ww * window]
        out = grid[:, 0::window, 0::window].clone(memory_format=torch.contiguous_format)
        for i in range(window):
            for j in range(window):
                if i or j:
                    out.add_(grid[:, i::window, j::window])
        return out.div_(window * window).view(n, hh * ww, d)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        n, h, w, d = ctx.shape
        k = ctx.window
        hh, ww = h // k, w // k
        gx = (grad / (k * k)).view(n, hh, 1, ww, 1, d).expand(n, hh, k, ww, k, d).reshape(n, hh * k, ww * k, d)
        if hh * k != h or ww * k != w:
            gx = F.pad(gx, (0, 0, 0, w - ww * k, 0, h - hh * k))
        return gx, None


def pool_nodes(x: Tensor, window: int = 2) -> Tensor:
    """``(B, H, W, D)`` -> ``(B, (H // window) * (W // window), D)``: non-overlapping average pooling.

    ``F.avg_pool2d(kernel=stride=window)`` as released: 14 x 14 -> 7 x 7 = 49 nodes; the
    released fallback for other square grids (``S = sqrt(N)``) gives 16 x 16 -> 8 x 8; an odd
    side loses its last row/column (7 x 7 -> 3 x 3), as ``avg_pool2d`` floors. Pooled vectors
    are not re-normalised. Nodes are row-major. Computed on the ``(.., D)``-contiguous layout
    by :class:`_GridPool` (equal to ``avg_pool2d``; tested).
    """
    if x.ndim != 4:
        raise CosettleLossError(f"pool_nodes expects (B, H, W, D) token grids, got {tuple(x.shape)}")
    b, h, w, d = x.shape
    if h < window or w < window:
        raise CosettleLossError(
            f"a {h}x{w} token grid is smaller than the {window}x{window} pooling window; extract at a "
            f"larger image size (or set the pooling window to 1)"
        )
    if window == 1:
        return x.reshape(b, h * w, d)
    return _GridPool.apply(x, window)


class _L2Normalize(torch.autograd.Function):
    """``x / max(||x||_2, eps)`` over the last dim, with the closed-form backward
    ``(g - y <g, y>) / max(||x||, eps)`` (3 passes instead of autograd's ~7 for ``F.normalize``)."""

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(eps)
        y = x / norm
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        y, norm = ctx.saved_tensors
        dot = (grad * y).sum(-1, keepdim=True)
        return torch.addcmul(grad, y, dot, value=-1).div_(norm), None


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``F.normalize(x, p=2, dim=-1, eps=eps)`` (same values; tested with its gradient).

    Without grad: ``x / norm`` with the ``(..., 1)`` norm broadcast, the same quotients as
    ``F.normalize``, whose division by the norm ``expand``-ed to ``x``'s shape costs 2.5x more."""
    if not x.requires_grad:
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(eps)
    return _L2Normalize.apply(x, eps)


def stochastic(x1: Tensor, x2: Tensor, tau: float) -> Tensor:
    """Row-stochastic transition ``(B, n, m)`` = softmax over the target nodes of ``x1 x2^T / tau``.

    ``x1`` ``(B, n, D)``, ``x2`` ``(B, m, D)`` (plain dot products, released ``affinity`` +
    ``stoch_mat``).
    """
    return F.softmax(torch.einsum("bnd,bmd->bnm", x1, x2) / tau, dim=-1)


def walk(nodes: list[Tensor], tau: float) -> Tensor:
    """The chained walk ``P = S(v0 -> v1) S(v1 -> v2) ...`` over consecutive views, ``(B, n, n)``."""
    if len(nodes) < 2:
        raise CosettleLossError("a walk needs at least two views")
    p = stochastic(nodes[0], nodes[1], tau)
    for a, b in zip(nodes[1:-1], nodes[2:]):
        p = p @ stochastic(a, b, tau)
    return p


@dataclass
class CycleOutput:
    """``loss`` scalar; ``acc`` scalar in [0, 1] (argmax of each row is its own node);
    ``cos_identity`` (1,) cosine between the flattened walk matrices and identities (logged
    by the released code, not part of the loss); ``walk`` ``(B, n, n)``."""

    loss: Tensor
    acc: Tensor
    cos_identity: Tensor
    walk: Tensor


def cycle_loss(views: list[Tensor], tau: float = 0.03, window: int = 2, eps: float = CYCLE_EPS) -> CycleOutput:
    """Cycle-consistency loss of the walk through ``views`` back to the first one's nodes.

    Args:
        views: token grids ``(B, H, W, D)``, e.g. ``[A, B, A']`` (projected, L2-normalised).
        tau: softmax temperature (0.03 in ``train.sh``).
        window: pooling window (2, hard-coded in the release).
        eps: added to ``P`` before the log.

    The loss is the released ``CrossEntropyLoss(log(P + eps), identity)``, averaged over batch
    x nodes; note that cross-entropy log-softmaxes its logits, so each term is
    ``-log(P_ii + eps) + log(sum_j (P_ij + eps))`` = ``-log(P_ii + eps) + log(1 + n eps)``.
    """
    return cycle_from_nodes([pool_nodes(v, window) for v in views], tau, eps)


def cycle_from_nodes(nodes: list[Tensor], tau: float = 0.03, eps: float = CYCLE_EPS) -> CycleOutput:
    """:func:`cycle_loss` on already pooled nodes ``(B, n, D)`` per view."""
    p = walk(nodes, tau)
    b, n, _ = p.shape
    logits = torch.log(p + eps).flatten(0, 1)
    targets = torch.arange(n, device=p.device).repeat(b)
    loss = F.cross_entropy(logits, targets)
    acc = (logits.argmax(dim=-1) == targets).float().mean()
    eye = torch.eye(n, device=p.device, dtype=p.dtype).expand(b, n, n)
    cos = F.cosine_similarity(p.flatten().unsqueeze(0), eye.flatten().unsqueeze(0), dim=1)
    return CycleOutput(loss=loss, acc=acc, cos_identity=cos, walk=p)


def kl_anchor(target: Tensor, pred: Tensor) -> Tensor:
    """Channel-softmax KL between frozen ``target`` and projected ``pred`` tokens (scalar).

    ``F.kl_div(log_softmax(pred, -1), softmax(target, -1), reduction="batchmean")``: the sum over
    every token and channel of ``KL(softmax(target) || softmax(pred))``, divided by the batch size
    ``B = target.shape[0]``. Inputs ``(B, ..., D)``, L2-normalised per token in the released use,
    where it is about ``(1 - cos) / D`` per token. Computed as ``sum(t (log t - log q)) / B``
    with ``log t`` and ``log q`` from ``log_softmax`` (one dot product; tested against ``F.kl_div``).
    """
    if target.shape != pred.shape:
        raise CosettleLossError(f"target {tuple(target.shape)} and pred {tuple(pred.shape)} differ")
    log_t = F.log_softmax(target, dim=-1)
    # = F.kl_div(log_softmax(pred), softmax(target), reduction="batchmean"), whose xlogy(t, t) takes a log
    # of every softmax value; here log t comes from log_softmax and the sum is one dot product
    return torch.dot(log_t.exp().flatten(), (log_t - F.log_softmax(pred, dim=-1)).flatten()) / target.shape[0]


class _UnitKL(torch.autograd.Function):
    """:func:`kl_anchor` of L2-normalised tokens ``z`` (constant) and ``p``, in one pass of
    element-wise work per quantity and with a closed-form backward.

    With ``t = softmax(z)``, ``q = softmax(p)`` and ``d = p - z`` per token,
    ``log t - log q = -d + log(sum_c t_c e^{d_c})`` (``sum t = 1``), and because the KL does
    not change when ``d`` is shifted by a per-token constant, shifting by the t-mean
    ``dbar = <t, d>`` gives ``KL(t || q) = log1p(a)``, ``a = <t, u>``, ``u = e^{d - dbar} - 1``:
    no ``log_softmax`` of either side, no difference of two ``~log D`` terms (the released
    formula's float32 cancellation: 1e-3 relative error at cos 0.999, here 1e-5), and the
    gradient ``dKL/dp = q - t = t (u - a) / (1 + a)``. ``|d_c| <= 2`` for unit tokens, so
    ``e^{d - dbar}`` cannot overflow. Forward + backward cost 0.6x ``kl_anchor``'s
    (``docs/benchmarks.md``, Co-Settle).
    """

    @staticmethod
    def forward(ctx, z: Tensor, p: Tensor, batch: int) -> Tensor:  # type: ignore[override]
        t = torch.softmax(z, dim=-1)
        u = torch.sub(p, z)
        w = torch.mul(t, u)
        u.sub_(w.sum(-1, keepdim=True)).exp_().sub_(1.0)  # e^{d - dbar} - 1
        a = torch.mul(t, u, out=w).sum(-1, keepdim=True)  # (..., 1), >= 0 up to rounding (Jensen)
        ctx.save_for_backward(t, u, a)
        ctx.batch = batch
        return torch.log1p(a).sum() / batch

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        t, u, a = ctx.saved_tensors
        return None, torch.sub(u, a).mul_(t).mul_((grad / ctx.batch) / (1 + a)), None


def kl_anchor_unit(target: Tensor, pred: Tensor) -> Tensor:
    """:func:`kl_anchor` for L2-normalised tokens (``(B, ..., D)``, norm <= 1 per token), the
    Co-Settle step's case: same value and gradient (tested in float64 to 1e-10, and against
    float64 in float32: closer than :func:`kl_anchor`), 0.6x the time (:class:`_UnitKL`). A
    ``target`` that requires grad is handed to :func:`kl_anchor`."""
    if target.shape != pred.shape:
        raise CosettleLossError(f"target {tuple(target.shape)} and pred {tuple(pred.shape)} differ")
    if target.requires_grad:
        return kl_anchor(target, pred)
    return _UnitKL.apply(target, pred, target.shape[0])


@dataclass
class CosettleLoss:
    """``loss`` = ``cycle`` + lambda ``kl``; ``acc``/``cos_identity`` as in :class:`CycleOutput`."""

    loss: Tensor
    cycle: Tensor
    kl: Tensor
    acc: Tensor
    cos_identity: Tensor


def cosettle_loss(frozen: Tensor, projected: Tensor, tau: float = 0.03, lam: float = 3.0,
                  window: int = 2) -> CosettleLoss:
    """The full released objective (``forward_adapter``) on stacked views.

    Args:
        frozen: ``(B, V, H, W, D)`` frozen tokens of the views ``[A, B, A']`` (V = 3).
        projected: ``(B, V, H, W, D)`` = g(frozen), before normalisation.
        tau: walk temperature (0.03); lam: weight of the KL anchor (3); window: pooling (2).

    Both are L2-normalised per token; the cycle runs through the V views in order on the
    pooled nodes, the KL anchor compares all V views at full resolution (:func:`kl_anchor_unit`).
    """
    if frozen.ndim != 5 or frozen.shape != projected.shape:
        raise CosettleLossError(
            f"expected frozen and projected (B, V, H, W, D) of equal shape, got {tuple(frozen.shape)} "
            f"and {tuple(projected.shape)}"
        )
    b, v, h, w, d = projected.shape
    z = l2_normalize(frozen)
    p = l2_normalize(projected)
    nodes = pool_nodes(p.reshape(b * v, h, w, d), window)  # all views at once: (B V, n, D)
    cyc = cycle_from_nodes(list(nodes.view(b, v, *nodes.shape[1:]).unbind(1)), tau=tau)
    kl = kl_anchor_unit(z, p)
    return CosettleLoss(loss=cyc.loss + lam * kl, cycle=cyc.loss, kl=kl, acc=cyc.acc,
                        cos_identity=cyc.cos_identity)
