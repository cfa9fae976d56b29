"""Stage 1's inference streams: how the CPU is split (threads, streams, decode workers, per
torchrun rank), and the sink that feeds them: batches finish out of order but reach the (real
zarr) writer in order, a video aborted while part of it is still being encoded is rolled
back, and an encoder error surfaces without a half-written shard being marked done."""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.config import ExtractConfig
from extract.encode import BatchingSink, ThreadPlan, thread_plan
from extract.runner import decode_workers
from pipeline.dist import local_cores
from pipeline.store import STORAGE_DTYPES, ShardWriter, init_store, open_store, read_markers

S = 4  # frame side, px
C = 3  # feature channels: the frame's per-channel mean


def video(n: int, seed: int) -> np.ndarray:
    """(n, S, S, 3) uint8 frames, different for every seed."""
    return np.random.default_rng(seed).integers(0, 256, (n, S, S, 3), dtype=np.uint8)


def expected(frames: np.ndarray) -> np.ndarray:
    """The stand-in encoder's output for ``frames``: (n, 1, 1, C) float32."""
    return frames.astype(np.float32).mean(axis=(1, 2))[:, None, None, :]


class SlowFirstEncoder:
    """(n, S, S, 3) uint8 -> (n, 1, 1, C) float32; every odd call is slow, so with two streams
    a later batch finishes before an earlier one. Records the batches it saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.lock = threading.Lock()
        self.max_concurrent = 0
        self._running = 0

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls += 1
            slow = self.calls % 2 == 1
            self._running += 1
            self.max_concurrent = max(self.max_concurrent, self._running)
        time.sleep(0.15 if slow else 0.0)
        with self.lock:
            self._running -= 1
        return expected(frames)


def new_writer(root: Path, dtype: str = "float32") -> ShardWriter:
    init_store(root, {"content": {"feature_shape": [1, 1, C], "dtype": dtype}})
    return ShardWriter.create(root, "00000", feature_shape=(1, 1, C), dtype=dtype, codec="zstd",
                              frames_per_file=8)


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """What the store gives back for float32 features ``x`` after a round trip through ``dtype``."""
    sd = STORAGE_DTYPES.get(dtype)
    return sd.decode(sd.encode(x))


def feed(sink: BatchingSink, vid: str, frames: np.ndarray, chunk: int) -> None:
    sink.begin({"video_id": vid, "split": "train", "label": None, "label_name": None})
    for i in range(0, len(frames), chunk):
        sink.add(frames[i : i + chunk], np.arange(i, min(i + chunk, len(frames)), dtype=np.float64) / 10)


@pytest.mark.parametrize("dtype", ["float32", "int8"])  # int8: encoded on the streams with its scales
def test_out_of_order_batches_are_written_in_order_and_an_abort_rolls_back(tmp_path: Path, dtype: str) -> None:
    root = tmp_path / "store"
    encoder = SlowFirstEncoder()
    videos = {"a": video(13, 0), "b": video(11, 1), "c": video(9, 2)}
    with ThreadPoolExecutor(2) as streams:
        sink = BatchingSink(encoder, new_writer(root, dtype), batch_size=5, executor=streams, max_in_flight=2)
        feed(sink, "a", videos["a"], chunk=3)
        sink.end()
        # "x" fails after 3 batches' worth of its frames were submitted: part of it is in flight
        feed(sink, "x", video(12, 9), chunk=4)
        in_flight_ids = {op[1]["video_id"] for ops, _ in sink.in_flight for op in ops if op[0] == "begin"}
        assert "x" in in_flight_ids, "part of the aborted video must be in flight for this test to mean anything"
        sink.abort()
        feed(sink, "b", videos["b"], chunk=3)
        sink.end()
        feed(sink, "c", videos["c"], chunk=2)
        sink.end()
        sink.drain()
        sink.writer.finish([], {})
    assert encoder.max_concurrent == 2  # the two streams really overlapped

    store = open_store(root)
    assert store.video_ids == ["a", "b", "c"]
    offset = 0
    for vid, frames in videos.items():
        entry = store.meta(vid)
        assert (entry.offset, entry.length) == (offset, len(frames))
        np.testing.assert_array_equal(store.features(vid), stored(expected(frames), dtype))
        np.testing.assert_array_equal(store.timestamps(vid), np.arange(len(frames)) / 10)
        offset += len(frames)


def test_an_encoder_error_reaches_the_caller_and_no_marker_is_written(tmp_path: Path) -> None:
    root = tmp_path / "store"

    def broken(frames: np.ndarray) -> np.ndarray:
        raise RuntimeError("out of memory")

    with ThreadPoolExecutor(2) as streams:
        sink = BatchingSink(broken, new_writer(root), batch_size=4, executor=streams, max_in_flight=2)
        with pytest.raises(RuntimeError, match="out of memory"):
            feed(sink, "a", video(40, 0), chunk=4)
            sink.end()
            sink.drain()
        sink.cancel()
        assert not sink.in_flight and not sink.ops
    assert read_markers(root) == {}


def test_thread_plan_splits_this_ranks_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    cores = len(os.sched_getaffinity(0))
    assert local_cores() == cores
    assert thread_plan(ExtractConfig(), cpu) == ThreadPlan(min(cores, 4), max(1, cores // min(cores, 4)))
    assert decode_workers(ExtractConfig()) == max(1, cores - 1)
    # explicit knobs: 8 threads as 4 streams of 2 (auto caps streams at 4), or one stream of 8
    assert thread_plan(ExtractConfig(threads=8), cpu) == ThreadPlan(4, 2)
    assert thread_plan(ExtractConfig(threads=8, streams=1), cpu) == ThreadPlan(1, 8)
    assert thread_plan(ExtractConfig(threads=3), cpu) == ThreadPlan(3, 1)
    assert thread_plan(ExtractConfig(threads=8), cuda).streams == 2
    assert decode_workers(ExtractConfig(workers=5)) == 5
    # torchrun with 4 ranks on this node: each takes a quarter of the cores (at least 1)
    for var, value in (("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "4")):
        monkeypatch.setenv(var, value)
    assert local_cores() == max(1, cores // 4)
    assert thread_plan(ExtractConfig(), cpu).streams * thread_plan(ExtractConfig(), cpu).threads_per_stream \
        <= max(1, cores // 4)
    assert decode_workers(ExtractConfig()) == max(1, cores // 4 - 1)
