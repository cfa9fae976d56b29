"""pipeline/store/ on real zarr v3 files: writer/reader round trips for every dtype x codec,
rollback of aborted videos across flushed blocks, frame selection, plain-zarr readability,
header checks, status while writing and the problems verify_store must catch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import ConfigMismatchError, StoreError
from pipeline.store import (
    CODECS,
    STORAGE_DTYPES,
    Failure,
    FeatureStore,
    ShardWriter,
    check_store,
    encode_pea,
    init_store,
    marker_path,
    open_store,
    read_markers,
    store_status,
    verify_store,
)

SHAPE = (2, 3, 8)  # (H, W, C) per frame
BLOCK = 4  # frames per zarr shard file: small so videos cross block boundaries


def header(dtype: str = "float32", codec: str = "zstd", num_shards: int = 1, num_videos: int = 3) -> dict:
    content = {"dtype": dtype, "codec": codec, "feature_shape": list(SHAPE),
               "num_shards": num_shards, "num_videos": num_videos, "videos_per_shard": 3}
    return {"content": content}


def feats(n: int, seed: int) -> np.ndarray:
    """(n, H, W, C) float32 features with per-token scales that vary (so int8 scales matter)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *SHAPE)) * rng.uniform(0.1, 10.0, (n, *SHAPE[:2], 1))).astype(np.float32)


def times(n: int, t0: float = 0.0) -> np.ndarray:
    return t0 + np.arange(n, dtype=np.float64) / 8.0


def entry(vid: str, label: int = 0, split: str = "train") -> dict:
    return {"video_id": vid, "split": split, "label": label, "label_name": f"class{label}"}


def write_shard(root: Path, name: str, videos: dict[str, np.ndarray], dtype: str = "float32",
                codec: str = "zstd", failures: list[Failure] | None = None, integrity: int = 1) -> dict:
    w = ShardWriter.create(root, name, feature_shape=SHAPE, dtype=dtype, codec=codec, frames_per_file=BLOCK,
                           integrity=integrity)
    for i, (vid, x) in enumerate(videos.items()):
        w.begin_video(entry(vid, label=i % 2, split="test" if i == 1 else "train"))
        for part in np.array_split(np.arange(len(x)), 2):  # two appends per video
            w.append(x[part], times(len(x))[part] + i)
        w.end_video()
    return w.finish(failures or [], {"videos": len(videos)})


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("codec", ["zstd", "blosc", "none"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_round_trip_every_dtype_and_codec(tmp_path: Path, dtype: str, codec: str) -> None:
    root = tmp_path / "store"
    init_store(root, header(dtype, codec))
    videos = {"a": feats(3, 0), "b": feats(6, 1), "c": feats(2, 2)}  # 11 frames: blocks 4+4+3
    marker = write_shard(root, "00000", videos, dtype, codec)
    assert marker["num_frames"] == 11
    assert [(v["offset"], v["length"]) for v in marker["videos"]] == [(0, 3), (3, 6), (9, 2)]

    store = open_store(root)
    assert store.video_ids == ["a", "b", "c"] and len(store) == 3 and "b" in store
    assert store.splits() == {"train": 2, "test": 1} and store.split_ids("test") == ["b"]
    assert store.meta("b").label == 1 and store.meta("b").label_name == "class1"
    assert store.feature_shape == SHAPE
    for i, (vid, x) in enumerate(videos.items()):
        got = store.features(vid)
        assert got.dtype == np.float32 and got.shape == x.shape
        np.testing.assert_array_equal(store.timestamps(vid), times(len(x)) + i)
        if dtype == "float32":
            np.testing.assert_array_equal(got, x)
        elif dtype == "float16":
            np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
            np.testing.assert_allclose(got, x, rtol=1e-3, atol=1e-4)
        else:  # per-token scale: error at most half a quantisation step of that token
            step = np.abs(x).max(-1, keepdims=True) / 127.0
            assert np.all(np.abs(got - x) <= step / 2 + 1e-6)
            assert cosine(got, x) > 0.999

    # the arrays on disk have the declared dtype, codec and sharding layout
    meta = json.loads((root / "shards" / "00000" / "features" / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["shape"] == [11, *SHAPE]
    assert meta["data_type"] == STORAGE_DTYPES.get(dtype).feature_dtype
    (shard_codec,) = [c for c in meta["codecs"] if c["name"] == "sharding_indexed"]
    assert shard_codec["configuration"]["chunk_shape"] == [1, *SHAPE]
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [BLOCK, *SHAPE]
    inner = [c["name"] for c in shard_codec["configuration"]["codecs"]]
    expected = {"zstd": "zstd", "blosc": "blosc", "none": None}[codec]
    # (no compressor: bytes then the chunk checksum, which every array ends with)
    assert (expected in inner) if expected else inner == ["bytes", "crc32c"], inner
    assert inner[-1] == "crc32c", inner
    assert (root / "shards" / "00000" / "scales").exists() == (dtype == "int8")


def test_arrays_are_readable_with_plain_zarr(tmp_path: Path) -> None:
    root = tmp_path / "store"
    init_store(root, header("int8"))
    videos = {"a": feats(5, 3), "b": feats(4, 4)}
    write_shard(root, "00000", videos, "int8")
    shard = root / "shards" / "00000"
    q = zarr.open_array(str(shard / "features"), mode="r")
    scales = zarr.open_array(str(shard / "scales"), mode="r")
    ts = zarr.open_array(str(shard / "timestamps"), mode="r")
    assert q.dtype == np.int8 and q.shape == (9, *SHAPE) and scales.shape == (9, *SHAPE[:2])
    assert type(q.metadata.codecs[0]).__name__ == "ShardingCodec"
    x = np.asarray(q[...]).astype(np.float32) * np.asarray(scales[...])[..., None]
    store = open_store(root)
    np.testing.assert_array_equal(x, np.concatenate([store.features("a"), store.features("b")]))
    np.testing.assert_array_equal(ts[5:], times(4) + 1)
    # the per-video table is in the shard group's attributes, readable without freezeframe
    g = zarr.open_group(str(shard), mode="r")
    assert [(v["video_id"], v["offset"], v["length"]) for v in g.attrs["videos"]] == [("a", 0, 5), ("b", 5, 4)]
    root_group = zarr.open_group(str(root), mode="r")
    assert root_group.attrs["freezeframe"]["content"]["dtype"] == "int8"


# ---------------------------------------------------------------------------------- rollback
@pytest.mark.parametrize("dtype", ["float32", "int8"])
@pytest.mark.parametrize("first_len", [3, 5, 8])
def test_abort_video_rolls_back_across_flushed_blocks(tmp_path: Path, first_len: int, dtype: str) -> None:
    """A video aborted after some of its frames reached zarr (whole 4-frame blocks) leaves no trace."""
    root = tmp_path / "store"
    init_store(root, header(dtype))
    a, bad, c, d = feats(first_len, 10), feats(9, 11), feats(6, 12), feats(2, 13)
    w = ShardWriter.create(root, "00000", feature_shape=SHAPE, dtype=dtype, frames_per_file=BLOCK)
    w.begin_video(entry("a"))
    w.append(a, times(first_len))
    w.end_video()
    w.begin_video(entry("bad"))
    w.append(bad[:5], np.full(5, 99.0))
    w.append(bad[5:], np.full(4, 99.0))
    assert w._flushed > first_len  # part of the aborted video was written to zarr
    w.abort_video()
    w.begin_video(entry("c"))
    w.append(c, times(6, 10.0))
    w.end_video()
    w.begin_video(entry("bad2"))  # aborted while still buffered
    w.append(bad[:1], np.full(1, 99.0))
    w.abort_video()
    w.begin_video(entry("d"))
    w.append(d, times(2, 20.0))
    w.end_video()
    w.finish()

    store = open_store(root)
    assert store.video_ids == ["a", "c", "d"]
    assert [(store.meta(v).offset, store.meta(v).length) for v in "acd"] == [
        (0, first_len), (first_len, 6), (first_len + 6, 2)]
    for vid, x, t0 in (("a", a, 0.0), ("c", c, 10.0), ("d", d, 20.0)):
        np.testing.assert_array_equal(store.timestamps(vid), times(len(x), t0))
        ref = x if dtype == "float32" else STORAGE_DTYPES.get(dtype).decode(STORAGE_DTYPES.get(dtype).encode(x))
        np.testing.assert_array_equal(store.features(vid), ref)
    assert verify_store(root) == []
    assert zarr.open_array(str(root / "shards" / "00000" / "features"), mode="r").shape[0] == first_len + 8


def test_writer_refuses_misuse(tmp_path: Path) -> None:
    root = tmp_path / "store"
    init_store(root, header())
    w = ShardWriter.create(root, "00000", feature_shape=SHAPE, frames_per_file=BLOCK)
    with pytest.raises(StoreError, match="outside begin_video"):
        w.append(feats(1, 0), times(1))
    w.begin_video(entry("a"))
    with pytest.raises(StoreError, match="store"):
        w.append(np.zeros((1, 2, 3, 7), np.float32), times(1))
    with pytest.raises(StoreError, match="finish"):
        w.finish()
    w.append(feats(1, 0), times(1))
    w.end_video()
    w.finish()
    with pytest.raises(StoreError, match="already complete"):
        ShardWriter.create(root, "00000", feature_shape=SHAPE)


# ---------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_features_with_repeated_and_unsorted_indices(tmp_path: Path, dtype: str, in_memory: bool) -> None:
    root = tmp_path / "store"
    init_store(root, header(dtype))
    write_shard(root, "00000", {"a": feats(3, 0), "b": feats(10, 1)}, dtype)
    store = FeatureStore(root, in_memory=in_memory)
    full = store.features("b")
    for idx in ([7, 0, 7, 3, 9, 0], [2, 3, 4], [5], np.array([9, 8, 1, 1]), []):
        got = store.features("b", idx)
        assert got.shape == (len(idx), *SHAPE)
        np.testing.assert_array_equal(got, full[np.asarray(idx, dtype=np.int64)])
    for bad in ([10], [-1], [0, 13]):
        with pytest.raises(IndexError, match="out of range"):
            store.features("b", bad)
    with pytest.raises(KeyError, match="not in store"):
        store.features("zzz")


def _pea_shard(root: Path, name: str, videos: dict[str, np.ndarray], views: int, codec: str) -> None:
    """A float16 shard whose frame f of video i has PEA view k = features + 100 (k + 1)."""
    w = ShardWriter.create(root, name, feature_shape=SHAPE, dtype="float16", codec=codec, frames_per_file=BLOCK,
                           pea_views=views)
    for i, (vid, x) in enumerate(videos.items()):
        w.begin_video(entry(vid))
        pea = np.stack([x + 100.0 * (k + 1) for k in range(views)], axis=1)
        arrays = {**w.dtype.encode(x), **encode_pea(w.dtype, pea, np.zeros((len(x), views, 2)))}
        w.append_encoded(arrays, times(len(x)))
        w.end_video()
    w.finish([], {"videos": len(videos)})


@pytest.mark.parametrize("views", [1, 3])  # K = 1: decoded in place; K > 1: the asked view of each row
@pytest.mark.parametrize("codec", ["zstd", "blosc"])  # zstd: FrameReader; blosc: zarr's reads
@pytest.mark.parametrize("in_memory", [False, True])
def test_gather_stored_puts_frames_of_many_videos_in_their_places(tmp_path: Path, codec: str, views: int,
                                                                  in_memory: bool) -> None:
    root = tmp_path / "store"
    init_store(root, {"content": {**header("float16", codec, num_shards=2, num_videos=4)["content"],
                                  "pea": {"views": views, "ratio": 10.0, "seed": 0}}})
    data = {"a": feats(3, 0), "b": feats(10, 1), "c": feats(6, 2), "d": feats(5, 3)}
    _pea_shard(root, "00000", {k: data[k] for k in "ab"}, views, codec)
    _pea_shard(root, "00001", {k: data[k] for k in "cd"}, views, codec)
    store = FeatureStore(root, in_memory=in_memory)
    vids = ["b", "c", "a", "b", "d", "b", "c"]  # both shards, repeats, unsorted, across shard files (BLOCK 4)
    frames = [9, 0, 2, 1, 4, 9, 5]
    dest = [6, 0, 3, 5, 1, 4, 2]
    out = np.full((8, *SHAPE), np.nan, dtype=np.float16)
    assert store.gather_stored(vids, frames, out, dest) is out
    for v, f, d in zip(vids, frames, dest):
        np.testing.assert_array_equal(out[d], store.stored_features(v, [f])["features"][0])
    assert np.isnan(out[7]).all()  # untouched
    pick = [(k * 2 + 1) % views for k in range(len(vids))]
    pea = store.gather_stored(vids, frames, np.zeros((7, *SHAPE), np.float16), views=pick)
    for i, (v, f) in enumerate(zip(vids, frames)):
        np.testing.assert_array_equal(pea[i], store.pea_features(v, [f], [pick[i]])[0])
        np.testing.assert_allclose(pea[i].astype(np.float32), data[v][f] + 100.0 * (pick[i] + 1), rtol=1e-3, atol=0.1)
    with pytest.raises(IndexError, match="out of range"):
        store.gather_stored(["a"], [3], out)
    with pytest.raises(IndexError, match="view index out of range"):
        store.gather_stored(["a"], [0], out, views=[views])
    with pytest.raises(ValueError, match="C-contiguous float16"):
        store.gather_stored(["a"], [0], np.zeros((1, *SHAPE), np.float32))


def test_gather_stored_refuses_int8(tmp_path: Path) -> None:
    root = tmp_path / "store"
    init_store(root, header("int8"))
    write_shard(root, "00000", {"a": feats(3, 0)}, "int8")
    with pytest.raises(ValueError, match="scales"):
        FeatureStore(root).gather_stored(["a"], [0], np.zeros((1, *SHAPE), np.int8))


def test_video_stored_twice_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "store"
    init_store(root, header(num_shards=2, num_videos=2))
    write_shard(root, "00000", {"a": feats(2, 0)})
    write_shard(root, "00001", {"a": feats(2, 0)})
    with pytest.raises(StoreError, match="stored twice"):
        open_store(root)
    assert any("stored twice" in p for p in verify_store(root))


# ---------------------------------------------------------------------------------- header
def test_init_store_refuses_a_different_config(tmp_path: Path) -> None:
    root = tmp_path / "store"
    first = init_store(root, header("float16"))
    assert init_store(root, header("float16")) == first  # same content: accepted, unchanged
    with pytest.raises(ConfigMismatchError) as info:
        init_store(root, header("int8", codec="blosc"))
    msg = str(info.value)
    assert "dtype: store has 'float16', this run asks 'int8'" in msg and "codec" in msg
    assert "num_videos" not in msg and "--store" in msg
    assert json.loads((root / "freezeframe.json").read_text())["content"]["dtype"] == "float16"
    with pytest.raises(StoreError, match="not a freezeframe store"):
        open_store(tmp_path / "nothing")


# ---------------------------------------------------------------------------------- status / verify
def test_status_while_a_shard_is_in_progress(tmp_path: Path) -> None:
    root = tmp_path / "store"
    init_store(root, header(num_shards=3, num_videos=6))
    write_shard(root, "00000", {"a": feats(3, 0), "b": feats(2, 1)},
                failures=[Failure("x", "decode", "DecodeError", "boom", "00000")])
    w = ShardWriter.create(root, "00001", feature_shape=SHAPE, frames_per_file=BLOCK)
    w.begin_video(entry("c"))
    w.append(feats(6, 2), times(6))  # a block reached zarr, no marker yet
    st = store_status(root)
    assert (st.complete_shards, st.in_progress_shards, st.pending_shards) == (1, ["00001"], 1)
    assert (st.videos_stored, st.frames_stored, st.failures) == (2, 5, 1)
    assert (st.planned_shards, st.planned_videos) == (3, 6)
    # readers only see completed shards
    store = open_store(root)
    assert store.video_ids == ["a", "b"] and [f.video_id for f in store.failures()] == ["x"]
    w.end_video()
    w.finish()
    st = store_status(root)
    assert (st.complete_shards, st.in_progress_shards, st.pending_shards, st.videos_stored) == (2, [], 1, 3)


def _healthy(root: Path, integrity: int = 1) -> None:
    init_store(root, header(num_shards=2, num_videos=5), integrity=integrity)
    write_shard(root, "00000", {"a": feats(3, 0), "b": feats(6, 1), "c": feats(2, 2)}, integrity=integrity)
    write_shard(root, "00001", {"d": feats(4, 3)}, failures=[Failure("e", "open", "DecodeError", "x", "00001")],
                integrity=integrity)
    assert verify_store(root) == []


def test_verify_catches_a_shard_folder_without_marker(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _healthy(root)
    w = ShardWriter.create(root, "00002", feature_shape=SHAPE, frames_per_file=BLOCK)
    w.begin_video(entry("f"))
    w.append(feats(5, 4), times(5))
    problems = verify_store(root)
    assert problems == ["shard 00002: incomplete (no completion marker); rerun `freezeframe extract`"]


@pytest.mark.parametrize("integrity", [0, 1])
def test_verify_catches_nan_written_with_plain_zarr(tmp_path: Path, integrity: int) -> None:
    root = tmp_path / "store"
    _healthy(root, integrity)
    a = zarr.open_array(str(root / "shards" / "00000" / "features"), mode="r+")
    row = np.asarray(a[7])
    row[1, 2, 3] = np.nan
    a[7] = row
    problems = verify_store(root)
    if integrity == 0:  # a store made before checksums: only the value scan sees it
        assert len(problems) == 1 and "shard 00000: 1 NaN/inf values in features" in problems[0]
        assert verify_store(root, scan_values=False) == []
    else:  # the file no longer matches the SHA-256 its marker recorded
        assert problems == ["shard 00000: shards/00000/features/c/1/0/0/0: content does not match the SHA-256 in "
                            "the marker (damaged, or another shard's file) (videos b)"]


def test_verify_finds_nan_written_by_the_writer(tmp_path: Path) -> None:
    """NaN that the backbone produced is stored with valid checksums: the value scan finds it,
    and --repair leaves it (re-extracting would write the same values)."""
    root = tmp_path / "store"
    init_store(root, header(num_shards=1, num_videos=1))
    x = feats(6, 0)
    x[5, 0, 0, 0] = np.inf
    write_shard(root, "00000", {"a": x})
    report = check_store(root)
    assert [str(p) for p in report.problems] == ["shard 00000: 1 NaN/inf values in features rows 4..6 (videos a)"]
    assert report.damaged_shards == [] and report.notes == []


def test_verify_catches_marker_frame_count_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _healthy(root)
    mp = marker_path(root, "00001")
    marker = json.loads(mp.read_text())
    marker["num_frames"] = 3
    mp.write_text(json.dumps(marker))
    problems = verify_store(root)
    assert "shard 00001: array features has 4 frames, marker says 3" in problems
    assert "shard 00001: array timestamps has 4 frames, marker says 3" in problems
    assert "shard 00001: videos cover 4 frames, arrays hold 3" in problems


def test_verify_catches_missing_shards_and_unaccounted_videos(tmp_path: Path) -> None:
    root = tmp_path / "store"
    init_store(root, header(num_shards=3, num_videos=7))
    write_shard(root, "00000", {"a": feats(2, 0)})
    assert verify_store(root) == ["2 planned shard(s) not complete: [1, 2]"]
    write_shard(root, "00001", {"b": feats(2, 0)})
    write_shard(root, "00002", {"c": feats(2, 0)})
    assert verify_store(root) == ["3 stored + 0 failed videos != 7 in the manifest"]
    assert sorted(read_markers(root)) == ["00000", "00001", "00002"]
    assert set(CODECS.names()) == {"zstd", "blosc", "none"}
