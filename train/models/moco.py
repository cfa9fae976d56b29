"""MoCo pieces on cached features: momentum key encoder, negative queue with video ids, loss.

The query encoder is an ordinary :class:`train.models.VideoModel` whose head is the MoCo v2
projection: ``MLPHead(C_out, proj_dim, mlp_dim=proj_hidden)`` = global average -> Linear(C_out,
2048) -> BatchNorm1d -> ReLU -> Linear(2048, 128). Build it with ``model.mlp_dim = 2048`` and
``model.num_classes = 128``; fine-tuning resets that head exactly as after PRP, and the
checkpoint's keys are a VideoModel's keys.

One update, in the order of the tamaki-lab streaming MoCo (``docs/longform.md``)::

    q = normalize(query(view_q))            (B, D) with gradient
    k = normalize(key(view_k))              (B, D) no gradient, key encoder in train mode
    loss = info_nce(q, k, queue, t, keep)   keep[i, j]: queue entry j is a negative of query i
    optimiser step on the query
    key <- m * key + (1 - m) * query        parameters only; the key's BN statistics are its own
    enqueue (k, video ids)                  FIFO of ``queue_size`` entries; under DDP the keys
                                            and ids of all ranks, gathered in rank order

``keep`` comes from :data:`NEGATIVE_POLICIES`: ``all_past`` (every filled entry) or
``different_video`` (entries of the query's own video are dropped: consecutive clips of one
video are near-duplicates, the main danger of sequential streams). Everything a resumed run
needs (key encoder, queue, video ids, write pointer) is in :meth:`MoCoState.state_dict`.

Under DDP (torchrun) every rank enqueues the keys and video ids of *all* ranks (all_gather, rank
order), as MoCo does, so the queue is the same on every rank and ``different_video`` drops
entries of the query's video whichever rank encoded them. The key encoder's BatchNorm stays
per rank (its running statistics may differ between ranks; in training it uses batch
statistics, and rank 0's copy is the one checkpointed).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import FreezeframeError
from pipeline.registry import Registry
from train.distributed import all_gather_cat
from train.losses import info_nce

__all__ = [
    "MoCoConfig",
    "MOMENTUM_SCHEDULES",
    "NEGATIVE_POLICIES",
    "momentum_at",
    "make_key_encoder",
    "ema_update",
    "NegativeQueue",
    "MoCoState",
]


@dataclass
class MoCoConfig:
    """MoCo options (defaults: MoCo v2 recipe adapted to streams, ``docs/longform.md``).

    Attributes:
        proj_hidden, proj_dim: projection head 2-layer MLP widths (2048 -> 128).
        queue_size: K negatives kept (FIFO).
        momentum: m of the key encoder EMA (base value of the schedule).
        momentum_schedule: "constant" (m) or "cosine" (m -> 1 over the run, MoCo v3).
        temperature: t of InfoNCE.
        negatives: "different_video" or "all_past" (:data:`NEGATIVE_POLICIES`).
    """

    proj_hidden: int = 2048
    proj_dim: int = 128
    queue_size: int = 8192
    momentum: float = 0.999
    momentum_schedule: str = "constant"
    temperature: float = 0.2
    negatives: str = "different_video"

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {self.queue_size}")


# --------------------------------------------------------------------------------------
# momentum
# --------------------------------------------------------------------------------------
MomentumSchedule = Callable[[float, int, int], float]
"""``schedule(base, step, total_steps) -> m`` at 0-based ``step``."""

MOMENTUM_SCHEDULES: Registry[MomentumSchedule] = Registry("momentum schedule")
MOMENTUM_SCHEDULES.add("constant", lambda base, step, total: base)
MOMENTUM_SCHEDULES.add(
    "cosine",  # MoCo v3: m = 1 - (1 - m0) * (cos(pi * k / K) + 1) / 2, from m0 to 1
    lambda base, step, total: 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total) / max(total, 1)) + 1) / 2,
)


def momentum_at(base: float, step: int, total_steps: int, schedule: str = "constant") -> float:
    """Key-encoder momentum at ``step`` of ``total_steps`` (see :data:`MOMENTUM_SCHEDULES`)."""
    return MOMENTUM_SCHEDULES.get(schedule)(base, step, total_steps)


def make_key_encoder(query: nn.Module) -> nn.Module:
    """A copy of ``query`` that never receives gradients (``requires_grad=False``)."""
    key = copy.deepcopy(query)
    for p in key.parameters():
        p.requires_grad_(False)
    return key


@torch.no_grad()
def ema_update(key: nn.Module, query: nn.Module, m: float) -> None:
    """``key_param <- m * key_param + (1 - m) * query_param`` for every parameter (not buffers)."""
    for pk, pq in zip(key.parameters(), query.parameters(), strict=True):
        pk.mul_(m).add_(pq.detach(), alpha=1.0 - m)


# --------------------------------------------------------------------------------------
# the queue
# --------------------------------------------------------------------------------------
NegativePolicy = Callable[[Tensor, Tensor], Tensor]
"""``policy(queue_vids (K,), query_vids (B,)) -> (B, K) bool`` among *filled* entries."""

NEGATIVE_POLICIES: Registry[NegativePolicy] = Registry("MoCo negative policy")
NEGATIVE_POLICIES.add("all_past", lambda qv, v: torch.ones(len(v), len(qv), dtype=torch.bool, device=qv.device))
NEGATIVE_POLICIES.add("different_video", lambda qv, v: qv[None, :] != v[:, None])

EMPTY = -1
"""Video id of a queue slot not written yet."""


class NegativeQueue:
    """FIFO of ``size`` L2-normalised keys (size, dim) with the video id of each (int64).

    Video ids are any non-negative integers that identify a video within the run (the clip
    set's video number, or an online source's running video counter).
    """

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.size, self.dim = size, dim
        self.keys = torch.zeros(size, dim, device=device)
        self.vids = torch.full((size,), EMPTY, dtype=torch.int64, device=device)
        self.ptr = 0

    @torch.no_grad()
    def enqueue(self, keys: Tensor, vids: Tensor) -> None:
        """Write (B, dim) keys and their (B,) video ids over the oldest entries."""
        if self.size == 0:
            return
        keys, vids = keys.detach()[-self.size:], vids.detach()[-self.size:]
        idx = (self.ptr + torch.arange(len(keys), device=self.keys.device)) % self.size
        self.keys[idx] = keys.to(self.keys.dtype)
        self.vids[idx] = vids.to(torch.int64)
        self.ptr = int((self.ptr + len(keys)) % self.size)

    def keep(self, query_vids: Tensor, policy: str) -> Tensor:
        """(B, size) bool: entries that are negatives of each query (filled and allowed)."""
        allowed = NEGATIVE_POLICIES.get(policy)(self.vids, query_vids.to(self.vids.device))
        return allowed & (self.vids != EMPTY)[None, :]

    def state_dict(self) -> dict:
        return {"keys": self.keys.clone(), "vids": self.vids.clone(), "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        if tuple(state["keys"].shape) != (self.size, self.dim):
            raise FreezeframeError(
                f"the checkpoint's MoCo queue is {tuple(state['keys'].shape)} but this run asks "
                f"({self.size}, {self.dim}); resume with the same moco.queue_size and moco.proj_dim"
            )
        self.keys.copy_(state["keys"])
        self.vids.copy_(state["vids"])
        self.ptr = int(state["ptr"])


# --------------------------------------------------------------------------------------
# one object holding the non-trainable state of a MoCo run
# --------------------------------------------------------------------------------------
class MoCoState:
    """Key encoder + queue around a query encoder (the trainable module, held by the trainer).

    Args:
        query: the query encoder, ``(B, ...) -> (B, proj_dim)`` (a VideoModel with the
            projection head). The key encoder starts as its copy.
        cfg: :class:`MoCoConfig`. total_steps: length of the run (for the cosine schedule).
    """

    def __init__(self, query: nn.Module, cfg: MoCoConfig, total_steps: int = 1) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        NEGATIVE_POLICIES.get(cfg.negatives)  # refuse an unknown policy at once
        MOMENTUM_SCHEDULES.get(cfg.momentum_schedule)
        self.key = make_key_encoder(query)
        device = next(query.parameters()).device
        self.queue = NegativeQueue(cfg.queue_size, cfg.proj_dim, device)
        self._pending: tuple[Tensor, Tensor] | None = None

    def to(self, device: torch.device | str) -> "MoCoState":
        """Move the key encoder and the queue to ``device``."""
        self.key.to(device)
        self.queue.keys = self.queue.keys.to(device)
        self.queue.vids = self.queue.vids.to(device)
        return self

    def loss(self, query: nn.Module, view_q: Tensor, view_k: Tensor, vids: Tensor) -> dict[str, Tensor]:
        """InfoNCE of one batch against the current queue; the keys wait for :meth:`after_step`.

        ``view_q``, ``view_k``: two views of the same B clips (any input the encoders take);
        ``vids``: (B,) int64 video ids. Returns ``loss`` plus logged scalars: ``acc`` (the
        positive scores above every kept negative) and ``negatives`` (mean kept per query).
        """
        q = F.normalize(query(view_q).float(), dim=1)
        with torch.no_grad():
            self.key.train(query.training)
            k = F.normalize(self.key(view_k).float(), dim=1)
        keep = self.queue.keep(vids, self.cfg.negatives)
        loss = info_nce(q, k, self.queue.keys, self.cfg.temperature, keep)
        with torch.no_grad():
            pos = (q * k).sum(1)
            neg = (q @ self.queue.keys.t()).masked_fill(~keep, float("-inf"))
            best = neg.max(dim=1).values if neg.shape[1] else torch.full_like(pos, float("-inf"))
            acc = (pos > best).float().mean()
        self._pending = (k.detach(), vids.detach())
        return {"loss": loss, "acc": acc, "negatives": keep.sum(1).float().mean()}

    def after_step(self, query: nn.Module, step: int) -> None:
        """After the optimiser step: EMA of the key encoder, then enqueue this batch's keys
        (under DDP: every rank's keys and video ids, gathered in rank order)."""
        ema_update(self.key, query, momentum_at(self.cfg.momentum, step, self.total_steps, self.cfg.momentum_schedule))
        if self._pending is not None:
            keys, vids = self._pending
            self.queue.enqueue(all_gather_cat(keys), all_gather_cat(vids))
            self._pending = None

    def state_dict(self) -> dict:
        return {"key": self.key.state_dict(), "queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.key.load_state_dict(state["key"])
        self.queue.load_state_dict(state["queue"])
        self._pending = None
