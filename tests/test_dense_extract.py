"""Dense extraction at protocol sizes into a real store, then propagation from the store."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.backbones import create_backbone
from extract.dense import DenseExtractConfig, extract_dense, input_size, prepare_frames, read_frame_folder, video_geometry
from manifests.dense import build_dense
from synth.davis import SynthDavisConfig, write_synth_davis
from pipeline.store import open_store
from train.dense.evaluate import GeometryMismatchError, propagate_store, score_results
from train.dense.propagate import PropagationConfig

SYNTH = SynthDavisConfig(val_sequences=2, frames=6, height=96, width=160, seed=2)


def test_size_policies():
    assert input_size("davis", (480, 854), 16) == (480, 880)
    assert input_size("davis", (480, 854), 14) == (476, 868)  # floored to the patch
    assert input_size("jhmdb", (240, 320), 16) == (320, 320)
    assert input_size("vip", (720, 1280), 16) == (448, 880)  # 495 -> floor to 64 = 448
    assert input_size("vip", (1280, 720), 16) == (880, 448)
    assert input_size("native", (96, 160), 32) == (96, 160)


@pytest.fixture(scope="module")
def dense_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dense")
    root = write_synth_davis(tmp / "DAVIS", SYNTH)
    videos = build_dense("davis2017", root=root)
    cfg = DenseExtractConfig(random_weights=True, size_policy="native", dtype="float32", batch_size=4)
    store = extract_dense(videos, tmp / "store.zarr", cfg)
    return tmp, videos, store, cfg


def test_geometry_is_recorded_per_video(dense_store):
    _, videos, store_path, _ = dense_store
    geo = video_geometry(store_path)
    v = videos[1]
    assert geo[v.video_id] == {"frame_size": [96, 160], "input_size": [96, 160], "grid": [3, 5],
                               "frames": list(v.frame_names)}
    stored = open_store(store_path).features(v.video_id)
    assert stored.shape == (6, 3, 5, 1280) and np.isfinite(stored).all()


def test_cached_features_equal_direct_forward_with_the_same_backbone(tmp_path):
    root = write_synth_davis(tmp_path / "DAVIS", SynthDavisConfig(val_sequences=1, frames=3, height=64, width=96))
    (v,) = build_dense("davis2017", root=root)
    bb = create_backbone("mobilenetv2-imagenet", pretrained=False)
    for dtype, tol in (("float32", 1e-6), ("float16", 2e-3)):
        cfg = DenseExtractConfig(random_weights=True, size_policy="native", dtype=dtype)
        store = open_store(extract_dense([v], tmp_path / f"{dtype}.zarr", cfg, backbone=bb))
        with torch.no_grad():
            direct = bb.forward_dense(prepare_frames(np.stack(list(read_frame_folder(v))), bb, (64, 96), "bilinear"))
        got = store.features(v.video_id)
        # float16 storage: relative error of half precision (2^-11) on each value
        assert np.allclose(got, direct.numpy(), rtol=tol, atol=tol * float(direct.abs().max()))


def test_propagate_from_the_store_and_score(dense_store):
    tmp, videos, store_path, _ = dense_store
    out = propagate_store(store_path, videos, tmp / "results", PropagationConfig())
    assert sorted(p.name for p in (out / videos[0].video_id).iterdir()) == [f"{n}.png" for n in videos[0].frame_names]
    scores = score_results("davis2017", videos, out)
    assert set(scores) >= {"J_mean", "F_mean", "JF_mean", "per_sequence"}
    assert 0.0 <= scores["JF_mean"] <= 1.0


def test_store_of_other_frames_is_refused(dense_store, tmp_path):
    _, _, store_path, _ = dense_store
    root = write_synth_davis(tmp_path / "OTHER", SynthDavisConfig(val_sequences=3, frames=5, height=96, width=160))
    other = build_dense("davis2017", root=root)
    with pytest.raises(GeometryMismatchError) as info:
        propagate_store(store_path, other, tmp_path / "r")
    msg = str(info.value)
    assert "synth002: not in the store" in msg and "synth000: the store holds frames" in msg


def test_propagation_is_a_registered_evaluation(dense_store, tmp_path):
    from pipeline.errors import FreezeframeError
    from train.evals import get_evaluation
    from train.evals.propagation import PropagationEvalConfig
    from train.schema import TrainConfig

    tmp, videos, store_path, _ = dense_store
    ev = get_evaluation("propagation")
    root = str(tmp / "DAVIS")
    calls = []

    class Identity(torch.nn.Module):
        def forward(self, x):  # (T, h, w, C) tokens
            calls.append(tuple(x.shape))
            return x

    def run(tokens: str, out: str):
        cfg = TrainConfig(run_dir=str(tmp_path))
        cfg.eval_cfg = {"propagation": PropagationEvalConfig(root=root, store=str(store_path), tokens=tokens, out=out)}
        ev.preflight(open_store(store_path), cfg)
        return ev.run(Identity(), open_store(store_path), cfg, torch.device("cpu"))

    raw = run("raw", str(tmp_path / "raw"))
    assert calls == []
    mapped = run("model", str(tmp_path / "mapped"))
    assert calls == [(6, 3, 5, 1280)] * 2  # the model saw every video's tokens
    assert mapped.to_json()["JF_mean"] == raw.to_json()["JF_mean"]
    assert set(raw.summary()) == {"JF_mean"} and raw.to_json()["benchmark"] == "davis2017"
    cfg = TrainConfig()
    cfg.eval_cfg = {"propagation": PropagationEvalConfig()}
    with pytest.raises(FreezeframeError, match="propagation.root"):
        ev.preflight(open_store(store_path), cfg)


def test_dense_store_status_and_verify(dense_store):
    from pipeline.store import store_status, verify_store

    _, videos, store_path, _ = dense_store
    st = store_status(store_path)
    assert (st.complete_shards, st.planned_shards) == (len(videos), len(videos))
    assert verify_store(store_path) == []


# --------------------------------------------------------------------------- video files


def _pattern_sequence(tmp_path, t_len: int = 5, size: tuple[int, int] = (64, 96)):
    """The same frames as a PNG folder (lossless) and as a lossless video at 24 fps."""
    import dataclasses

    from PIL import Image

    from manifests.dense import DenseVideo
    from tests.videos import make_lossless_video, pattern_frames

    frames = pattern_frames(t_len, *size, seed=4)
    folder = tmp_path / "frames" / "seq"
    folder.mkdir(parents=True)
    paths = []
    for k, f in enumerate(frames):
        paths.append(str(folder / f"{k:05d}.png"))
        Image.fromarray(f).save(paths[-1])
    video_file = make_lossless_video(tmp_path / "seq.mp4", frames, fps=24)
    v = DenseVideo("seq", "val", tuple(paths), labels=(), size=size)
    return frames, v, dataclasses.replace(v, video=str(video_file))


def test_video_file_and_frame_folder_give_the_same_features(tmp_path):
    from extract.dense import iter_video_frames
    from pipeline.store import store_status, verify_store

    frames, from_folder, from_video = _pattern_sequence(tmp_path)
    decoded = np.concatenate([f for f, _ in iter_video_frames(from_video, 24.0, 2)])
    assert np.array_equal(decoded, frames)  # lossless: the decoder gives back the PNG pixels
    bb = create_backbone("mobilenetv2-imagenet", pretrained=False)
    for dtype, rtol in (("float32", 2.0**-23), ("float16", 2.0**-11)):  # one rounding of the storage dtype
        cfg = DenseExtractConfig(random_weights=True, size_policy="native", dtype=dtype, batch_size=2, fps=24.0)
        stores = {}
        for name, v in (("folder", from_folder), ("video", from_video)):
            stores[name] = extract_dense([v], tmp_path / f"{name}-{dtype}.zarr", cfg, backbone=bb)
            assert verify_store(stores[name]) == []
            st = store_status(stores[name])
            assert (st.complete_shards, st.videos_stored, st.frames_stored) == (1, 1, len(frames))
        a, b = (open_store(stores[k]) for k in ("folder", "video"))
        assert a.feature_shape == b.feature_shape == (2, 3, 1280)  # 64 x 96 px / 32
        assert video_geometry(stores["folder"]) == video_geometry(stores["video"])
        fa, fb = a.features("seq"), b.features("seq")
        assert fa.shape == (len(frames), 2, 3, 1280)
        np.testing.assert_allclose(fb, fa, rtol=rtol, atol=rtol * float(np.abs(fa).max()))
        np.testing.assert_allclose(b.timestamps("seq"), np.arange(len(frames)) / 24.0, atol=1e-9)
        np.testing.assert_allclose(a.timestamps("seq"), np.arange(len(frames)) / 24.0, atol=1e-12)
        assert a.content["manifest_sha256"] != b.content["manifest_sha256"]  # the source is part of the content


def test_video_file_with_other_frame_count_is_refused(tmp_path):
    from extract.dense import DenseExtractError

    _, _, from_video = _pattern_sequence(tmp_path, t_len=6)
    cfg = DenseExtractConfig(random_weights=True, size_policy="native", dtype="float32", fps=12.0)
    with pytest.raises(DenseExtractError, match="3 frames from .* at 12 fps, but it has 6 frame names"):
        extract_dense([from_video], tmp_path / "s.zarr", cfg)


def test_with_video_files_reports_every_missing_video(tmp_path):
    from manifests.dense import with_video_files
    from pipeline.errors import ManifestError

    root = write_synth_davis(tmp_path / "DAVIS", SynthDavisConfig(val_sequences=3, frames=2, height=64, width=96))
    videos = build_dense("davis2017", root=root)
    (tmp_path / "vids").mkdir()
    (tmp_path / "vids" / "synth001.mp4").write_bytes(b"")
    with pytest.raises(ManifestError) as info:
        with_video_files(videos, tmp_path / "vids")
    assert [p.split(":")[0] for p in info.value.problems] == ["synth000", "synth002"]
    (tmp_path / "vids" / "synth000.mkv").write_bytes(b"")
    (tmp_path / "vids" / "synth002.mp4").write_bytes(b"")
    got = with_video_files(videos, tmp_path / "vids")
    assert [Path(v.video).name for v in got] == ["synth000.mkv", "synth001.mp4", "synth002.mp4"]
    assert got[0].row().path == got[0].video and got[0].frame_names == videos[0].frame_names
    from manifests.dense import DenseVideo

    assert DenseVideo.from_dict(json.loads(got[0].to_json())) == got[0]  # the manifest line keeps the video


def test_dense_header_records_the_feature_shape(dense_store):
    _, _, store_path, _ = dense_store
    assert open_store(store_path).feature_shape == (3, 5, 1280)


def test_videos_with_different_grids_leave_the_grid_open(tmp_path):
    import dataclasses

    _, v, _ = _pattern_sequence(tmp_path, t_len=2, size=(64, 96))
    root = write_synth_davis(tmp_path / "DAVIS", SynthDavisConfig(val_sequences=1, frames=2, height=96, width=64))
    (w,) = build_dense("davis2017", root=root)
    cfg = DenseExtractConfig(random_weights=True, size_policy="native", dtype="float16")
    store = open_store(extract_dense([v, dataclasses.replace(w, video_id="tall")], tmp_path / "s.zarr", cfg))
    assert store.content["feature_shape"] == [None, None, 1280]
    assert {k: g["grid"] for k, g in video_geometry(store.path).items()} == {"seq": [2, 3], "tall": [3, 2]}
