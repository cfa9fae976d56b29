"""The stage-2 loader keeps float16 until the device: the batch cast there is exactly the
float32 batch the old path (zarr read, float32 in the worker) gave; the direct frame reader
(pipeline/store/frames.py) returns exactly what zarr reads, and leaves other layouts to zarr."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from pipeline.errors import StoreError
from pipeline.store import open_store
from pipeline.store.layout import shards_dir
from pipeline.store.frames import frame_reader
from tests.stores import SynthStore, write_synthetic_store
from train.data import ClipConfig, ClipDataset, ItemBatch, PRPDataset, collate, to_model_dtype
from train.data import TestViewConfig as ViewConfig
from train.data import TestViewDataset as ViewDataset
from train.loop import _to_device
from train.sampling import PRPConfig, prp_clips, random_clip, test_clips


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> SynthStore:
    # 16 frames per shard file: clips cross shard files; 4 videos per store shard
    return write_synthetic_store(tmp_path_factory.mktemp("f16") / "s.zarr", splits={"train": 6, "test": 3},
                                 video_lengths=[40, 7, 33, 25, 18, 38, 20, 30, 9], dtype="float16",
                                 videos_per_shard=4, grid=(3, 2), channels=8)


def _zarr_frames(path: Path, store, vid: str, idx: np.ndarray) -> np.ndarray:
    """The old path: zarr's own read of the rows, then float32 (what ``features`` returned before)."""
    e = store.meta(vid)
    a = zarr.open_array(str(shards_dir(path) / e.shard / "features"), mode="r")
    return np.stack([np.asarray(a[e.offset + int(i)]) for i in np.asarray(idx).reshape(-1)]).astype(np.float32)


def test_float16_items_cast_on_the_device_equal_the_float32_path(f16: SynthStore) -> None:
    store = open_store(f16.path)
    prp_cfg = PRPConfig(num_frames=4, stride=2, clips_per_video=3, jitter=0.2)
    prp = PRPDataset(store, "train", prp_cfg, seed=5)
    prp.set_epoch(2)
    batch = next(iter(DataLoader(prp, batch_size=6, num_workers=2, multiprocessing_context="fork")))
    assert batch[0].dtype == torch.float16  # float16 through workers and collation
    # the loop's collate: the batch read as one shared tensor by __getitems__, handed over as it is
    fast = next(iter(DataLoader(prp, batch_size=6, num_workers=2, multiprocessing_context="fork", collate_fn=collate)))
    assert torch.equal(fast[0], batch[0]) and torch.equal(fast[1], batch[1])
    inproc = collate(prp.__getitems__(list(range(6))))  # in this process: a plain tensor, same values
    assert isinstance(prp.__getitems__([0, 1]), ItemBatch) and torch.equal(inproc[0], batch[0])
    x = _to_device(batch, torch.device("cpu"))[0]  # what the training loop does
    assert x.dtype == torch.float32
    for i, vid in enumerate(prp.video_ids):
        clips = prp_clips(store.num_frames(vid), np.random.default_rng((5, 2, i)), prp_cfg)
        idx = np.stack([c.indices for c in clips])
        ref = _zarr_frames(f16.path, store, vid, idx).reshape(x[i].shape)
        assert torch.equal(x[i], torch.from_numpy(ref))  # bit for bit
        np.testing.assert_array_equal(ref, f16.features[vid][idx.reshape(-1)].astype(np.float16).astype(np.float32)
                                      .reshape(ref.shape))
    clip = ClipDataset(store, "train", ClipConfig(num_frames=5, stride=3), seed=1)
    for i, vid in enumerate(clip.video_ids):
        item, _ = clip[i]
        idx = random_clip(store.num_frames(vid), np.random.default_rng((1, 0, i)), 5, 3, "wrap")
        assert item.dtype == torch.float16 and torch.equal(to_model_dtype(item),
                                                           torch.from_numpy(_zarr_frames(f16.path, store, vid, idx)))
    views = ViewDataset(store, "test", ViewConfig(num_clips=3, num_frames=4, stride=4))
    for i, vid in enumerate(views.video_ids):
        item, _ = views[i]
        idx = test_clips(store.num_frames(vid), 3, 4, 4, "wrap")
        ref = _zarr_frames(f16.path, store, vid, idx).reshape(item.shape)
        assert item.dtype == torch.float16 and torch.equal(to_model_dtype(item), torch.from_numpy(ref))


def test_augmented_and_float32_items_are_float32(tmp_path: Path, f16: SynthStore) -> None:
    store = open_store(f16.path)
    aug = ClipDataset(store, "train", ClipConfig(num_frames=4, stride=2), seed=0, augment=("hflip",))
    assert aug[0][0].dtype == torch.float32
    items = aug.__getitems__([0, 1])  # augmented: item by item (float32), collated as before
    assert not isinstance(items, ItemBatch) and collate(items)[0].shape == (2, 4, 3, 2, 8)
    f32 = write_synthetic_store(tmp_path / "f32.zarr", splits={"train": 2, "test": 1})
    item = ClipDataset(open_store(f32.path), "train", ClipConfig(num_frames=4, stride=2), seed=0)[0][0]
    assert item.dtype == torch.float32


def test_frame_reader_equals_zarr_and_leaves_other_layouts_to_zarr(tmp_path: Path, f16: SynthStore) -> None:
    store = open_store(f16.path)
    vid = "train-000"  # 40 frames: three shard files of 16
    rows = np.array([0, 3, 3, 15, 16, 17, 39, 2])  # unsorted, repeated, across files
    e = store.meta(vid)
    a = zarr.open_array(str(shards_dir(f16.path) / e.shard / "features"), mode="r")
    reader = frame_reader(shards_dir(f16.path) / e.shard / "features", a)
    assert reader is not None
    got = reader.read(rows + e.offset)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, np.stack([np.asarray(a[e.offset + r]) for r in rows]))
    np.testing.assert_array_equal(store.features(vid, rows), got.astype(np.float32))
    blosc = write_synthetic_store(tmp_path / "b.zarr", splits={"train": 2, "test": 1}, codec="blosc")
    bs = open_store(blosc.path)
    b = zarr.open_array(str(shards_dir(blosc.path) / bs.meta("train-000").shard / "features"), mode="r")
    assert frame_reader(tmp_path, b) is None  # another codec: zarr reads it
    np.testing.assert_array_equal(bs.features("train-000", [1, 4]), blosc.features["train-000"][[1, 4]])


def test_a_damaged_chunk_read_directly_names_the_file(tmp_path: Path) -> None:
    s = write_synthetic_store(tmp_path / "s.zarr", splits={"train": 2, "test": 1}, video_lengths=[20, 20, 20],
                              dtype="float16")
    store = open_store(s.path)
    e = store.meta("train-000")
    shard_file = shards_dir(s.path) / e.shard / "features" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[40] ^= 0xFF  # inside the first frame's chunk: its crc32c fails
    shard_file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"features/c/0/0/0/0: damaged"):
        open_store(s.path).features("train-000", [0, 2])
