"""Intervals over videos for the representation metrics (``train.represent``), paired across
representations (raw vs projected tokens of the same videos).

A percentile bootstrap: each resample draws ``N`` of the ``N`` videos with replacement (the
same draw for every representation, so differences are paired) and recomputes every metric
from the per-video parts (:class:`train.represent.PerVideo`):

* ``d_intra`` (and ``d_intra_norm{p}``): the mean of the drawn videos' values;
* ``d_inter`` (and ``d_inter_norm{p}``): the mean over drawn pairs ``i < j`` of the mean
  distance between same-position tokens, leaving out the pairs of a video drawn twice with
  itself (their distance 0 would bias it down by about 1 / N); normalised by ``2 x`` the
  radius of the drawn tokens as in :func:`train.represent.inter_distances`;
* ``ratio`` (``ratio_norm{p}``): their quotient per resample;
* ``cycle_accuracy``: the mean of the drawn videos' accuracies (the plain mean over videos,
  not the released mean of 32-video batch means that the point estimate uses);
* not the effective rank: it depends on the number of *distinct* videos (a resample repeats
  about 37 % of them, so it has fewer distinct rows and a lower rank: the interval would not
  cover the estimate). :func:`split_half_ranks` gives its spread instead: the rank of two
  disjoint random halves of the videos.

Intervals are the 2.5th and 97.5th percentiles (95 %). Sizes: ``N`` videos, ``resamples``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from train.represent import PERCENTILES, PerVideo, effective_rank_from_gram

__all__ = ["Interval", "bootstrap_metrics", "split_half_ranks", "METRIC_KEYS"]

#: the metrics with an interval, in report order
METRIC_KEYS = ("d_intra", "d_inter", "ratio", *(f"{k}_norm{p}" for p in PERCENTILES
                                                  for k in ("d_intra", "d_inter", "ratio")),
               "cycle_accuracy")


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    resamples: int


class _Parts:
    """What a resample needs, precomputed once per representation."""

    def __init__(self, pv: PerVideo) -> None:
        x = pv.sampled.to(torch.float64)  # (N, K, D)
        n, k, _ = x.shape
        total = torch.zeros(n, n, dtype=torch.float64)
        for j in range(k):
            total += torch.cdist(x[:, j], x[:, j])
        self.pair = (total / k).numpy()  # (N, N) mean same-position distance
        self.sampled = x.numpy()
        self.intra = pv.d_intra.numpy()
        self.intra_norm = {p: v.numpy() for p, v in pv.d_intra_normalized.items()}
        self.cycle = pv.cycle_accuracy.numpy()

    def stats(self, idx: np.ndarray) -> dict[str, float]:
        n = len(idx)
        iu = np.triu_indices(n, 1)
        a, b = idx[iu[0]], idx[iu[1]]
        keep = a != b  # a video drawn twice is not a pair of videos
        d_inter = float(self.pair[a[keep], b[keep]].mean())
        flat = self.sampled[idx].reshape(-1, self.sampled.shape[-1])
        r = np.sort(np.linalg.norm(flat - flat.mean(axis=0, keepdims=True), axis=-1))
        d_intra = float(np.nanmean(self.intra[idx]))
        out = {"d_intra": d_intra, "d_inter": d_inter, "ratio": d_inter / d_intra,
               "cycle_accuracy": float(self.cycle[idx].mean())}
        for p in PERCENTILES:
            radius = float(r[-1]) if p == 100 else float(r[: int(len(r) * p / 100.0)].max())
            inter_n = d_inter / (2 * radius + 1e-8)
            intra_n = float(np.nanmean(self.intra_norm[p][idx]))
            out.update({f"d_intra_norm{p}": intra_n, f"d_inter_norm{p}": inter_n, f"ratio_norm{p}": inter_n / intra_n})
        return out


def bootstrap_metrics(per_video: dict[str, PerVideo], resamples: int = 1000,
                      seed: int = 0) -> dict[str, dict[str, Interval]]:
    """95 % percentile intervals of every :data:`METRIC_KEYS` metric per representation, and of
    the paired difference ``b - a`` of every pair of representations (key ``"b - a"``).

    ``per_video``: name -> the same videos' parts in the same order (e.g. ``{"raw": ...,
    "projected": ...}``).
    """
    names = list(per_video)
    ns = {len(pv.cycle_accuracy) for pv in per_video.values()}
    if len(ns) != 1:
        raise ValueError(f"the representations cover different numbers of videos: {sorted(ns)}")
    n = ns.pop()
    if n < 2:
        raise ValueError(f"intervals need at least 2 videos, got {n}")
    parts = {k: _Parts(pv) for k, pv in per_video.items()}
    rng = np.random.default_rng(seed)
    draws: dict[str, dict[str, list[float]]] = {k: {} for k in names}
    for b in range(resamples):
        idx = rng.integers(0, n, size=n)
        for k in names:
            for key, v in parts[k].stats(idx).items():
                draws[k].setdefault(key, []).append(v)
    for i, a in enumerate(names):
        for b_name in names[i + 1:]:
            draws[f"{b_name} - {a}"] = {key: list(np.asarray(draws[b_name][key]) - np.asarray(draws[a][key]))
                                        for key in draws[a]}
    return {k: {key: Interval(float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5)), len(v))
                for key, v in d.items()} for k, d in draws.items()}


def split_half_ranks(pv: PerVideo, seed: int = 0) -> tuple[float, float]:
    """The effective rank (``train.represent.effective_rank_from_gram``) of the middle-frame
    tokens of two disjoint random halves of the videos (``N // 2`` each; ``keep_middle`` needed)."""
    if pv.middle is None:
        raise ValueError("split-half ranks need the middle-frame tokens (RepresentationAccumulator(keep_middle=True))")
    n = pv.middle.shape[0]
    if n < 2:
        raise ValueError(f"split-half ranks need at least 2 videos, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = []
    for half in (order[: n // 2], order[n // 2 : 2 * (n // 2)]):
        x = pv.middle[half].reshape(-1, pv.middle.shape[-1]).to(torch.float64)
        out.append(effective_rank_from_gram(x.T @ x, x.shape[0]))
    return out[0], out[1]
