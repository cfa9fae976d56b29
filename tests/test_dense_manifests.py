"""DAVIS-2017, JHMDB and VIP manifests on fixture folders in each official layout."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from manifests.dense import DenseVideo, build_dense, read_dense_manifest, write_dense_manifest
from manifests.jhmdb import read_joints
from manifests.matfile import MatFileError, read_mat
from pipeline.errors import ManifestError
from pipeline.labels import read_label_png, write_label_png

DATA = Path(__file__).parent / "data"


def jpeg(path: Path, h: int = 24, w: int = 40, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, quality=90)
    return path


def label(path: Path, h: int = 24, w: int = 40, ids: int = 2) -> Path:
    m = np.zeros((h, w), np.uint8)
    for k in range(1, ids + 1):
        m[2 * k : 2 * k + 4, 3 * k : 3 * k + 5] = k
    return write_label_png(path, m)


def davis_root(tmp: Path, seqs: dict[str, int], split: str = "val") -> Path:
    root = tmp / "DAVIS"
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / f"{split}.txt").write_text("".join(f"{s}\n" for s in seqs))
    for seq, n in seqs.items():
        for t in range(n):
            jpeg(root / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg", seed=t)
            label(root / "Annotations" / "480p" / seq / f"{t:05d}.png")
    return root


def problems_of(fmt: str, **options) -> list[str]:
    with pytest.raises(ManifestError) as info:
        build_dense(fmt, **options)
    return info.value.problems


def test_davis_manifest_lists_frames_and_labels(tmp_path):
    root = davis_root(tmp_path, {"bear": 3, "car": 4})
    videos = build_dense("davis2017", root=root, split="val")
    assert [v.video_id for v in videos] == ["bear", "car"]  # ImageSets order
    bear = videos[0]
    assert bear.frame_names == ("00000", "00001", "00002")
    assert bear.label_frames == (0, 1, 2)
    assert bear.labels[1].endswith("Annotations/480p/bear/00001.png")
    assert bear.size == (24, 40)
    assert bear.label_kind == "davis-objects"
    assert bear.row().path == str(root / "JPEGImages" / "480p" / "bear") and bear.row().split == "val"
    assert bear.label_for(2) == bear.labels[2]
    # labels are palette PNGs of ids
    assert Image.open(bear.labels[0]).mode == "P"
    assert set(np.unique(read_label_png(bear.labels[0]))) == {0, 1, 2}
    out = write_dense_manifest(videos, tmp_path / "davis.jsonl")
    assert read_dense_manifest(out) == videos


def test_davis_test_dev_needs_only_the_first_annotation(tmp_path):
    root = davis_root(tmp_path, {"seq": 3}, split="test-dev")
    for t in (1, 2):
        (root / "Annotations" / "480p" / "seq" / f"{t:05d}.png").unlink()
    (v,) = build_dense("davis2017", root=root, split="test-dev")
    assert v.label_frames == (0,) and v.label_for(1) is None


def test_davis_problems_are_reported_together(tmp_path):
    root = davis_root(tmp_path, {"a": 3, "b": 3, "c": 3, "d": 3})
    listing = root / "ImageSets" / "2017" / "val.txt"
    listing.write_text(listing.read_text() + "a\nghost\n")
    (root / "Annotations" / "480p" / "a" / "00001.png").unlink()  # frame without annotation
    label(root / "Annotations" / "480p" / "b" / "00009.png")  # annotation without frame
    label(root / "Annotations" / "480p" / "c" / "00002.png", h=20)  # wrong size
    (root / "Annotations" / "480p" / "d" / "00000.png").unlink()  # first frame unannotated
    found = "\n".join(problems_of("davis2017", root=root))
    assert "'a' is listed 2 times" in found
    assert "ghost: missing frames folder" in found
    assert "a: 1 frame(s) without annotation (00001.jpg)" in found
    assert "b: annotation 00009.png has no frame 00009.jpg" in found
    assert "c: annotation 00002.png is 40x20, its frame 40x24" in found
    assert "d: the first frame 00000.jpg has no annotation" in found


def test_davis_bad_options_and_missing_list(tmp_path):
    with pytest.raises(ManifestError, match="split must be one of"):
        build_dense("davis2017", root=tmp_path, split="dev")
    with pytest.raises(ManifestError, match="unknown option"):
        build_dense("davis2017", root=tmp_path, year=2017)
    with pytest.raises(ManifestError, match=r"davis2017: missing required option\(s\) \['root'\]"):
        build_dense("davis2017", split="val")  # the same option check as build_manifest
    with pytest.raises(ManifestError, match="unknown dense benchmark format 'davis'; choose one of: davis2017, jhmdb, vip"):
        build_dense("davis", root=tmp_path)
    assert any("missing DAVIS sequence list" in p for p in problems_of("davis2017", root=tmp_path))


def test_read_mat_equals_scipy_written_files():
    """Both files were written by scipy.io.savemat (v5 uncompressed and v7 compressed)."""
    t = np.arange(4)
    want = np.zeros((2, 15, 4))
    for j in range(15):
        want[0, j] = 10.5 + j * 3 + t
        want[1, j] = 20.25 + j * 2 - t
    for name in ("jhmdb_v5.mat", "jhmdb_v7.mat"):
        d = read_mat(DATA / name)
        assert np.array_equal(d["pos_img"], want)
        assert np.array_equal(d["pos_world"], want / 100)
        assert d["scale"].shape == (1, 4) and np.allclose(d["scale"][0], np.linspace(1.0, 1.5, 4))
        assert d["viewpoint"] == "E"
        assert d["small"].dtype == np.int16 and d["small"].tolist() == [[1, 2], [3, 4]]


def test_read_mat_refuses_hdf5_and_garbage(tmp_path):
    h5 = tmp_path / "v73.mat"
    h5.write_bytes(b"MATLAB 7.3 MAT-file".ljust(512, b" ") + b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(MatFileError, match="7.3"):
        read_mat(h5)
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"x" * 200)
    with pytest.raises(MatFileError, match="not a level-5"):
        read_mat(junk)
    with pytest.raises(MatFileError, match="missing"):
        read_mat(tmp_path / "none.mat")


def jhmdb_root(tmp: Path, videos: dict[str, tuple[int, str]]) -> Path:
    """videos: name -> (frames, code) of class 'walk'; every video gets the 4-frame MAT-file."""
    root = tmp / "JHMDB"
    (root / "splits").mkdir(parents=True)
    (root / "splits" / "walk_test_split1.txt").write_text("".join(f"{n}.avi {c} \n" for n, (_, c) in videos.items()))
    for name, (n, _) in videos.items():
        for t in range(n):
            jpeg(root / "Rename_Images" / "walk" / name / f"{t + 1:05d}.png", seed=t)
        dst = root / "joint_positions" / "walk" / name / "joint_positions.mat"
        dst.parent.mkdir(parents=True)
        shutil.copy(DATA / "jhmdb_v7.mat", dst)
    return root


def test_jhmdb_manifest_and_joints(tmp_path):
    root = jhmdb_root(tmp_path, {"v1": (4, "2"), "v2": (4, "1"), "v3": (4, "2")})
    videos = build_dense("jhmdb", root=root)
    assert [v.video_id for v in videos] == ["walk/v1", "walk/v3"]  # test videos of split 1
    v = videos[0]
    assert v.label_kind == "jhmdb-joints" and v.labels[0].endswith("walk/v1/joint_positions.mat")
    assert v.frame_names == ("00001", "00002", "00003", "00004")
    j = read_joints(v.labels[0])
    assert j.shape == (4, 15, 2)
    assert j[2, 1].tolist() == [10.5 + 3 + 2 - 1, 20.25 + 2 - 2 - 1]  # 0-based pixels
    assert [x.video_id for x in build_dense("jhmdb", root=root, split="train")] == ["walk/v2"]


def test_jhmdb_frame_count_mismatch_and_missing_are_reported(tmp_path):
    root = jhmdb_root(tmp_path, {"short": (3, "2"), "gone": (4, "2")})
    shutil.rmtree(root / "Rename_Images" / "walk" / "gone")
    found = "\n".join(problems_of("jhmdb", root=root))
    assert "walk/short: joint_positions.mat has joints for 4 frames, the folder holds 3" in found
    assert "walk/gone: missing frames folder" in found


def vip_root(tmp: Path, videos: dict[str, int]) -> Path:
    root = tmp / "VIP_Fine"
    (root / "lists").mkdir(parents=True)
    (root / "lists" / "val_videos.txt").write_text("".join(f"{n}\n" for n in videos))
    for name, n in videos.items():
        for t in range(n):
            jpeg(root / "Images" / name / f"{t * 5 + 1:012d}.jpg", seed=t)
            p = root / "Annotations" / "Category_ids" / name / f"{t * 5 + 1:012d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((24, 40), t % 20, np.uint8)).save(p)  # grey ids
    return root


def test_vip_manifest_and_problems(tmp_path):
    root = vip_root(tmp_path, {"videos1": 3, "videos2": 2})
    videos = build_dense("vip", root=root)
    assert [v.video_id for v in videos] == ["videos1", "videos2"]
    assert videos[0].label_frames == (0, 1, 2) and videos[0].label_kind == "vip-parts"
    assert read_label_png(videos[0].labels[2]).max() == 2  # grey PNG of ids
    (root / "Annotations" / "Category_ids" / "videos2" / f"{6:012d}.png").unlink()
    found = "\n".join(problems_of("vip", root=root))
    assert "videos2: 1 frame(s) without label" in found
    assert len(build_dense("vip", root=root, require_all_labels=False)[1].labels) == 1


def test_dense_manifest_reports_malformed_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    good = DenseVideo("a", "val", ("/x/0.jpg",), ("/y/0.png",), (0,))
    p.write_text(good.to_json() + "\n" + '{"video_id": "b"}\n' + '{"video_id": "c", "frames": [], "labels": [], "label_kind": "x"}\n')
    with pytest.raises(ManifestError) as info:
        read_dense_manifest(p)
    assert len(info.value.problems) == 2
