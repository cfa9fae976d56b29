"""DAVIS J/F, JHMDB PCK and VIP mIoU on hand-made masks whose scores are worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from train.dense.metrics import (
    DenseEvalError,
    PartConfusion,
    boundary_f,
    boundary_radius,
    db_statistics,
    dilate_disk,
    evaluate_sequence,
    pck,
    pck_distances,
    region_iou,
    seg2bmap,
    summarize_davis,
)


def square(h: int, w: int, top: int, left: int, size: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[top : top + size, left : left + size] = True
    return m


def test_region_iou_by_hand():
    gt = square(10, 10, 2, 2, 4)
    pred = square(10, 10, 2, 4, 4)  # 2 columns overlap: 8 / (16 + 16 - 8)
    assert region_iou(gt, pred) == pytest.approx(1 / 3)
    assert region_iou(gt, gt) == 1.0
    empty = np.zeros((10, 10), bool)
    assert region_iou(empty, empty) == 1.0  # object absent from both
    assert region_iou(empty, gt) == 0.0
    assert region_iou(gt, empty) == 0.0


def test_seg2bmap_of_a_square():
    b = seg2bmap(square(10, 10, 2, 2, 4))
    # inside: last row (5) and last column (5) of the square = 7 pixels;
    # outside: row 1 cols 1..5 (their S or SE is inside) + col 1 rows 2..5 (E inside) = 9
    want = np.zeros((10, 10), bool)
    want[5, 2:6] = True
    want[2:6, 5] = True
    want[1, 1:6] = True
    want[2:6, 1] = True
    assert np.array_equal(b, want)
    assert b.sum() == 16
    # borders: the last row / column compare only along the image edge; corner never set
    full = np.ones((4, 4), bool)
    assert not seg2bmap(full).any()


def test_boundary_radius_is_the_official_tolerance():
    assert boundary_radius((480, 854)) == 8  # ceil(0.008 * 979.6)
    assert boundary_radius((480, 880)) == 9  # ceil(0.008 * 1002.4)
    assert boundary_radius((100, 100)) == 2
    assert boundary_radius((100, 100), 3) == 3
    with pytest.raises(ValueError):
        boundary_radius((100, 100), 2.5)


@pytest.mark.parametrize("radius", [1, 2, 3, 5])
def test_dilate_disk_equals_brute_force(radius):
    rng = np.random.default_rng(radius)
    m = rng.random((23, 31)) < 0.04
    m[0, 0] = m[-1, -1] = True  # reaches the image border
    want = np.zeros_like(m)
    ys, xs = np.nonzero(m)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy > radius * radius:
                continue
            y, x = ys + dy, xs + dx
            ok = (y >= 0) & (y < m.shape[0]) & (x >= 0) & (x < m.shape[1])
            want[y[ok], x[ok]] = True
    assert np.array_equal(dilate_disk(m, radius), want)


def test_boundary_f_by_hand():
    gt = square(100, 100, 10, 10, 4)  # radius 2 at 100 x 100
    assert boundary_f(gt, gt) == 1.0
    # a 1-pixel shift stays within the 2-pixel tolerance
    assert boundary_f(gt, square(100, 100, 10, 11, 4)) == 1.0
    # far apart: nothing matches, P = R = 0
    assert boundary_f(gt, square(100, 100, 60, 60, 4)) == 0.0
    # the square plus a far single pixel: 16 matched of 20 predicted boundary pixels
    # (a lone pixel's boundary is itself + its W, N and NW neighbours), recall 1
    pred = gt.copy()
    pred[70, 70] = True
    p, r = 16 / 20, 1.0
    assert boundary_f(gt, pred) == pytest.approx(2 * p * r / (p + r))
    assert region_iou(gt, pred) == pytest.approx(16 / 17)
    empty = np.zeros_like(gt)
    assert boundary_f(empty, empty) == 1.0  # P = R = 1
    assert boundary_f(gt, empty) == 0.0  # P = 1, R = 0
    assert boundary_f(empty, gt) == 0.0  # P = 0, R = 1


def test_db_statistics_by_hand():
    m, rec, decay = db_statistics([1.0, 0.0, 1.0, 0.4])
    assert m == pytest.approx(0.6)
    assert rec == pytest.approx(0.5)
    # bins of 4 frames: ids round(linspace(1, 4, 5)) - 1 = [0, 1, 2, 2, 3]
    # first bin v[0:2] = [1, 0], last v[2:4] = [1, 0.4]
    assert decay == pytest.approx(0.5 - 0.7)
    m, rec, _ = db_statistics([float("nan"), 0.8])
    assert (m, rec) == (pytest.approx(0.8), pytest.approx(0.5))


def _sequence() -> tuple[np.ndarray, np.ndarray]:
    """5 frames 100 x 100, objects 1 and 2; frames 1..3 are scored."""
    gt = np.zeros((5, 100, 100), np.uint8)
    for t in range(5):
        gt[t][square(100, 100, 10, 10 + t, 4)] = 1
    gt[0][square(100, 100, 50, 50, 10)] = 2
    gt[1][square(100, 100, 50, 50, 10)] = 2
    # object 2 leaves the scene in frames 2..4; a void band must count as background
    gt[3, 90:, :] = 255
    pred = gt.copy()
    pred[pred == 255] = 0
    pred[2][square(100, 100, 10, 12, 4)] = 0  # object 1 lost in frame 2
    return gt, pred


def test_evaluate_sequence_by_hand():
    gt, pred = _sequence()
    s = evaluate_sequence("seq", gt, pred[1:-1])
    o1, o2 = s.objects
    assert o1.name == "seq_1" and o2.name == "seq_2"
    assert o1.J == (1.0, 0.0, 1.0)
    assert o1.F == (1.0, 0.0, 1.0)
    # object 2 present in frame 1 only; absent from both masks elsewhere -> 1
    assert o2.J == (1.0, 1.0, 1.0) and o2.F == (1.0, 1.0, 1.0)
    summary = s.summary()
    assert summary["J_mean"] == pytest.approx((2 / 3 + 1) / 2)
    # full-length results give the same scores (frames 0 and T-1 are ignored)
    assert evaluate_sequence("seq", gt, pred).objects == s.objects


def test_evaluate_sequence_object_absent_from_results_and_extra_id():
    gt, pred = _sequence()
    no2 = pred.copy()
    no2[no2 == 2] = 0  # a result that never uses id 2: it is an empty mask
    s = evaluate_sequence("seq", gt, no2)
    assert s.objects[1].J == (0.0, 1.0, 1.0)
    assert s.objects[1].F == (0.0, 1.0, 1.0)
    bad = pred.copy()
    bad[2, 0, 0] = 3
    with pytest.raises(DenseEvalError, match="object id 3"):
        evaluate_sequence("seq", gt, bad)
    with pytest.raises(DenseEvalError, match="shape"):
        evaluate_sequence("seq", gt, pred[:2])


def test_summarize_davis_means_over_objects():
    gt, pred = _sequence()
    a = evaluate_sequence("a", gt, pred)
    gt1 = gt.copy()
    gt1[gt1 == 2] = 0
    b = evaluate_sequence("b", gt1, np.where(gt1 == 255, 0, gt1))  # one object, perfect
    scores = summarize_davis([a, b])
    # objects: a_1 J mean 2/3, a_2 1, b_1 1 -> J_mean = (2/3 + 1 + 1) / 3
    assert scores.J_mean == pytest.approx((2 / 3 + 2) / 3)
    assert scores.F_mean == pytest.approx((2 / 3 + 2) / 3)
    assert scores.JF_mean == pytest.approx((scores.J_mean + scores.F_mean) / 2)
    assert set(scores.per_object) == {"a_1", "a_2", "b_1"}
    assert scores.per_sequence["b"]["JF_mean"] == 1.0
    assert scores.per_sequence["a"]["J_mean"] == pytest.approx((2 / 3 + 1) / 2)
    d = scores.to_json()
    assert {"J_mean", "F_mean", "JF_mean", "per_sequence"} <= set(d)


def test_pck_by_hand():
    gt = np.array(
        [
            [[0, 0], [30, 40]],  # frame 0 is given, not scored
            [[0, 0], [30, 40]],  # box diagonal 50 -> normaliser 0.6 * 50 = 30, threshold 3 px
        ],
        float,
    )
    pred = gt.copy()
    pred[1, 0] += [3.0, 0.0]  # exactly at the threshold: correct
    pred[1, 1] += [0.0, 3.1]  # just past it: wrong
    pred[0] += 100  # frame 0 is ignored
    d = pck_distances(pred, gt)
    assert d.shape == (1, 2)
    assert d[0] == pytest.approx([0.1, 3.1 / 30])
    res = pck([d], alpha=0.1)
    assert res.per_joint == (1.0, 0.0) and res.mean == 0.5
    # pooled per joint over videos, then averaged over joints
    res2 = pck([d, np.array([[0.0, 0.0]])], alpha=0.1)
    assert res2.per_joint == (1.0, 0.5) and res2.mean == 0.75


def test_vip_miou_by_hand():
    conf = PartConfusion(3)
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 2]])
    conf.add(gt, pred)
    # class 0: tp 1, fp 1 (gt 2 -> 0), fn 1 (gt 0 -> 1): 1/3; class 1: tp 2, fp 1: 2/3; class 2: tp 1, fn 1: 1/2
    assert conf.iou() == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert conf.miou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    only = PartConfusion(4)
    only.add(gt, pred)  # class 3 absent everywhere: not averaged
    assert math.isnan(only.iou()[3]) and only.miou() == pytest.approx(conf.miou())
    with pytest.raises(DenseEvalError):
        conf.add(gt, np.full_like(pred, 5))


#: F of :func:`_random_cases` as computed by the official ``davis2017-evaluation`` ``f_measure``
#: (cv2.dilate with skimage's disk), run once outside this repository.
OFFICIAL_F = [
    0.3895649611727125, 0.14184397163120568, 0.04285714285714286, 0.3894543951623683,
    0.08359659781287972, 0.1717557251908397, 0.38634075751310637, 0.11928780389387673,
    0.0, 0.4018555653222714, 0.029895366218236175, 0.1177570093457944,
]


def _random_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs (gt, pred) of random ellipse unions plus sparse noise at DAVIS and odd sizes."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(12):
        h, w = [(480, 854), (120, 200), (37, 53)][i % 3]

        def blob() -> np.ndarray:
            m = np.zeros((h, w), bool)
            for _ in range(rng.integers(0, 4)):
                cy, cx = rng.integers(0, h), rng.integers(0, w)
                ry, rx = rng.integers(1, h // 3 + 2), rng.integers(1, w // 3 + 2)
                yy, xx = np.ogrid[:h, :w]
                m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            m ^= rng.random((h, w)) < 0.002
            return m

        out.append((blob(), blob()))
    return out


def test_boundary_f_matches_the_official_implementation():
    got = [boundary_f(g, p) for g, p in _random_cases()]
    assert got == pytest.approx(OFFICIAL_F, abs=1e-12)
