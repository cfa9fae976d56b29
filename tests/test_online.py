"""Online clip streams (train/online.py): the same clips and order as a stored clip set, resume, feed, replay."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.store import open_store
from tests.stores import write_synthetic_store
from train.online import ClipFeed, OnlineClipStream, ReplayBuffer, collate_clips, store_chunks
from train.streams import ClipSampler, ClipSet

LENGTHS = [40, 7, 33, 64, 16, 25, 50]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = write_synthetic_store(tmp_path_factory.mktemp("online") / "s.zarr", splits={"train": len(LENGTHS)},
                               video_lengths=LENGTHS, videos_per_shard=3)
    return open_store(st.path)


def _expected(store, clip, stride, last, streams):
    ids = store.split_ids("train")
    cs = ClipSet.build(ids, [store.num_frames(v) for v in ids], clip, stride, last)
    order = ClipSampler(cs, "sequential", streams=streams).order(0)
    return cs, order


@pytest.mark.parametrize("streams", [1, 2, 3])
@pytest.mark.parametrize("clip,stride,last", [(8, 8, "drop"), (8, 3, "mask"), (16, 24, "mask"), (16, 4, "drop")])
def test_stream_equals_stored_clip_set(store, clip, stride, last, streams) -> None:
    ids = store.split_ids("train")
    cs, order = _expected(store, clip, stride, last, streams)
    got = list(OnlineClipStream(ids, store_chunks(store, chunk=5), clip, stride, last_clip=last, streams=streams))
    assert [(c.video, c.start) for c in got] == [(int(cs.video[k]), int(cs.start[k])) for k in order]
    for c, k in zip(got, order):
        vid = ids[c.video]
        assert np.array_equal(c.features, store.features(vid, cs.indices(k)))
        assert np.array_equal(c.mask, cs.mask(k))
        assert np.array_equal(c.timestamps, store.timestamps(vid)[cs.indices(k)])


@pytest.mark.parametrize("streams", [1, 3])
def test_stream_resumes_after_any_clip(store, streams) -> None:
    ids = store.split_ids("train")
    full = list(OnlineClipStream(ids, store_chunks(store, 6), 8, 5, last_clip="mask", streams=streams))
    for cut in range(0, len(full), 4):
        pos = json.loads(json.dumps(full[cut].after))
        rest = list(OnlineClipStream(ids, store_chunks(store, 6), 8, 5, last_clip="mask", streams=streams, position=pos))
        assert [(c.video, c.start) for c in rest] == [(c.video, c.start) for c in full[cut + 1:]]
        assert all(np.array_equal(a.features, b.features) for a, b in zip(rest, full[cut + 1:]))


def test_feed_batches_in_order_with_a_small_buffer(store) -> None:
    ids = store.split_ids("train")
    ref = list(OnlineClipStream(ids, store_chunks(store), 8, 8, streams=2))
    with ClipFeed(OnlineClipStream(ids, store_chunks(store), 8, 8, streams=2), batch_size=3, buffer=2) as feed:
        batches = list(feed.batches())
        assert feed.frames_per_s > 0
    assert [len(b) for b in batches[:-1]] == [3] * (len(batches) - 1)
    flat = [c for b in batches for c in b]
    assert [(c.video, c.start) for c in flat] == [(c.video, c.start) for c in ref]
    batch = collate_clips(batches[0])
    assert batch["clips"].shape == (3, 8, 2, 2, 16) and batch["video"].tolist() == [c.video for c in batches[0]]


def test_feed_stops_early_and_reraises_reader_errors(store) -> None:
    ids = store.split_ids("train")
    feed = ClipFeed(OnlineClipStream(ids, store_chunks(store), 8, 1), batch_size=2, buffer=1)
    first = next(feed.batches())
    feed.close()  # the reader is blocked on the full FIFO: it must still stop
    assert len(first) == 2 and not feed._thread.is_alive()

    def broken(video_id, skip):
        yield 0, np.zeros((4, 2, 2, 16), np.float32), np.arange(4) / 10
        raise OSError("connection lost")

    with ClipFeed(OnlineClipStream(["x"], broken, 2, 2), batch_size=8) as bad:
        with pytest.raises(OSError, match="connection lost"):
            list(bad.batches())


def test_replay_buffer_is_fifo_seeded_and_restorable(store) -> None:
    ids = store.split_ids("train")
    clips = list(OnlineClipStream(ids, store_chunks(store), 8, 8))
    rb = ReplayBuffer(5, seed=3)
    rb.add(clips[:4])
    rb.add(clips[4:7])
    assert [c.start for c in rb.items] == [c.start for c in clips[2:7]]
    a = [(c.video, c.start) for c in rb.draw(3, step=11)]
    assert len(set(a)) == 3
    state = rb.state_dict()
    torch.save(state, "/dev/null")
    other = ReplayBuffer(5, seed=3)
    other.load_state_dict(state)
    assert [(c.video, c.start) for c in other.draw(3, step=11)] == a
    assert all(np.array_equal(x.features, y.features) for x, y in zip(other.items, rb.items))
