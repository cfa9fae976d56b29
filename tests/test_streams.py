"""Clip streams over long videos (train/streams.py): clip sets, orders, resume, seconds."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import ConfigMismatchError
from pipeline.store import open_store
from tests.stores import write_synthetic_store
from train.streams import (
    ClipSampler,
    ClipSet,
    StreamConfig,
    StreamError,
    clip_set_from_store,
    frame_period,
)

LENGTHS = [40, 7, 33, 64, 16, 25]


def _direct_starts(length: int, clip: int, stride: int) -> list[int]:
    """The paper's definition: clip j covers frames j*s .. j*s+T-1 while inside the video."""
    return [j * stride for j in range(length) if j * stride + clip <= length]


@pytest.mark.parametrize("stride", [1, 4, 8, 16, 24, 32])
@pytest.mark.parametrize("clip", [8, 16])
def test_drop_clip_set_matches_definition(clip: int, stride: int) -> None:
    cs = ClipSet.build([f"v{i}" for i in range(len(LENGTHS))], LENGTHS, clip, stride, "drop")
    for number, length in enumerate(LENGTHS):
        ids = cs.clips_of(number)
        assert cs.start[ids].tolist() == _direct_starts(length, clip, stride)
        for k in ids:
            assert cs.indices(k).tolist() == list(range(cs.start[k], cs.start[k] + clip))
            assert cs.mask(k).all()
    assert len(cs) == sum(len(_direct_starts(n, clip, stride)) for n in LENGTHS)


def test_mask_policy_adds_the_partial_last_clip() -> None:
    cs = ClipSet.build(["a", "b", "c"], [40, 7, 32], 16, 16, "mask")
    a, b, c = (cs.clips_of(i) for i in range(3))
    assert cs.start[a].tolist() == [0, 16, 32] and cs.valid[a].tolist() == [16, 16, 8]
    assert cs.indices(a[-1]).tolist() == list(range(32, 40)) + [39] * 8
    assert cs.mask(a[-1]).tolist() == [True] * 8 + [False] * 8
    # shorter than a clip: one partial clip from frame 0
    assert cs.start[b].tolist() == [0] and cs.valid[b].tolist() == [7]
    # an exact multiple: no partial clip
    assert cs.start[c].tolist() == [0, 16] and cs.valid[c].tolist() == [16, 16]
    drop = ClipSet.build(["a", "b", "c"], [40, 7, 32], 16, 16, "drop")
    assert drop.start.tolist() == [0, 16, 0, 16]


def test_mask_policy_covers_every_frame_when_stride_le_clip() -> None:
    for stride in (3, 5, 8):
        cs = ClipSet.build(["a"], [41], 8, stride, "mask")
        seen = set()
        for k in range(len(cs)):
            seen.update(cs.indices(k)[cs.mask(k)].tolist())
        assert seen == set(range(41))


def test_sequential_single_stream_is_time_order_video_by_video() -> None:
    cs = ClipSet.build([f"v{i}" for i in range(len(LENGTHS))], LENGTHS, 8, 4)
    order = ClipSampler(cs, "sequential").order(0)
    pairs = list(zip(cs.video[order].tolist(), cs.start[order].tolist()))
    assert pairs == sorted(pairs)
    assert np.array_equal(order, ClipSampler(cs, "sequential").order(5))  # same every pass


def test_round_robin_small_example() -> None:
    # v0: 3 clips (0,1,2), v1: 1 clip (3), v2: 2 clips (4,5); B = 2
    cs = ClipSet.build(["v0", "v1", "v2"], [12, 4, 8], 4, 4)
    assert cs.video.tolist() == [0, 0, 0, 1, 2, 2]
    order = ClipSampler(cs, "sequential", streams=2).order(0)
    assert order.tolist() == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize("streams", [2, 3, 4, 8])
@pytest.mark.parametrize("stride", [4, 16])
def test_round_robin_properties(streams: int, stride: int) -> None:
    lengths = [40, 70, 33, 64, 16, 25, 90, 48, 52]
    cs = ClipSet.build([f"v{i}" for i in range(len(lengths))], lengths, 16, stride)
    order = ClipSampler(cs, "sequential", streams=streams).order(0)
    assert sorted(order.tolist()) == list(range(len(cs)))  # every clip once
    for number in range(len(lengths)):  # each video in time order
        starts = [int(cs.start[k]) for k in order if cs.video[k] == number]
        assert starts == sorted(starts)
    # while all B streams are busy, each group of B clips comes from B different videos
    first = order[:streams]
    assert len(set(cs.video[first].tolist())) == streams
    # videos are started in store order
    firsts = [int(cs.video[k]) for i, k in enumerate(order) if cs.video[k] not in cs.video[order[:i]]]
    assert firsts == sorted(firsts)


def test_random_order_is_a_seeded_permutation_per_pass() -> None:
    cs = ClipSet.build([f"v{i}" for i in range(len(LENGTHS))], LENGTHS, 8, 4)
    s = ClipSampler(cs, "random", seed=3)
    o0, o1 = s.order(0), s.order(1)
    assert sorted(o0.tolist()) == list(range(len(cs))) and sorted(o1.tolist()) == list(range(len(cs)))
    assert not np.array_equal(o0, o1)
    assert np.array_equal(o0, ClipSampler(cs, "random", seed=3).order(0))
    assert not np.array_equal(o0, ClipSampler(cs, "random", seed=4).order(0))
    # shuffled across videos: neighbours often belong to different videos
    assert np.mean(cs.video[o0][1:] != cs.video[o0][:-1]) > 0.5
    with pytest.raises(StreamError, match="sequential order only"):
        ClipSampler(cs, "random", streams=2)


@pytest.mark.parametrize("order,streams", [("sequential", 1), ("sequential", 3), ("random", 1)])
@pytest.mark.parametrize("cut", [0, 1, 17, 40])
def test_resume_mid_stream_continues_exactly(order: str, streams: int, cut: int) -> None:
    cs = ClipSet.build([f"v{i}" for i in range(len(LENGTHS))], LENGTHS, 8, 4, "mask")
    ref = ClipSampler(cs, order, streams=streams, seed=7)
    full: list[int] = []
    for _ in range(2):  # two passes, uninterrupted
        full += list(ref)
        ref.next_pass()
    s = ClipSampler(cs, order, streams=streams, seed=7)
    got: list[int] = []
    got += s.take(cut).tolist()
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
    fresh = ClipSampler(cs, order, streams=streams, seed=7)
    fresh.load_state_dict(state)
    got += list(fresh)
    fresh.next_pass()
    got += fresh.take(5).tolist()
    state = fresh.state_dict()
    again = ClipSampler(cs, order, streams=streams, seed=7)
    again.load_state_dict(state)
    got += list(again)
    assert got == full


def test_resume_refuses_another_clip_set() -> None:
    cs = ClipSet.build(["a", "b"], [40, 50], 8, 4)
    state = ClipSampler(cs).state_dict()
    other = ClipSampler(ClipSet.build(["a", "b"], [40, 50], 8, 8))
    with pytest.raises(ConfigMismatchError, match="clip_set"):
        other.load_state_dict(state)
    with pytest.raises(ConfigMismatchError, match="streams"):
        ClipSampler(cs, streams=2).load_state_dict(state)


def test_bad_geometry_is_refused() -> None:
    with pytest.raises(StreamError, match="stride_frames"):
        ClipSet.build(["a"], [10], 4, 0)
    with pytest.raises(Exception, match="unknown last-clip policy"):
        ClipSet.build(["a"], [10], 4, 2, "pad")


def test_seconds_from_store_timestamps(tmp_path) -> None:
    # tests.stores writes frame k at k / 10 s (10 fps)
    st = write_synthetic_store(tmp_path / "s.zarr", splits={"train": 3}, video_lengths=[50, 41, 64])
    store = open_store(st.path)
    cs = clip_set_from_store(store, "train", StreamConfig(clip_seconds=1.6, stride_seconds=0.8))
    assert (cs.clip_frames, cs.stride_frames) == (16, 8)
    frames = clip_set_from_store(store, "train", StreamConfig(clip_frames=16, stride_frames=8))
    assert np.array_equal(cs.start, frames.start) and cs.fingerprint() == frames.fingerprint()
    with pytest.raises(StreamError, match="no clip of 80 frames"):
        clip_set_from_store(store, "train", StreamConfig(clip_seconds=8.0))


def test_frame_period_refuses_mixed_rates() -> None:
    assert frame_period([np.arange(10) / 25.0, np.arange(5) / 25.0]) == pytest.approx(0.04)
    with pytest.raises(StreamError, match="different frame periods"):
        frame_period([np.arange(10) / 25.0, np.arange(10) / 30.0])
