"""The 30-view test (AdViSe: 10 clips x 3 spatial crops), end to end on real lossless videos, a
real random-init MobileNetV2 and real zarr stores.

Extraction with ``test_crops=3`` stores the 2 side crops (left/right of a landscape frame,
top/bottom of a portrait one) of the short-side-scaled frame of every test video; they equal a
direct forward on the same crops of frames decoded here with PyAV, and the main (centre) array
stays byte-identical to a store extracted without crops. The multi-view test averages the logits
of every view (30-view) and of the centre crops alone (10-view) from the same pass; refusals,
``verify`` and resume cover the crops."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import zarr

from extract.config import ExtractConfig, resolve_extract_config
from extract.decode import INTERPOLATIONS, test_crop_boxes
from extract.encode import build_backbone
from extract.runner import run_extract
from pipeline.config import from_dict
from pipeline.errors import ConfigError, ConfigMismatchError, StoreError
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.store import marker_path, open_store, store_status, verify_store
from tests.videos import make_lossless_video, pattern_frames
from train.config import resolve_train_config
from train.data import DataError
from train.data import TestViewConfig as ViewConfig
from train.data import TestViewDataset as ViewDataset
from train.evals import get_evaluation
from train.evals.multiview import centre_mean
from train.models import build_model
from train.sampling import test_clips

#: float16 storage rounds to nearest with 11 significant bits: |stored - x| <= 2^-11 |x|; the
#: atol covers the direct forward's own float32 noise (another batch size than the extraction's)
F16_RTOL = 2.0**-11
F16_ATOL = 1e-4
SIZE = 64  # MobileNetV2 input side: 2 x 2 x 1280 features

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _manifest(tmp: Path, shapes: list[tuple[int, int, int, str, int]]) -> Path:
    """Videos (frames, H, W, split, label) -> a manifest of lossless videos."""
    rows = []
    for i, (n, h, w, split, label) in enumerate(shapes):
        p = make_lossless_video(tmp / f"v{i}.mp4", pattern_frames(n, h, w, seed=30 + i), 10)
        rows.append(ManifestRow(f"v{i}", str(p), split, label, f"class{label}"))
    return write_manifest(rows, tmp / "m.jsonl")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Landscape 48x32 test videos (crops differ), one portrait 32x48 test video, 2 train videos."""
    tmp = tmp_path_factory.mktemp("v30")
    return _manifest(tmp, [(6, 32, 48, "train", 0), (5, 32, 48, "test", 0), (7, 32, 48, "test", 1),
                           (4, 48, 32, "test", 1), (5, 32, 48, "train", 1), (6, 32, 48, "test", 0)])


def _cfg(manifest: Path, store: Path, **kw) -> ExtractConfig:
    base = dict(manifest=str(manifest), store=str(store), backbone="mobilenetv2-imagenet", random_weights=True,
                image_size=SIZE, dtype="float16", test_crops=3, videos_per_shard=2, frames_per_file=8,
                batch_size=5, chunk_size=3, workers=1, device="cpu", progress=False)
    return ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def stores(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The corpus extracted with test crops and without."""
    tmp = tmp_path_factory.mktemp("stores")
    run_extract(_cfg(corpus, tmp / "crops.zarr"))
    run_extract(_cfg(corpus, tmp / "plain.zarr", test_crops=1))
    return tmp / "crops.zarr", tmp / "plain.zarr"


def _decode_scaled(path: str, size: int, interpolation: str) -> np.ndarray:
    """Every frame of a video, its short side scaled to ``size`` (PyAV directly): (T, h, w, 3) uint8."""
    out = []
    with av.open(path) as c:
        for frame in c.decode(video=0):
            w, h = frame.width, frame.height
            sw, sh = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
            out.append(frame.reformat(width=sw, height=sh, format="rgb24",
                                      interpolation=INTERPOLATIONS.get(interpolation)).to_ndarray())
    return np.stack(out)


def test_stored_side_crops_equal_a_direct_forward_and_the_centre_is_unchanged(corpus: Path, stores) -> None:
    crops_path, plain_path = stores
    store, plain = open_store(crops_path), open_store(plain_path)
    cfg = _cfg(corpus, crops_path)
    bb = build_backbone(cfg)
    interp = store.content["geometry"]["interpolation"]
    assert store.test_crops_count == 3 and store.content["test_crops"]["splits"] == ["test"]
    assert store.content["test_crops"]["num_videos"] == 4
    assert "test_crops" not in plain.content
    checked = {"landscape": 0, "portrait": 0}
    for vid in store.video_ids:
        e = store.meta(vid)
        assert e.crops == (e.split == "test")
        # (b) the main array is byte-identical to a store extracted without crops
        a, b = store.stored_features(vid), plain.stored_features(vid)
        assert a["features"].dtype == np.float16 and np.array_equal(a["features"], b["features"])
        np.testing.assert_array_equal(store.timestamps(vid), plain.timestamps(vid))
        if not e.crops:
            with pytest.raises(StoreError, match="no stored test crops.*test_crops=3"):
                store.stored_crops(vid, [0])
            continue
        # (a) the side crops = a forward of the same backbone on the crops of frames decoded here
        frames = _decode_scaled(str(Path(corpus).parent / f"{vid}.mp4"), SIZE, interp)
        t, h, w = frames.shape[:3]
        assert t == e.length
        boxes = test_crop_boxes(w, h, SIZE)
        checked["landscape" if w > h else "portrait"] += 1
        assert len({bx for bx in boxes}) == 3  # the crops differ
        with torch.no_grad():
            direct = [bb(bb.prepare(np.ascontiguousarray(frames[:, t0:t1, l0:l1]))).numpy()
                      for l0, t0, l1, t1 in boxes]
        views = store.crop_views(vid, np.arange(t))  # (T, 3, H, W, C): first side, centre, second side
        for c in range(3):
            np.testing.assert_allclose(views[:, c], direct[c], rtol=F16_RTOL, atol=F16_ATOL)
        assert not np.allclose(views[:, 0], views[:, 2], rtol=1e-2, atol=1e-2)
    assert checked == {"landscape": 3, "portrait": 1}
    assert verify_store(crops_path) == []
    st = store_status(crops_path)
    assert (st.test_crops, st.videos_with_crops) == (3, 4)
    g = zarr.open_group(str(crops_path / "shards" / "00000"), mode="r")
    assert set(g.array_keys()) == {"features", "timestamps", "crop_features"}
    assert g["crop_features"].shape == (11, 2, 2, 2, 1280)
    assert not np.any(np.asarray(g["crop_features"][:6]))  # the train video's rows: zeros


def _train_cfg(store: Path, run: Path, *extra: str):
    return resolve_train_config("finetune", None, None, [
        f'data.store="{store}"', f'run_dir="{run}"', 'init=""', "model.num_classes=2",
        "model.tmm.in_channels=1280", "model.tmm.hidden=16", "model.tmm.out_channels=16", "model.tmm.blocks=1",
        "test.num_clips=10", "test.num_frames=2", "test.stride=2", *extra])


def test_thirty_view_average_is_the_mean_over_every_clip_and_crop(stores, tmp_path: Path) -> None:
    crops_path, plain_path = stores
    cfg = _train_cfg(crops_path, tmp_path / "run")
    assert cfg.eval_cfg["multiview"].spatial_crops == "auto"
    torch.manual_seed(3)
    model = build_model(cfg.model).eval()
    store = open_store(crops_path)
    res = get_evaluation("multiview").run(model, store, cfg, torch.device("cpu"))
    assert (res.views, res.spatial_crops, res.num_videos) == (30, 3, 4)
    assert res.crops_note.startswith("3 crops (auto")
    # the same by an explicit loop over clips and crops, one view at a time
    all_views, centre, preds = [], [], []
    for vid in res.video_ids:
        clips = test_clips(store.num_frames(vid), 10, 2, 2)  # (10, 2)
        logits = np.zeros((10, 3, 2))
        for k in range(10):
            views = store.crop_views(vid, clips[k])  # (T, 3, H, W, C)
            for c in range(3):
                with torch.no_grad():
                    logits[k, c] = model(torch.from_numpy(np.ascontiguousarray(views[:, c]))[None]).numpy()[0]
        all_views.append(logits.reshape(30, 2))
        centre.append(logits[:, 1].mean(0))
        preds.append(int(logits.reshape(30, 2).mean(0).argmax()))
    assert res.predictions == preds
    assert res.centre_predictions == [int(c.argmax()) for c in centre]
    targets = np.array(res.targets)
    assert res.top1 == pytest.approx(np.mean(np.array(preds) == targets))
    assert res.centre_top1 == pytest.approx(np.mean(np.array(res.centre_predictions) == targets))
    # the centre mean of the evaluation: the loop's mean over the centre crops
    got = centre_mean(torch.from_numpy(np.stack(all_views)), 3).numpy()
    np.testing.assert_allclose(got, np.stack(centre), rtol=1e-6, atol=1e-6)
    # a dataset item is laid out (clip, crop) with the stored values (float16 -> float32: exact)
    ds = ViewDataset(store, "test", cfg.eval_cfg["multiview"])
    x, _ = ds[0]
    clips = test_clips(store.num_frames(ds.video_ids[0]), 10, 2, 2)
    for k in (0, 9):
        for c in range(3):
            np.testing.assert_array_equal(x[k * 3 + c].float().numpy(), store.crop_views(ds.video_ids[0], clips[k])[:, c])
    # eval.json keeps both and reads back
    again = type(res).from_json(res.to_json())
    assert (again.centre_top1, again.centre_predictions, again.spatial_crops) == (
        res.centre_top1, res.centre_predictions, 3)
    assert res.summary()["top1_centre"] == res.centre_top1
    # spatial_crops=1 on the same store: the centre-only test, whose predictions are the centre ones
    one = get_evaluation("multiview").run(model, store, _train_cfg(crops_path, tmp_path / "r1", "test.spatial_crops=1"),
                                          torch.device("cpu"))
    assert (one.views, one.spatial_crops, one.centre_top1) == (10, 1, None)
    assert one.predictions == res.centre_predictions
    # auto on a store without crops: 1, and it says why
    plain = get_evaluation("multiview").run(model, open_store(plain_path), _train_cfg(plain_path, tmp_path / "r2"),
                                            torch.device("cpu"))
    assert plain.spatial_crops == 1 and "without test crops" in plain.crops_note
    assert plain.predictions == res.centre_predictions  # same centre features, byte for byte


def test_refusals(corpus: Path, stores, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="test_crops=3 needs geometry=short_side_crop"):
        resolve_extract_config(overrides=["test_crops=3", "geometry=squash"])
    with pytest.raises(ConfigError, match="test_crops: must be 1 .* or 3"):
        resolve_extract_config(overrides=["test_crops=2"])
    with pytest.raises(ConfigError, match="geometry: 'short_side' keeps whole frames"):
        resolve_extract_config(overrides=["geometry=short_side"])
    with pytest.raises(ConfigError, match="spatial_crops must be 1, 3 or 'auto'"):
        from_dict(ViewConfig, {"spatial_crops": 2})
    # crops stored for the val split only: the test videos have none
    store_path = tmp_path / "val.zarr"
    cfg = _cfg(corpus, store_path, test_crop_splits=["val"])
    run_extract(cfg)
    store = open_store(store_path)
    assert not any(store.has_crops(v) for v in store.video_ids)
    tcfg = _train_cfg(store_path, tmp_path / "run", "test.spatial_crops=3")
    with pytest.raises(DataError, match=r"4 of 4 test videos have no stored side crops.*v1, v2, v3, v5.*test_crop_splits"):
        get_evaluation("multiview").preflight(store, tcfg)
    auto = ViewDataset(store, "test", ViewConfig())
    assert auto.crops == 1 and "4 of 4 test videos have no stored crops" in auto.crops_note
    # a rerun into a store with another test_crops is refused before any work
    with pytest.raises(ConfigMismatchError, match="test_crops"):
        run_extract(dataclasses.replace(cfg, test_crops=1))


def test_verify_catches_a_damaged_crop_file(corpus: Path, stores, tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    shutil.copytree(stores[0], path)
    a = zarr.open_array(str(path / "shards" / "00000" / "crop_features"), mode="r+")
    a[7, 1, 0, 0, 0] = 5.0  # a crop rewritten behind the store's back
    problems = verify_store(path)
    # (the marker's file table: the rewritten file has other bytes, here even another size)
    assert any("shards/00000/crop_features/" in p and ("SHA-256" in p or "the marker records" in p)
               for p in problems), problems
    # a cut crop shard file: the reader names it, verify too
    cut = next(p for p in (path / "shards" / "00001" / "crop_features" / "c").rglob("*") if p.is_file())
    cut.write_bytes(cut.read_bytes()[:20])
    assert any("shards/00001/crop_features/" in p for p in verify_store(path))
    with pytest.raises(StoreError, match="crop_features"):
        open_store(path).crop_views("v2", [0])


def test_interrupted_extraction_with_crops_resumes_to_the_same_store(corpus: Path, stores, tmp_path: Path) -> None:
    path = tmp_path / "s.zarr"
    shutil.copytree(stores[0], path)
    marker_path(path, "00001").unlink()  # shard 00001 as a killed run leaves it: data without a marker
    shutil.rmtree(path / "shards" / "00002")
    marker_path(path, "00002").unlink()
    run_extract(_cfg(corpus, path))
    ref, got = open_store(stores[0]), open_store(path)
    for vid in ref.video_ids:
        assert got.has_crops(vid) == ref.has_crops(vid)
        assert np.array_equal(got.stored_features(vid)["features"], ref.stored_features(vid)["features"])
        if ref.has_crops(vid):
            idx = np.arange(ref.num_frames(vid))
            assert np.array_equal(got.stored_crops(vid, idx)["crop_features"], ref.stored_crops(vid, idx)["crop_features"])
    assert verify_store(path) == []


def test_report_shows_the_30_view_and_the_centre_crop_top1_side_by_side(tmp_path: Path) -> None:
    from rich.console import Console

    from tests.test_report import _config, _write_run
    from train.metrics import EvalResult
    from train.report import compare_runs, render_markdown, render_table
    from train.significance import wilson_interval

    with_crops = _write_run(tmp_path, _config("ft-30view"), top1=0.55)
    plain = _write_run(tmp_path, _config("ft-10view", seed=1), top1=0.40)
    res = EvalResult.load(with_crops / "eval.json")
    res.views, res.spatial_crops, res.centre_top1 = 30, 3, 0.45
    res.centre_predictions = [0] * res.num_videos
    res.save(with_crops / "eval.json")
    records = compare_runs([with_crops, plain])
    md = render_markdown(records)
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    # 5 classes: no top-5 column (100 % by construction); both runs have 20 test videos: n is stated once
    assert cols[cols.index("top-1 %") + 1: cols.index("top-1 %") + 3] == ["views", "top-1 centre crop %"]
    assert "top-5 %" not in cols and "**n = 20**" in md
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| ft-")}
    i = cols.index("top-1 %")
    lo, hi = wilson_interval(11, 20)  # 0.55 of 20 videos
    assert rows["ft-30view"][i:i + 3] == [f"55.00 [{100 * lo:.0f}, {100 * hi:.0f}]", "10x3", "45.00"]
    assert rows["ft-10view"][i + 1:i + 3] == ["-", "-"]
    console = Console(record=True, width=250)
    console.print(render_table(records))
    text = console.export_text()
    assert "centre%" in text and "10x3" in text and "45.00" in text
    # without any 30-view run the table is as before
    assert "views" not in render_markdown(compare_runs([plain]))


def test_cli_int8_store_with_test_crops(corpus: Path, tmp_path: Path) -> None:
    """``freezeframe extract --test-crops 3`` on an int8 store (``crop_scales`` too); ``status``
    counts the videos with crops; an int8 test item dequantises every crop like ``crop_views``."""
    from typer.testing import CliRunner

    from freezeframe.cli import app

    store_path = tmp_path / "q.zarr"
    args = ["--debug", "extract", "--manifest", str(corpus), "--store", str(store_path), "--random-weights",
            "--image-size", str(SIZE), "--dtype", "int8", "--test-crops", "3", "--videos-per-shard", "3",
            "--workers", "1", "--device", "cpu", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["status", str(store_path)])
    assert r.exit_code == 0 and "4 video(s) with 3 test crops" in " ".join(r.output.split()), r.output
    g = zarr.open_group(str(store_path / "shards" / "00000"), mode="r")
    assert {"crop_features", "crop_scales"} <= set(g.array_keys())
    store = open_store(store_path)
    ds = ViewDataset(store, "test", from_dict(ViewConfig, {"num_clips": 2, "num_frames": 3, "stride": 1}))
    assert (ds.crops, ds.views) == (3, 6)
    x, _ = ds[1]
    assert x.dtype == torch.float32 and x.shape == (6, 3, 2, 2, 1280)
    clips = test_clips(store.num_frames(ds.video_ids[1]), 2, 3, 1)
    for k in range(2):
        for c in range(3):
            np.testing.assert_array_equal(x[k * 3 + c].numpy(), store.crop_views(ds.video_ids[1], clips[k])[:, c])
    assert verify_store(store_path) == []


@pytest.mark.parametrize("h,w", [(32, 48), (48, 32), (40, 40), (33, 50)])
def test_centre_of_the_short_side_frame_is_the_short_side_crop_frame(h: int, w: int, tmp_path: Path) -> None:
    """``short_side`` keeps the whole scaled frame; its centre box (``test_crop_boxes``) cuts
    exactly the ``short_side_crop`` frame, and the side boxes sit at both ends of the long side."""
    from extract.decode import Geometry, decode_all

    path = make_lossless_video(tmp_path / "v.mp4", pattern_frames(3, h, w, seed=1), 10)
    whole = decode_all(path, geometry=Geometry(size=24, mode="short_side")).frames
    crop = decode_all(path, geometry=Geometry(size=24)).frames
    sh, sw = whole.shape[1:3]
    assert min(sh, sw) == 24 and max(sh, sw) == max(24, round(max(h, w) * 24 / min(h, w)))
    boxes = test_crop_boxes(sw, sh, 24)
    l0, t0, r0, b0 = boxes[1]
    np.testing.assert_array_equal(whole[:, t0:b0, l0:r0], crop)
    first, last = boxes[0], boxes[2]
    if sw > sh:
        assert (first[0], last[2], first[1], last[1]) == (0, sw, 0, 0)
    elif sh > sw:
        assert (first[1], last[3], first[0], last[0]) == (0, sh, 0, 0)
    else:
        assert boxes[0] == boxes[1] == boxes[2]
