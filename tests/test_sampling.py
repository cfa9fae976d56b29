"""Frame-index samplers (train/sampling.py): exact indices, statistics, policies, seeds."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.config import from_dict
from pipeline.errors import FreezeframeError
from train import sampling as S

CFG = S.PRPConfig()
CLAMP = dataclasses.replace(CFG, short_video="clamp")


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------- config and registry
def test_defaults_match_released_config() -> None:
    assert CFG.rates == (1, 2, 4, 8) == S.RATES
    assert (CFG.jitter, CFG.num_frames, CFG.stride, CFG.clips_per_video) == (0.2, 8, 2, 4)
    assert CFG.short_video == "wrap"
    assert CFG.clip_len == 16 == S.released_min_length(CFG)


def test_policy_registry_and_bad_names() -> None:
    assert S.SHORT_VIDEO_POLICIES.names() == ["clamp", "wrap"]
    with pytest.raises(S.SamplingError, match="clamp"):
        S.PRPConfig(short_video="reflect")
    with pytest.raises(FreezeframeError, match="choose one of: clamp, wrap"):
        S.random_clip(100, _rng(), 8, 2, short_video="reflect")


@pytest.mark.parametrize(
    "kwargs", [{"rates": ()}, {"rates": (1, 0)}, {"jitter": 1.0}, {"jitter": -0.1},
               {"num_frames": 0}, {"stride": 0}, {"clips_per_video": 0}, {"stride": 2.5}],
)
def test_config_refuses_bad_values(kwargs: dict) -> None:
    with pytest.raises(S.SamplingError, match=next(iter(kwargs))):
        S.PRPConfig(**kwargs)


def test_config_loads_from_toml_style_dict() -> None:
    cfg = from_dict(S.PRPConfig, {"rates": [1, 2], "jitter": 0, "short_video": "clamp"})
    assert cfg.rates == (1, 2) and cfg.jitter == 0.0 and cfg.short_video == "clamp"


def test_refuses_empty_video_and_bad_arguments() -> None:
    with pytest.raises(S.SamplingError, match="positive number of stored frames"):
        S.prp_clip(0, _rng(), CFG)
    with pytest.raises(S.SamplingError, match="outside"):
        S.prp_indices(10, 10, 1, 1.0, CFG)
    with pytest.raises(S.SamplingError, match="rate_label"):
        S.prp_clip(100, _rng(), CFG, rate_label=4)
    with pytest.raises(S.SamplingError):
        S.test_clips(100, num_clips=0)


# ---------------------------------------------------------------- exact PRP indices
@pytest.mark.parametrize(
    "rate, j, expected",
    [
        # step = stride*r*j = 2*1*13/16 = 1.625 -> 10, 11.625, 13.25, 14.875, 16.5, 18.125, 19.75, 21.375
        (1, 0.8125, [10, 11, 13, 14, 16, 18, 19, 21]),
        (1, 1.0, [10, 12, 14, 16, 18, 20, 22, 24]),
        # step 2*2*1.125 = 4.5
        (2, 1.125, [10, 14, 19, 23, 28, 32, 37, 41]),
        # step 2*4*0.875 = 7
        (4, 0.875, [10, 17, 24, 31, 38, 45, 52, 59]),
        # step 2*8*1.1875 = 19 -> 10 .. 143, last three exceed 99 and wrap: 105->5, 124->24, 143->43
        (8, 1.1875, [10, 29, 48, 67, 86, 5, 24, 43]),
    ],
)
def test_prp_indices_by_hand_wrap(rate: int, j: float, expected: list[int]) -> None:
    idx = S.prp_indices(100, 10, rate, j, CFG)
    assert idx.dtype == np.int64 and idx.shape == (8,)
    assert idx.tolist() == expected


def test_prp_indices_by_hand_clamp() -> None:
    assert S.prp_indices(100, 10, 8, 1.1875, CLAMP).tolist() == [10, 29, 48, 67, 86, 99, 99, 99]
    # positions inside the video: clamp == wrap exactly
    for rate, j in [(1, 0.8125), (2, 1.125), (4, 0.875)]:
        assert np.array_equal(S.prp_indices(100, 10, rate, j, CLAMP), S.prp_indices(100, 10, rate, j, CFG))


def test_prp_wrap_on_short_video_by_hand() -> None:
    # L=20, start 3, rate 4, j 1: 3, 11, 19, 27, 35, 43, 51, 59 -> mod 20
    assert S.prp_indices(20, 3, 4, 1.0, CFG).tolist() == [3, 11, 19, 7, 15, 3, 11, 19]
    assert S.prp_indices(20, 3, 4, 1.0, CLAMP).tolist() == [3, 11, 19, 19, 19, 19, 19, 19]
    # shorter than clip_len (released code would reject): still indexable with wrap
    assert S.prp_indices(10, 0, 1, 1.0, CFG).tolist() == [0, 2, 4, 6, 8, 0, 2, 4]
    clip = S.prp_clip(10, _rng(3), CFG, rate_label=0)
    assert clip.start == 0 and clip.indices.max() <= 9


def test_prp_positions_match_closed_form() -> None:
    # floor(linspace(s, s + 16 r j, 8, endpoint=False)) == floor(s + 2 r j i) for exact j
    for s in (0, 7, 123):
        for r in CFG.rates:
            for j in (0.8125, 0.875, 1.0, 1.0625, 1.1875):
                want = np.floor(s + 2 * r * j * np.arange(8)).astype(np.int64)
                assert np.array_equal(S.prp_positions(s, r, j, CFG), want)


# ---------------------------------------------------------------- PRP statistics
@pytest.mark.parametrize("label, rate", list(enumerate(S.RATES)))
def test_step_sizes_and_jitter_range(label: int, rate: int) -> None:
    rng = _rng(100 + label)
    # clamp on a long video never clamps (see below), so every step is a pure rate step;
    # under wrap a late start can wrap even here (test_wrap_wraps_fast_clips_even_on_long_videos)
    clips = [S.prp_clip(10_000, rng, CLAMP, rate_label=label) for _ in range(2000)]
    assert all(c.rate_label == label for c in clips)
    j = np.array([c.rate for c in clips]) / rate
    assert j.min() >= 0.8 and j.max() < 1.2
    assert j.min() < 0.81 and j.max() > 1.19  # the whole range is used
    assert abs(j.mean() - 1.0) < 0.01
    # jitter is roughly uniform: each fifth of [0.8, 1.2) holds ~20%
    counts = np.histogram(j, bins=5, range=(0.8, 1.2))[0] / len(j)
    assert np.all(np.abs(counts - 0.2) < 0.04)
    steps = np.concatenate([np.diff(c.indices) for c in clips])
    assert steps.min() >= np.floor(1.6 * rate) and steps.max() <= np.ceil(2.4 * rate)
    # mean step ~ 2r; flooring the last position loses ~0.5 frame over the 7 steps
    assert abs(steps.mean() - (2 * rate - 0.5 / 7)) < 0.02 * rate + 0.01
    # each clip's steps are floor/ceil of its own jittered step 2*r*j
    for c in clips[:200]:
        d = np.diff(c.indices)
        assert d.min() >= np.floor(2 * c.rate) and d.max() <= np.ceil(2 * c.rate)
        assert np.array_equal(c.indices, S.prp_indices(10_000, c.start, rate, c.rate / rate, CLAMP))
        assert np.array_equal(c.indices, S.prp_indices(10_000, c.start, rate, c.rate / rate, CFG))


def test_wrap_start_range_is_released_one() -> None:
    rng = _rng(5)
    starts = np.array([S.prp_clip(40, rng, CFG).start for _ in range(3000)])
    assert starts.min() == 0 and starts.max() == 40 - 16  # [0, L - clip_len], both ends reached
    assert len(np.unique(starts)) == 25


def test_wrap_wraps_fast_clips_even_on_long_videos() -> None:
    # released behaviour: the start ignores the rate, so rate-8 clips starting late wrap
    rng = _rng(6)
    clips = [S.prp_clip(300, rng, CFG, rate_label=3) for _ in range(1000)]
    wrapped = np.mean([np.any(np.diff(c.indices) < 0) for c in clips])
    assert 0.3 < wrapped < 0.5  # ~ (134 - 16) / 285
    assert all(c.indices.max() < 300 and c.indices.min() >= 0 for c in clips)


def test_clamp_short_video_bounded_and_monotone() -> None:
    rng = _rng(7)
    for length in (1, 5, 17, 60, 134):
        for _ in range(300):
            c = S.prp_clip(length, rng, CLAMP)
            assert c.indices.min() >= 0 and c.indices.max() <= length - 1
            assert np.all(np.diff(c.indices) >= 0)
    # a video shorter than a rate-8 span starts at 0 and repeats its last frame
    c = S.prp_clip(60, _rng(8), CLAMP, rate_label=3)
    assert c.start == 0 and c.indices[-1] == 59 and c.indices[-2] == 59


def test_clamp_never_clamps_on_long_video() -> None:
    assert S.min_length_without_wrap(CFG) == 135  # floor(2*8*1.2*7) + 1
    rng = _rng(9)
    for length in (135, 136, 400):
        for _ in range(1000):
            c = S.prp_clip(length, rng, CLAMP)
            raw = S.prp_positions(c.start, S.RATES[c.rate_label], c.rate / S.RATES[c.rate_label], CFG)
            assert np.array_equal(c.indices, raw)  # nothing was clamped
            assert raw[-1] <= length - 1 and np.all(np.diff(c.indices) > 0)
    # clamp start range reaches the last position where a clip still fits
    starts = [S.prp_clip(200, rng, CLAMP, rate_label=0).start for _ in range(3000)]
    assert max(starts) >= 200 - 1 - 17 and max(starts) <= 200 - 1 - 11  # span in [11.2, 16.8]


def test_clips_per_video_are_independent_and_rates_uniform() -> None:
    rng = _rng(11)
    videos = [S.prp_clips(500, rng, CFG) for _ in range(2000)]
    assert all(len(v) == 4 for v in videos)
    labels = np.array([[c.rate_label for c in v] for v in videos])  # (2000, 4)
    starts = np.array([[c.start for c in v] for v in videos])
    freq = np.bincount(labels.ravel(), minlength=4) / labels.size
    assert np.all(np.abs(freq - 0.25) < 0.02)
    # joint label distribution of clip 0 and clip 1 is uniform over the 16 pairs
    joint = np.bincount(labels[:, 0] * 4 + labels[:, 1], minlength=16) / len(labels)
    assert np.all(np.abs(joint - 1 / 16) < 0.025)
    all_same = np.mean(np.all(labels == labels[:, :1], axis=1))
    assert abs(all_same - 1 / 64) < 0.01
    # starts independent across clips and of the rate
    assert abs(np.corrcoef(starts[:, 0], starts[:, 1])[0, 1]) < 0.07
    assert abs(np.corrcoef(starts.ravel(), labels.ravel())[0, 1]) < 0.05
    assert np.mean(starts[:, 0] == starts[:, 1]) < 0.01
    # start uniform on [0, 484]
    assert abs(starts.mean() - 242) < 6


def test_reproducible_from_seed() -> None:
    def draw(seed: int) -> list:
        rng = _rng(seed)
        out = [(c.indices.tolist(), c.rate_label, c.rate, c.start) for c in S.prp_clips(250, rng, CFG)]
        out.append(S.random_clip(250, rng, 8, 4).tolist())
        return out

    assert draw(42) == draw(42)
    assert draw(42) != draw(43)


# ---------------------------------------------------------------- fine-tuning clips
def test_random_clip_fine_tuning() -> None:
    rng = _rng(12)
    clips = np.stack([S.random_clip(50, rng, 8, 4) for _ in range(3000)])
    assert clips.dtype == np.int64 and clips.shape == (3000, 8)
    assert np.all(np.diff(clips, axis=1) == 4)  # exact stride, no jitter
    assert clips[:, 0].min() == 0 and clips[:, 0].max() == 50 - 32  # wrap range [0, L - T*stride]
    assert clips.max() <= 49
    clamp = np.stack([S.random_clip(50, rng, 8, 4, "clamp") for _ in range(3000)])
    assert clamp[:, 0].max() == 50 - 1 - 28 and np.all(np.diff(clamp, axis=1) == 4)


def test_random_clip_short_video_policies() -> None:
    assert S.clip_fits(29, 8, 4) and not S.clip_fits(28, 8, 4)
    # 20 frames < 29: start 0, s + 4i = 0..28
    assert S.random_clip(20, _rng(), 8, 4).tolist() == [0, 4, 8, 12, 16, 0, 4, 8]
    assert S.random_clip(20, _rng(), 8, 4, "clamp").tolist() == [0, 4, 8, 12, 16, 19, 19, 19]
    # exactly fitting video never wraps under either policy
    for policy in ("wrap", "clamp"):
        assert S.random_clip(29, _rng(), 8, 4, policy).tolist() == list(range(0, 29, 4))


# ---------------------------------------------------------------- test views
def test_test_clips_even_and_deterministic() -> None:
    views = S.test_clips(300)
    assert views.shape == (10, 8) and views.dtype == np.int64
    # starts = floor(linspace(0, 300 - 64 - 1, 10)): 235/9 = 26.11 apart
    assert views[:, 0].tolist() == [0, 26, 52, 78, 104, 130, 156, 182, 208, 235]
    assert set(np.diff(views[:, 0]).tolist()) <= {26, 27}
    assert np.all(np.diff(views, axis=1) == 8)
    assert views.max() == 235 + 56 <= 299
    assert np.array_equal(views, S.test_clips(300))
    assert np.array_equal(views, S.test_clips(300, short_video="clamp"))  # fits: same


def test_test_clips_short_video() -> None:
    # 50 frames <= 64: every view starts at 0; 0..56 wraps or clamps
    assert np.all(S.test_clips(50)[:, 0] == 0)
    assert S.test_clips(50)[0].tolist() == [0, 8, 16, 24, 32, 40, 48, 6]
    assert S.test_clips(50, short_video="clamp")[0].tolist() == [0, 8, 16, 24, 32, 40, 48, 49]
    assert S.test_clips(1, num_clips=3, num_frames=4, stride=2).tolist() == [[0, 0, 0, 0]] * 3
    assert S.test_clips(100, num_clips=1, num_frames=4, stride=2).tolist() == [[0, 2, 4, 6]]


def test_test_clips_not_collected_by_pytest() -> None:
    assert getattr(S.test_clips, "__test__", True) is False
