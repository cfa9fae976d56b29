"""train/represent.py: each metric of the released analysis script on hand-built tokens whose
answer is known in closed form."""
from __future__ import annotations

import math

import pytest
import torch

from train.represent import (
    RELEASED_BATCH,
    RepresentationAccumulator,
    RepresentationError,
    cycle_accuracy,
    effective_rank_from_gram,
    inter_distances,
    inter_positions,
    intra_distance,
    measure,
    video_diameters,
)


def _far_tokens(p: int, d: int) -> torch.Tensor:
    """``p`` tokens 100 apart (scaled basis vectors), ``(p, d)``, p <= d."""
    return 100.0 * torch.eye(d)[:p]


def _drifting_video(t: int = 10) -> torch.Tensor:
    """(T, 2, 2, 8): token k moves by 0.01 (k + 1) per frame inside frames 3..T-4 and by 3.0 on
    every pair that touches the 3 dropped frames at each end."""
    base = _far_tokens(4, 8)
    step_small = torch.tensor([0.01, 0.02, 0.03, 0.04]).unsqueeze(1) * torch.eye(8)[5]  # (4, 8)
    step_big = 3.0 * torch.eye(8)[6].expand(4, 8)
    frames = [base]
    for i in range(t - 1):
        inside = 3 <= i and i + 1 <= t - 4
        frames.append(frames[-1] + (step_small if inside else step_big))
    return torch.stack(frames).reshape(t, 2, 2, 8)


def test_intra_drops_three_edge_frames_and_keeps_the_half_smallest_nn_distances() -> None:
    v = _drifting_video(10)
    # nearest neighbours move by 0.01..0.04; the 2 smallest of 4 are 0.01 and 0.02
    assert intra_distance(v) == pytest.approx(0.015, rel=1e-4)
    assert intra_distance(v[:7]) is None  # T - 6 = 1: skipped as in the script
    assert intra_distance(torch.zeros(8, 2, 2, 3)) == 0.0


def test_video_diameter_is_twice_the_linear_quantile_of_centroid_distances() -> None:
    r = torch.arange(1, 51, dtype=torch.float32)
    pts = torch.cat([r, -r]).unsqueeze(1) * torch.tensor([[0.6, 0.8]])  # centroid 0, distances 1..50 twice
    d = video_diameters(pts.reshape(2, 5, 10, 2))
    assert d[90] == pytest.approx(2 * 45.1, rel=1e-5)  # sorted[89.1] between 45 and 46
    assert d[95] == pytest.approx(2 * 48.0, rel=1e-5)
    assert d[100] == pytest.approx(100.0, rel=1e-6)


def test_inter_distance_of_videos_on_a_line() -> None:
    c = torch.tensor([0.0, 2.0, 0.0])
    sampled = torch.stack([i * c.expand(8, 3) for i in range(3)])  # (3 videos, 8 positions, 3)
    out = inter_distances(sampled)
    assert out["original"] == pytest.approx(8 / 3)  # pairs 2, 4, 2
    # centroid at 2c: 8 tokens at 0, 16 at 2 -> radius 2 for every percentile
    for p in (90, 95, 100):
        assert out[f"normalized_{p}"] == pytest.approx((8 / 3) / 4, rel=1e-6)
    # radius of the closest p%: 10 tokens at distance 1, 10 at distance 5 -> 90%: int(18) -> 5; 50% would be 1
    pts = torch.cat([torch.ones(10, 1, 1), 5 * torch.ones(10, 1, 1)]) * torch.tensor([1.0, 0.0])
    pts[::2] *= -1  # centroid 0
    out = inter_distances(pts)
    assert out["normalized_90"] == pytest.approx(out["original"] / 10, rel=1e-6)
    with pytest.raises(RepresentationError):
        inter_distances(sampled[:1])


def test_inter_positions_are_the_scripts_seeded_randperm() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(42)
        expected = torch.randperm(196)[:8]
    assert torch.equal(inter_positions(196), expected)
    assert torch.equal(inter_positions(4), torch.arange(4))


def test_effective_rank_known_spectra_and_svd_agreement() -> None:
    x = torch.zeros(6, 4)
    x[:4] = torch.eye(4)
    assert effective_rank_from_gram(x.T @ x, 6) == pytest.approx(1.0, rel=1e-9)  # 4 equal singular values
    y = torch.zeros(6, 4)
    y[0, 0], y[1, 1] = 3.0, 1.0
    p = torch.tensor([0.75, 0.25], dtype=torch.float64)
    assert effective_rank_from_gram(y.T @ y, 6) == pytest.approx(float(torch.exp(-(p * p.log()).sum())) / 4, rel=1e-6)
    for rows, d in ((50, 8), (3, 8)):  # tall, and fewer rows than channels
        z = torch.randn(rows, d, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)
        s = torch.linalg.svdvals(z)
        q = s / s.sum() + 1e-12
        ref = float(torch.exp(-(q * q.log()).sum())) / min(rows, d)
        assert effective_rank_from_gram(z.T @ z, rows) == pytest.approx(ref, rel=1e-9)


def test_cycle_accuracy_perfect_and_uniform() -> None:
    tokens = _far_tokens(16, 16).reshape(1, 4, 4, 16)
    assert cycle_accuracy(tokens.expand(40, 4, 4, 16)) == 1.0
    assert cycle_accuracy(torch.ones(40, 4, 4, 16)) == 0.25  # uniform walk: argmax is node 0 of 4
    # B is A with its nodes permuted: the return trip undoes the permutation
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    moving = torch.stack([_far_tokens(16, 16)[perm if t % 2 else torch.arange(16)] for t in range(40)])
    assert cycle_accuracy(moving.reshape(40, 4, 4, 16)) == 1.0


def test_accumulator_end_to_end_and_the_released_batch_mean() -> None:
    acc = RepresentationAccumulator()
    good = _drifting_video(10)
    for _ in range(RELEASED_BATCH):
        acc.add(good)
    acc.add(torch.ones(10, 2, 2, 8))  # a constant video: D_intra 0
    m = acc.result()
    assert m.videos == 33 and m.videos_intra == 33 and m.frames == 330
    js = m.to_json()
    for key in ("d_intra", "d_inter", "ratio", "effective_rank", "cycle_accuracy", "d_intra_norm90",
                "d_inter_norm95", "ratio_norm100"):
        assert key in js
    assert m.d_intra == pytest.approx(32 * 0.015 / 33, rel=1e-4)
    assert js["ratio"] == pytest.approx(m.d_inter / m.d_intra)
    with pytest.raises(RepresentationError, match="same token grid"):
        acc.add(torch.zeros(10, 4, 4, 8))


def test_cycle_accuracy_is_the_mean_of_batch_means_of_32_videos() -> None:
    sharp = _far_tokens(16, 16).reshape(1, 4, 4, 16).expand(10, 4, 4, 16)
    flat = torch.ones(10, 4, 4, 16)
    acc = RepresentationAccumulator()
    for _ in range(RELEASED_BATCH):
        acc.add(sharp)
    acc.add(flat)
    m = acc.result()
    assert m.cycle_accuracy == pytest.approx((1.0 + 0.25) / 2)  # not (32 + 0.25) / 33
    assert m.effective_rank > 0


def test_measure_streams_with_a_transform_and_refuses_too_few_videos() -> None:
    videos = [_drifting_video(10) for _ in range(3)]
    m = measure(iter(videos), total=3, transform=lambda v: 2 * v)
    assert m.d_intra == pytest.approx(0.03, rel=1e-4)  # distances scale with the tokens
    assert m.d_inter == pytest.approx(0.0, abs=1e-6)  # identical videos
    with pytest.raises(RepresentationError, match="at least 2 videos"):
        measure([videos[0]], total=1)
    with pytest.raises(RepresentationError, match="more than 7 frames"):
        measure([v[:5] for v in videos], total=3)


def test_intra_equals_the_scripts_cdist_on_random_tokens() -> None:
    v = torch.randn(12, 5, 5, 32, generator=torch.Generator().manual_seed(3))
    x = v.reshape(12, 25, 32)[3:9]
    ref = []
    for t in range(5):  # the script, one pair at a time, with exact (non-matmul) distances
        d = torch.cdist(x[t:t + 1], x[t + 1:t + 2], compute_mode="donot_use_mm_for_euclid_dist")[0]
        ref.append(torch.topk(d.min(-1).values, 12, largest=False).values.mean())
    assert intra_distance(v) == pytest.approx(float(torch.stack(ref).mean()), rel=1e-5)


def test_measure_store_reads_a_real_store(tmp_path) -> None:
    from pipeline.store import open_store
    from tests.stores import write_synthetic_store
    from train.represent import measure_store

    s = write_synthetic_store(tmp_path / "s.zarr", splits={"train": 5, "test": 2}, lengths=(9, 12), grid=(4, 4),
                              channels=8)
    store = open_store(s.path)
    m = measure_store(store, videos=4, split="train")
    ids = store.split_ids("train")[:4]
    ref = RepresentationAccumulator()
    for v in ids:
        ref.add(torch.from_numpy(store.features(v)))
    assert m.to_json() == ref.result().to_json() and m.videos == 4
    with pytest.raises(RepresentationError, match="at least 2"):
        measure_store(store, videos=1)
