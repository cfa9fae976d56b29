"""Representation metrics of Co-Settle's released analysis script (``cal_metric.py``), on store tokens.

Every metric takes token grids ``(T, H, W, D)`` per video (``P = H * W`` tokens per frame,
frames in stored order); distances are raw Euclidean (no L2 normalisation), as released.

``d_intra`` (``compute_intra_video_metric``)
    per video: drop the first and last 3 frames; for each adjacent pair ``(t, t+1)`` the
    nearest-neighbour distance (``torch.cdist``) of every token of ``t`` among the tokens of
    ``t+1``; the mean of the ``int(0.5 P)`` smallest; mean over pairs. Then mean over videos.
    Videos with ``T - 6 <= 1`` are skipped. Normalised: each video's value divided by its
    diameter ``2 x`` the ``{90, 95, 100}``th percentile (``torch.quantile``, linear) of the
    distances of all ``T P`` tokens to the video's centroid (``+ 1e-8``).
``d_inter`` (``compute_inter_video_metric``)
    the middle frame ``T // 2`` of each video, at 8 token positions ``randperm(P)[:8]`` drawn
    after ``manual_seed(42)`` (all positions when ``P <= 8``); per pair of videos ``i < j`` the
    mean over positions of the distance between tokens at the same position; mean over all
    pairs. Normalised by ``2 x`` the radius around the centroid of all sampled tokens that holds
    the closest ``int(p% x count)`` of them (100: the farthest), ``+ 1e-8``.
``ratio``: ``d_inter / d_intra`` (and the same per normalisation).
``effective_rank`` (``compute_effective_rank``)
    of the middle-frame tokens of all videos stacked ``(N P, D)``: ``exp(H(p))`` with
    ``p = s / sum(s) + 1e-12`` over the singular values, divided by ``min(N P, D)``.
``cycle_accuracy`` (``compute_cycle_accuracy``)
    frames ``(0.25, 0.4), (0.35, 0.5), ... (0.65, 0.8) x T`` (``long``, clamped to ``T - 1``);
    the walk ``A -> B -> A`` (no PEA) on 2 x 2-pooled nodes with unnormalised dot products and
    tau 0.03; accuracy = argmax of ``log(P + 1e-6)`` is the node itself. Averaged like the
    script: the mean over batches of 32 videos (in order) of the per-batch mean.

Deviations from the script are listed in ``docs/cosettle.md`` (patch tokens only, no CLS;
positions drawn from the CPU generator; any ``T``, not only 40 frames).

Cost: one pass over the videos, streaming (the Gram matrix ``D x D`` for the rank, the 8
sampled tokens per video for ``d_inter``); ``d_inter`` is one batched ``cdist`` per position.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.errors import FreezeframeError
from pipeline.store import FeatureStore
from train.losses import CYCLE_EPS, pool_nodes, walk

__all__ = [
    "CYCLE_TIME_PAIRS",
    "PERCENTILES",
    "RELEASED_BATCH",
    "RepresentationError",
    "RepresentationMetrics",
    "PerVideo",
    "RepresentationAccumulator",
    "cycle_accuracy",
    "effective_rank_from_gram",
    "inter_distances",
    "inter_positions",
    "intra_distance",
    "measure",
    "measure_store",
    "video_diameters",
]

PERCENTILES = (90, 95, 100)
CYCLE_TIME_PAIRS = ((0.25, 0.4), (0.35, 0.5), (0.45, 0.6), (0.55, 0.7), (0.65, 0.8))
RELEASED_BATCH = 32  # batch size of the released dataloader; cycle accuracy is a mean of batch means
INTER_POSITIONS = 8
INTER_SEED = 42
EDGE_FRAMES = 3
TAU = 0.03


class RepresentationError(FreezeframeError, ValueError):
    """The tokens cannot be measured (no video long enough, grids of different shapes, ...)."""


def _tokens(video: Tensor) -> Tensor:
    if video.ndim != 4:
        raise RepresentationError(f"expected a (T, H, W, D) token grid per video, got {tuple(video.shape)}")
    t, h, w, d = video.shape
    return video.reshape(t, h * w, d)


def intra_distance(video: Tensor) -> float | None:
    """D_intra of one video ``(T, H, W, D)``; ``None`` when ``T - 6 <= 1`` (the script skips it)."""
    x = _tokens(video)
    t, p, _ = x.shape
    if t - 2 * EDGE_FRAMES <= 1:
        return None
    valid = x[EDGE_FRAMES:t - EDGE_FRAMES]
    a, b = valid[:-1], valid[1:]  # (pairs, P, D)
    # the nearest neighbour by the matrix-product formula |b|^2 - 2 a.b (+ |a|^2, constant per
    # row), as torch.cdist does for P > 25, then its exact distance |a - b_nn|: 2-3x faster than
    # cdist(...).min() and free of the formula's cancellation when tokens are far from the origin
    partial = torch.baddbmm((b * b).sum(-1).unsqueeze(1), a, b.transpose(1, 2), alpha=-2)  # (pairs, P, P)
    nn_idx = partial.argmin(dim=-1)  # (pairs, P)
    nearest = torch.linalg.vector_norm(a - torch.gather(b, 1, nn_idx.unsqueeze(-1).expand_as(a)), dim=-1)
    kept = torch.topk(nearest, int(p * 0.5), dim=-1, largest=False).values
    return float(kept.mean(dim=-1).mean())


def video_diameters(video: Tensor) -> dict[int, float]:
    """``{p: 2 x quantile_p(|token - centroid|)}`` over all ``T P`` tokens of one video."""
    x = _tokens(video).reshape(-1, video.shape[-1])
    r = torch.linalg.vector_norm(x - x.mean(dim=0, keepdim=True), dim=-1)
    return {p: 2 * float(r.max() if p == 100 else torch.quantile(r, p / 100.0)) for p in PERCENTILES}


def inter_positions(num_tokens: int) -> Tensor:
    """The script's 8 token positions: ``randperm(P)[:8]`` after ``manual_seed(42)`` (CPU
    generator); ``arange(P)`` when ``P <= 8``."""
    if num_tokens <= INTER_POSITIONS:
        return torch.arange(num_tokens)
    return torch.randperm(num_tokens, generator=torch.Generator().manual_seed(INTER_SEED))[:INTER_POSITIONS]


def inter_distances(sampled: Tensor) -> dict[str, float]:
    """D_inter from ``(N, K, D)`` sampled middle-frame tokens.

    Returns ``{"original", "normalized_90", "normalized_95", "normalized_100"}``. The pairwise
    distances are computed one position at a time with ``torch.cdist`` in float64
    (``(N, N)`` each), so 1,000 videos take well under a second.
    """
    n, k, d = sampled.shape
    if n < 2:
        raise RepresentationError(f"D_inter needs at least 2 videos, got {n}")
    x = sampled.to(torch.float64)
    total = torch.zeros(n, n, dtype=torch.float64)
    for j in range(k):
        total += torch.cdist(x[:, j], x[:, j], p=2)
    iu = torch.triu_indices(n, n, offset=1)
    original = float((total / k)[iu[0], iu[1]].mean())
    flat = x.reshape(-1, d)
    r = torch.sort(torch.linalg.vector_norm(flat - flat.mean(dim=0, keepdim=True), dim=-1)).values
    out = {"original": original}
    for p in PERCENTILES:
        radius = float(r[-1]) if p == 100 else float(r[: int(len(r) * p / 100.0)].max())
        out[f"normalized_{p}"] = original / (2 * radius + 1e-8)
    return out


def effective_rank_from_gram(gram: Tensor, rows: int) -> float:
    """Effective rank / ``min(rows, D)`` from ``X^T X`` ``(D, D)`` of a ``(rows, D)`` matrix X.

    The singular values of X are the square roots of the Gram eigenvalues (the top
    ``min(rows, D)`` of them), then ``p = s / sum(s) + 1e-12``, ``exp(-sum p log p)``.
    """
    d = gram.shape[0]
    eig = torch.linalg.eigvalsh(gram.to(torch.float64)).clamp_min(0).flip(0)[: min(rows, d)]
    s = eig.sqrt()
    p = s / s.sum() + 1e-12
    return float(torch.exp(-(p * p.log()).sum()) / min(rows, d))


def cycle_accuracy(video: Tensor, tau: float = TAU) -> float:
    """Mean accuracy of the A -> B -> A walk of one video ``(T, H, W, D)`` over the five time pairs."""
    t = video.shape[0]
    idx = (torch.tensor(CYCLE_TIME_PAIRS, dtype=torch.float32) * t).long().clamp(max=t - 1)  # (5, 2)
    a, b = video[idx[:, 0]], video[idx[:, 1]]  # (5, H, W, D)
    nodes_a, nodes_b = pool_nodes(a), pool_nodes(b)
    p = walk([nodes_a, nodes_b, nodes_a], tau)  # (5, n, n)
    logits = torch.log(p + CYCLE_EPS)
    n = p.shape[-1]
    return float((logits.argmax(dim=-1) == torch.arange(n)).float().mean())


@dataclass
class RepresentationMetrics:
    """The measured numbers; :meth:`to_json` gives the ``freezeframe represent --json`` keys."""

    d_intra: float
    d_inter: float
    effective_rank: float
    cycle_accuracy: float
    d_intra_normalized: dict[int, float]
    d_inter_normalized: dict[int, float]
    videos: int
    videos_intra: int
    frames: int
    tokens_per_frame: int
    channels: int

    @property
    def ratio(self) -> float:
        return self.d_inter / self.d_intra if self.d_intra else math.inf

    def to_json(self) -> dict:
        out: dict = {"d_intra": self.d_intra, "d_inter": self.d_inter, "ratio": self.ratio,
                     "effective_rank": self.effective_rank, "cycle_accuracy": self.cycle_accuracy}
        for p in PERCENTILES:
            di, de = self.d_intra_normalized[p], self.d_inter_normalized[p]
            out[f"d_intra_norm{p}"] = di
            out[f"d_inter_norm{p}"] = de
            out[f"ratio_norm{p}"] = de / di if di else math.inf
        out.update(videos=self.videos, videos_intra=self.videos_intra, frames=self.frames,
                   tokens_per_frame=self.tokens_per_frame, channels=self.channels)
        return out


@dataclass
class PerVideo:
    """Per-video parts of the metrics, ``N`` videos in the order added: ``d_intra`` ``(N,)``
    (NaN for videos of 7 frames or fewer) and its normalised variants, the D_inter tokens
    ``sampled`` ``(N, K, D)``, the per-video ``cycle_accuracy`` ``(N,)``, and (with
    ``keep_middle``) the middle-frame tokens ``middle`` ``(N, P, D)`` of the effective rank."""

    d_intra: Tensor
    d_intra_normalized: dict[int, Tensor]
    sampled: Tensor
    cycle_accuracy: Tensor
    middle: Tensor | None


@dataclass
class RepresentationAccumulator:
    """Streams videos ``(T, H, W, D)`` one at a time and keeps only what the metrics need."""

    tau: float = TAU
    _intra: list[float] = field(default_factory=list)
    _intra_norm: dict[int, list[float]] = field(default_factory=lambda: {p: [] for p in PERCENTILES})
    _sampled: list[Tensor] = field(default_factory=list)
    _cycle: list[float] = field(default_factory=list)
    _gram: Tensor | None = None
    _rows: int = 0
    _grid: tuple[int, int, int] | None = None
    _frames: int = 0
    #: keep every video's middle-frame tokens ``(P, D)`` (for :meth:`per_video`; costs P x D floats per video)
    keep_middle: bool = False
    _middle: list[Tensor] = field(default_factory=list)
    _has_intra: list[bool] = field(default_factory=list)

    def add(self, video: Tensor) -> None:
        """Add one video's tokens ``(T, H, W, D)`` (any float dtype; measured in float32)."""
        video = video.to(torch.float32)
        if video.ndim != 4:
            raise RepresentationError(f"expected (T, H, W, D) tokens, got {tuple(video.shape)}")
        grid = tuple(video.shape[1:])
        if self._grid is None:
            self._grid = grid
        elif grid != self._grid:
            raise RepresentationError(f"every video must have the same token grid; got {grid} after {self._grid}")
        self._frames += video.shape[0]
        intra = intra_distance(video)
        self._has_intra.append(intra is not None)
        if intra is not None:
            self._intra.append(intra)
            for p, diameter in video_diameters(video).items():
                self._intra_norm[p].append(intra / (diameter + 1e-8))
        tokens = _tokens(video)
        mid = tokens[video.shape[0] // 2]  # (P, D)
        self._sampled.append(mid[inter_positions(mid.shape[0])])
        gram = (mid.T @ mid).to(torch.float64)  # float32 product, float64 sum over videos
        self._gram = gram if self._gram is None else self._gram + gram
        self._rows += mid.shape[0]
        self._cycle.append(cycle_accuracy(video, self.tau))
        if self.keep_middle:
            self._middle.append(mid.clone())

    def per_video(self) -> "PerVideo":
        """What each added video contributed, in order (for intervals over videos)."""
        n = len(self._sampled)
        intra = torch.full((n,), math.nan, dtype=torch.float64)
        norm = {p: torch.full((n,), math.nan, dtype=torch.float64) for p in PERCENTILES}
        rows = torch.tensor(self._has_intra, dtype=torch.bool)
        intra[rows] = torch.tensor(self._intra, dtype=torch.float64)
        for p in PERCENTILES:
            norm[p][rows] = torch.tensor(self._intra_norm[p], dtype=torch.float64)
        return PerVideo(d_intra=intra, d_intra_normalized=norm, sampled=torch.stack(self._sampled),
                        cycle_accuracy=torch.tensor(self._cycle, dtype=torch.float64),
                        middle=torch.stack(self._middle) if self._middle else None)

    def result(self) -> RepresentationMetrics:
        n = len(self._sampled)
        if n < 2:
            raise RepresentationError(f"need at least 2 videos to measure, got {n}")
        if not self._intra:
            raise RepresentationError("no video has more than 7 frames, so D_intra (frames 3..T-4) is undefined")
        inter = inter_distances(torch.stack(self._sampled))
        batches = [self._cycle[i:i + RELEASED_BATCH] for i in range(0, n, RELEASED_BATCH)]
        h, w, d = self._grid
        return RepresentationMetrics(
            d_intra=sum(self._intra) / len(self._intra),
            d_inter=inter["original"],
            effective_rank=effective_rank_from_gram(self._gram, self._rows),
            cycle_accuracy=sum(sum(b) / len(b) for b in batches) / len(batches),
            d_intra_normalized={p: sum(v) / len(v) for p, v in self._intra_norm.items()},
            d_inter_normalized={p: inter[f"normalized_{p}"] for p in PERCENTILES},
            videos=n, videos_intra=len(self._intra), frames=self._frames, tokens_per_frame=h * w, channels=d,
        )


def measure(videos: Iterable[Tensor], total: int | None = None,
            transform: Callable[[Tensor], Tensor] | None = None, console=None,
            description: str = "measuring", accumulator: RepresentationAccumulator | None = None
            ) -> RepresentationMetrics:
    """All metrics over ``videos`` (an iterable of ``(T, H, W, D)`` tensors).

    ``transform`` (e.g. a trained projection g, run under ``no_grad``) is applied to each
    video's tokens first. Progress is shown with rich on ``console`` (stderr when None).
    ``accumulator``: a fresh one to fill (e.g. ``keep_middle=True``, then ``per_video()``).
    """
    from rich.console import Console  # lazy: rich is only needed when measuring
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    acc = accumulator if accumulator is not None else RepresentationAccumulator()
    con = console or Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=con, transient=True) as bar:
        task = bar.add_task(description, total=total)
        with torch.no_grad():
            for video in videos:
                acc.add(transform(video) if transform is not None else video)
                bar.advance(task)
    return acc.result()


def store_videos(store: FeatureStore, videos: int | None = None, split: str | None = None) -> list[str]:
    """The first ``videos`` video ids of ``split`` (all splits when None), in store order."""
    ids = store.split_ids(split) if split else store.video_ids
    if split and not ids:
        raise RepresentationError(f"split {split!r} of {store.path} has no videos (splits: {store.splits()})")
    if videos is not None:
        if videos < 2:
            raise RepresentationError(f"--videos must be at least 2 (D_inter compares pairs), got {videos}")
        ids = ids[:videos]
    return ids


def measure_store(store: FeatureStore, videos: int | None = None, split: str | None = None,
                  transform: Callable[[Tensor], Tensor] | None = None, console=None,
                  accumulator: RepresentationAccumulator | None = None) -> RepresentationMetrics:
    """:func:`measure` over the stored tokens of :func:`store_videos` (read one video at a time)."""
    ids = store_videos(store, videos, split)
    stream = (torch.from_numpy(store.features(v)) for v in ids)
    return measure(stream, total=len(ids), transform=transform, console=console,
                   description=f"measuring {len(ids)} videos of {store.path.name}", accumulator=accumulator)
