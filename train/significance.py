"""Small-sample statistics: Wilson intervals, exact McNemar / sign tests, bootstrap intervals.

Pure python (``math`` and a seeded ``random.Random``). Accuracies are fractions in [0, 1]; counts are numbers of videos.
Used by the demo report (``docs/demo.md``) and usable on any two runs evaluated on the same
test videos (``eval.json`` holds the per-video predictions).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

__all__ = ["wilson_interval", "McNemar", "mcnemar_exact", "paired_outcomes", "bootstrap_interval",
           "PairedDifference", "paired_difference"]


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a binomial proportion ``correct / n``
    (default z: 95 % two-sided). Unlike the normal approximation it stays inside [0, 1]
    and is not degenerate at 0 or n correct."""
    if n <= 0 or not 0 <= correct <= n:
        raise ValueError(f"need 0 <= correct <= n and n > 0, got correct={correct}, n={n}")
    p = correct / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test of two classifiers on the same items.

    ``only_a``: items A got right and B wrong; ``only_b``: the reverse; ``p_value``: two-sided
    exact binomial p-value of ``min(only_a, only_b)`` under Binomial(only_a + only_b, 1/2)."""

    only_a: int
    only_b: int
    p_value: float


def mcnemar_exact(only_a: int, only_b: int) -> McNemar:
    """Two-sided exact McNemar test from the discordant counts (p = 1 when there are none)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    if n == 0:
        return McNemar(only_a, only_b, 1.0)
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return McNemar(only_a, only_b, min(1.0, 2.0 * tail))


def paired_outcomes(pred_a: Sequence[int], pred_b: Sequence[int], targets: Sequence[int]) -> McNemar:
    """McNemar test of two prediction lists on the same targets (same order)."""
    if not len(pred_a) == len(pred_b) == len(targets):
        raise ValueError(f"paired predictions need equal lengths, got {len(pred_a)}, {len(pred_b)}, {len(targets)}")
    a = [p == t for p, t in zip(pred_a, targets)]
    b = [p == t for p, t in zip(pred_b, targets)]
    return mcnemar_exact(sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b)))


def bootstrap_interval(values: Sequence[float], *, level: float = 0.95, reps: int = 10000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of the mean of ``values`` (items resampled
    with replacement ``reps`` times, seeded). With few items (say n < 10) it is too narrow:
    state n next to it."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("bootstrap_interval needs at least one value")
    if not 0 < level < 1 or reps < 1:
        raise ValueError(f"need 0 < level < 1 and reps >= 1, got level={level}, reps={reps}")
    rng = random.Random(seed)
    n = len(xs)
    means = sorted(sum(rng.choices(xs, k=n)) / n for _ in range(reps))
    lo = means[int(math.floor((1 - level) / 2 * (reps - 1)))]
    hi = means[int(math.ceil((1 + level) / 2 * (reps - 1)))]
    return lo, hi


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` on the same items: mean difference, its bootstrap interval, and the exact sign
    test of wins (a > b) against losses (ties dropped)."""

    n: int
    mean: float
    interval: tuple[float, float]
    wins: int
    losses: int
    ties: int
    p_value: float


def paired_difference(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, reps: int = 10000,
                      seed: int = 0) -> PairedDifference:
    """Compare two scores per item (same order): e.g. J&F of two methods per sequence."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need equal, non-zero lengths, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    wins, losses = sum(x > 0 for x in d), sum(x < 0 for x in d)
    return PairedDifference(len(d), sum(d) / len(d), bootstrap_interval(d, level=level, reps=reps, seed=seed),
                            wins, losses, len(d) - wins - losses, mcnemar_exact(wins, losses).p_value)
