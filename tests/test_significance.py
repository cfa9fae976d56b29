"""train/significance.py against values computed by hand / known references."""
from __future__ import annotations

import math

import pytest

from train.significance import mcnemar_exact, paired_outcomes, wilson_interval


def test_wilson_interval_known_values() -> None:
    # Wilson 95 % for 24/96 (chance on the demo's motion test), by hand: [0.1741, 0.3451]
    lo, hi = wilson_interval(24, 96)
    assert lo == pytest.approx(0.1741, abs=2e-4) and hi == pytest.approx(0.3451, abs=2e-4)
    # the textbook case 0/10: [0, 0.2775], and n/n mirrors it
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 0.27753, abs=1e-4)
    # it narrows with n
    assert wilson_interval(48, 96)[1] - wilson_interval(48, 96)[0] < wilson_interval(4, 8)[1] - wilson_interval(4, 8)[0]
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def test_mcnemar_exact_by_hand() -> None:
    # 0 vs 6 discordant: p = 2 * 0.5**6 = 0.03125
    assert mcnemar_exact(0, 6).p_value == pytest.approx(0.03125)
    # 2 vs 8: 2 * (C(10,0)+C(10,1)+C(10,2)) / 2**10 = 2 * 56 / 1024
    assert mcnemar_exact(8, 2).p_value == pytest.approx(112 / 1024)
    assert mcnemar_exact(3, 3).p_value == 1.0 and mcnemar_exact(0, 0).p_value == 1.0
    r = paired_outcomes([0, 1, 2, 3, 0], [0, 0, 0, 3, 1], [0, 1, 2, 3, 1])
    assert (r.only_a, r.only_b) == (2, 1) and r.p_value == pytest.approx(1.0)
    assert math.isclose(mcnemar_exact(1, 12).p_value, 2 * 14 / 2 ** 13)


def test_bootstrap_interval_of_the_mean():
    from train.significance import bootstrap_interval

    assert bootstrap_interval([0.5] * 7) == (0.5, 0.5)  # no spread, no width
    xs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    lo, hi = bootstrap_interval(xs, reps=4000, seed=1)
    # normal approximation: mean 0.55, SE = sd_pop / sqrt(n) = 0.2872 / 3.162 = 0.0908 -> +/- 0.178
    assert lo < 0.55 < hi and abs((hi - lo) - 2 * 1.96 * 0.0908) < 0.05
    assert bootstrap_interval(xs, reps=4000, seed=1) == (lo, hi)  # seeded
    with pytest.raises(ValueError):
        bootstrap_interval([])


def test_paired_difference_counts_wins_and_signs():
    from train.significance import paired_difference

    d = paired_difference([0.9, 0.8, 0.7, 0.5, 0.6], [0.5, 0.5, 0.5, 0.5, 0.7])
    assert (d.n, d.wins, d.losses, d.ties) == (5, 3, 1, 1)
    assert d.mean == pytest.approx((0.4 + 0.3 + 0.2 + 0 - 0.1) / 5)
    assert d.p_value == pytest.approx(2 * 5 / 16)  # exact sign test: 2 * P(Bin(4, 1/2) <= 1)
    assert d.interval[0] <= d.mean <= d.interval[1]
