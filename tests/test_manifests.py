"""Manifest builders on tiny fixtures written in each dataset's official annotation format.

Video files are empty placeholders (builders only check existence), except inside the
webdataset shards, which hold real H.264 MP4s made with PyAV and decoded back through
fsspec ``tar://`` URLs.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import tarfile
from pathlib import Path
from typing import Callable

import av
import fsspec
import numpy as np
import pytest
from typer.testing import CliRunner

from manifests import (
    BUILDERS,
    ManifestWarning,
    build_from_config,
    build_manifest,
    dataset_config,
    dataset_names,
)
from freezeframe.cli.manifest import app
from pipeline.errors import ManifestError
from pipeline.manifest import ManifestRow, read_manifest, validate_manifest

# --------------------------------------------------------------------------- helpers


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00")
    return path


def write(path: Path, text: str, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline=newline) as f:
        f.write(text)
    return path


def ids(rows: list[ManifestRow]) -> list[str]:
    return [r.video_id for r in rows]


def triples(rows: list[ManifestRow]) -> list[tuple[str, str, int | None, str | None]]:
    return [(r.video_id, r.split, r.label, r.label_name) for r in rows]


def build_error(fmt: str, **options) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        build_manifest(fmt, **options)
    return info.value


def tiny_mp4(n_frames: int = 8, size: int = 32) -> bytes:
    """A real H.264 MP4: ``n_frames`` flat grey frames ``(size, size)``, frame k at level 30*k."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=8)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for k in range(n_frames):
            img = np.full((size, size, 3), 30 * k, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def mp4_bytes() -> bytes:
    return tiny_mp4()


# --------------------------------------------------------------------------- UCF101

UCF_CLASSES = ["ApplyEyeMakeup", "Archery", "HandstandPushups"]


def make_ucf101(tmp: Path) -> dict[str, Path]:
    root, ann = tmp / "UCF-101", tmp / "ucfTrainTestlist"
    # The official lists use Windows line endings.
    write(ann / "classInd.txt", "".join(f"{i} {c}\n" for i, c in enumerate(UCF_CLASSES, 1)), "\r\n")
    train1 = [
        "Archery/v_Archery_g08_c01.avi 2",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1",
        "HandstandPushups/v_HandStandPushups_g08_c01.avi 3",
    ]
    test1 = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "Archery/v_Archery_g01_c01.avi"]
    write(ann / "trainlist01.txt", "\n".join(train1) + "\n", "\r\n")
    write(ann / "testlist01.txt", "\n".join(test1) + "\n", "\r\n")
    write(ann / "trainlist02.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\n", "\r\n")
    write(ann / "testlist02.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi\n", "\r\n")
    for line in train1 + test1:
        touch(root / line.split()[0])
    return {"root": root, "annotations": ann}


def test_ucf101_rows(tmp_path: Path) -> None:
    paths = make_ucf101(tmp_path)
    rows = build_manifest("ucf101", **paths, split_number=1)
    assert triples(rows) == [
        ("v_ApplyEyeMakeup_g08_c01", "train", 0, "ApplyEyeMakeup"),
        ("v_Archery_g08_c01", "train", 1, "Archery"),
        ("v_HandStandPushups_g08_c01", "train", 2, "HandstandPushups"),
        ("v_ApplyEyeMakeup_g01_c01", "test", 0, "ApplyEyeMakeup"),
        ("v_Archery_g01_c01", "test", 1, "Archery"),
    ]
    assert rows[0].path == str(paths["root"] / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.avi")
    assert all(Path(r.path).is_absolute() for r in rows)
    rows2 = build_manifest("ucf101", **paths, split_number=2)
    assert triples(rows2) == [
        ("v_ApplyEyeMakeup_g01_c01", "train", 0, "ApplyEyeMakeup"),
        ("v_ApplyEyeMakeup_g08_c01", "test", 0, "ApplyEyeMakeup"),
    ]
    assert build_manifest("ucf101", **paths) == rows  # deterministic, split 1 by default


def test_ucf101_lists_every_problem(tmp_path: Path) -> None:
    paths = make_ucf101(tmp_path)
    ann = paths["annotations"]
    with open(ann / "trainlist01.txt", "a", encoding="utf-8") as f:
        f.write("ApplyEyeMakeup/v_ApplyEyeMakeup_g11_c01.avi 1\n")  # missing video 1
        f.write("Archery/v_Archery_g12_c01.avi 2\n")  # missing video 2
        f.write("ApplyEyeMakeup/v_ApplyEyeMakeup_g13_c01.avi 9\n")  # unknown label
        f.write("Archery/v_Archery_g08_c02.avi 1\n")  # label says ApplyEyeMakeup
        f.write("this line is malformed\n")
    with open(ann / "testlist01.txt", "a", encoding="utf-8") as f:
        f.write("Bowling/v_Bowling_g01_c01.avi\n")  # class not in classInd
        f.write("Archery/v_Archery_g08_c01.avi\n")  # same video as in train: duplicate id
    err = build_error("ucf101", **paths)
    text = str(err)
    for needle in (
        "v_ApplyEyeMakeup_g11_c01.avi",
        "v_Archery_g12_c01.avi",
        "unknown label 9",
        "folder 'Archery'",
        "'this line is malformed'",
        "unknown label 'Bowling'",
        "duplicate video_id 'v_Archery_g08_c01'",
    ):
        assert needle in text, needle
    assert len(err.problems) == 7, err.problems
    # Problems point at the line (lines 1-3 are the fixture's, then the appended ones).
    assert "trainlist01.txt line 6: unknown label 9" in text
    assert "trainlist01.txt line 8: expected" in text


def test_ucf101_bad_split_number_and_missing_class_index(tmp_path: Path) -> None:
    paths = make_ucf101(tmp_path)
    assert "split_number must be 1, 2 or 3" in str(build_error("ucf101", **paths, split_number=4))
    (paths["annotations"] / "classInd.txt").unlink()
    err = build_error("ucf101", **paths)
    assert err.problems == [f"missing UCF101 class index {str(paths['annotations'] / 'classInd.txt')!r}"]


# --------------------------------------------------------------------------- HMDB51


def make_hmdb51(tmp: Path) -> dict[str, Path]:
    root, ann = tmp / "hmdb51", tmp / "testTrainMulti_7030_splits"
    files = {
        "ride_bike": [("ride_bike_a_0.avi", 1), ("ride_bike_b_0.avi", 2), ("ride_bike_c_0.avi", 0)],
        "brush_hair": [("April_09_brush_hair_u_nm_np1_ba_goo_0.avi", 2), ("brush_hair_x_1.avi", 1)],
    }
    for cls, entries in files.items():
        for n in (1, 2):
            # Official lines end with a space; split 2 swaps train and test.
            lines = [f"{v} {code if n == 1 else {1: 2, 2: 1, 0: 0}[code]} \n" for v, code in entries]
            write(ann / f"{cls}_test_split{n}.txt", "".join(lines))
        for v, _ in entries:
            touch(root / cls / v)
    return {"root": root, "annotations": ann}


def test_hmdb51_rows(tmp_path: Path) -> None:
    paths = make_hmdb51(tmp_path)
    rows = build_manifest("hmdb51", **paths)
    assert triples(rows) == [
        ("brush_hair_x_1", "train", 0, "brush_hair"),
        ("ride_bike_a_0", "train", 1, "ride_bike"),
        ("April_09_brush_hair_u_nm_np1_ba_goo_0", "test", 0, "brush_hair"),
        ("ride_bike_b_0", "test", 1, "ride_bike"),
    ]
    assert rows[0].path == str(paths["root"] / "brush_hair" / "brush_hair_x_1.avi")
    rows2 = build_manifest("hmdb51", **paths, split_number=2, keep_unused=True)
    assert [(r.video_id, r.split) for r in rows2] == [
        ("April_09_brush_hair_u_nm_np1_ba_goo_0", "train"),
        ("ride_bike_b_0", "train"),
        ("brush_hair_x_1", "test"),
        ("ride_bike_a_0", "test"),
        ("ride_bike_c_0", "unused"),
    ]


def test_hmdb51_lists_every_problem(tmp_path: Path) -> None:
    paths = make_hmdb51(tmp_path)
    ann, root = paths["annotations"], paths["root"]
    with open(ann / "ride_bike_test_split1.txt", "a", encoding="utf-8") as f:
        f.write("ride_bike_d_0.avi 7 \n")  # bad code
        f.write("ride_bike_e_0.avi 1 \n")  # missing video
    (root / "brush_hair" / "brush_hair_x_1.avi").unlink()  # missing video
    write(ann / "cartwheel_test_split2.txt", "cartwheel_a.avi 1\n")  # no split-1 file
    err = build_error("hmdb51", **paths)
    text = str(err)
    assert "'ride_bike_d_0.avi 7'" in text
    assert "ride_bike_e_0.avi" in text and "brush_hair_x_1.avi" in text
    assert "'cartwheel' has split files but no cartwheel_test_split1.txt" in text
    assert len(err.problems) == 4, err.problems


# --------------------------------------------------------------------------- Diving48

DIVING_VOCAB = [
    ["Back", "15som", "05Twis", "FREE"],
    ["Back", "15som", "15Twis", "FREE"],
    ["Inward", "25som", "NoTwis", "PIKE"],
]


def make_diving48(tmp: Path) -> dict[str, Path]:
    root, ann = tmp / "rgb", tmp / "annotations"
    train = [
        {"vid_name": "-mmq0PT-u8k_00155", "label": 2, "start_frame": 0, "end_frame": 84},
        {"vid_name": "_8Vy3dlHg2w_00000", "label": 0, "start_frame": 0, "end_frame": 63},
    ]
    test = [{"vid_name": "8_MsT5OHlDk_00112", "label": 1, "start_frame": 0, "end_frame": 40}]
    write(ann / "Diving48_vocab.json", json.dumps(DIVING_VOCAB))
    write(ann / "Diving48_V2_train.json", json.dumps(train))
    write(ann / "Diving48_V2_test.json", json.dumps(test))
    for e in train + test:
        touch(root / f"{e['vid_name']}.mp4")
    return {"root": root, "annotations": ann}


def test_diving48_rows(tmp_path: Path) -> None:
    paths = make_diving48(tmp_path)
    rows = build_manifest("diving48", **paths)
    assert triples(rows) == [
        ("-mmq0PT-u8k_00155", "train", 2, "Inward 25som NoTwis PIKE"),
        ("_8Vy3dlHg2w_00000", "train", 0, "Back 15som 05Twis FREE"),
        ("8_MsT5OHlDk_00112", "test", 1, "Back 15som 15Twis FREE"),
    ]
    assert rows[0].path == str(paths["root"] / "-mmq0PT-u8k_00155.mp4")
    assert all(r.start is None and r.end is None for r in rows)  # clips are already trimmed


def test_diving48_lists_every_problem(tmp_path: Path) -> None:
    paths = make_diving48(tmp_path)
    ann = paths["annotations"]
    test = json.loads((ann / "Diving48_V2_test.json").read_text())
    test += [
        {"vid_name": "aaa_00001", "label": 48},  # unknown label (vocab has 3)
        {"vid_name": "bbb_00002", "label": 0},  # missing video
        {"vid_name": "ccc_00003", "label": 1},  # missing video
        {"label": 1},  # malformed
    ]
    write(ann / "Diving48_V2_test.json", json.dumps(test))
    err = build_error("diving48", **paths)
    text = str(err)
    assert "unknown label 48" in text and "bbb_00002.mp4" in text and "ccc_00003.mp4" in text
    assert "Diving48_V2_test.json entry 4" in text
    assert len(err.problems) == 4, err.problems


# --------------------------------------------------------------------------- Kinetics-400

K_HEADER = ["label", "youtube_id", "time_start", "time_end", "split", "is_cc"]


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def make_kinetics(tmp: Path, extra_val: list[list[object]] = ()) -> dict[str, Path]:
    root, ann = tmp / "k400", tmp / "annotations"
    train = [
        ["air drumming", "--nFuoRV1dM", 25, 35, "train", 0],
        ["abseiling", "-3B32lodo2M", 59, 69, "train", 0],
    ]
    val = [["abseiling", "0wR5jVB-WPk", 417, 427, "val", 0]]
    write_csv(ann / "train.csv", K_HEADER, train)
    write_csv(ann / "validate.csv", K_HEADER[:5], val + list(extra_val))  # no is_cc column
    write_csv(ann / "test.csv", ["youtube_id", "time_start", "time_end", "split"],
              [["a1b2c3d4e5f", 3, 13, "test"]])  # old test CSV: no labels
    # Three layouts at once: <split>/<label_with_underscores>/, <split>/ and flat.
    touch(root / "train" / "air_drumming" / "--nFuoRV1dM_000025_000035.mp4")
    touch(root / "train" / "abseiling" / "-3B32lodo2M_000059_000069.mp4")
    touch(root / "val" / "0wR5jVB-WPk_000417_000427.mp4")
    touch(root / "a1b2c3d4e5f_000003_000013.mp4")
    return {"root": root, "annotations": ann}


def test_kinetics400_rows(tmp_path: Path) -> None:
    paths = make_kinetics(tmp_path)
    rows = build_manifest("kinetics400", **paths)
    assert triples(rows) == [
        ("-3B32lodo2M_000059_000069", "train", 0, "abseiling"),
        ("--nFuoRV1dM_000025_000035", "train", 1, "air drumming"),
        ("0wR5jVB-WPk_000417_000427", "val", 0, "abseiling"),
        ("a1b2c3d4e5f_000003_000013", "test", None, None),
    ]
    root = paths["root"]
    assert rows[1].path == str(root / "train" / "air_drumming" / "--nFuoRV1dM_000025_000035.mp4")
    assert rows[3].path == str(root / "a1b2c3d4e5f_000003_000013.mp4")
    # An explicit class list changes the indices; a split subset drops the others.
    rows = build_manifest("kinetics400", **paths, splits=["val"], classes=["zumba", "abseiling"])
    assert triples(rows) == [("0wR5jVB-WPk_000417_000427", "val", 1, "abseiling")]


def test_kinetics400_missing_and_unknown_listed_then_allow_missing(tmp_path: Path) -> None:
    extra = [
        ["abseiling", "MISSING_one", 0, 10, "val"],
        ["air drumming", "MISSING_two", 5, 15, "val"],
        ["zumba", "zzzzzzzzzzz", 1, 11, "val"],  # not a train class
    ]
    paths = make_kinetics(tmp_path, extra)
    err = build_error("kinetics400", **paths)
    text = str(err)
    assert "MISSING_one_000000_000010.mp4" in text and "MISSING_two_000005_000015.mp4" in text
    assert "unknown label 'zumba'" in text and "--allow-missing" in text
    assert len(err.problems) == 3, err.problems

    write_csv(paths["annotations"] / "validate.csv", K_HEADER[:5],
              [["abseiling", "0wR5jVB-WPk", 417, 427, "val"]] + extra[:2])
    with pytest.warns(ManifestWarning, match=r"dropped 2 row\(s\).*val: 2"):
        rows = build_manifest("kinetics400", **paths, allow_missing=True)
    assert "MISSING_one_000000_000010" not in ids(rows) and len(rows) == 4
    # An explicit layout only looks there: flat finds only the flat test video.
    err = build_error("kinetics400", **paths, layout="flat", allow_missing=False)
    assert sum("missing video file" in p for p in err.problems) == 5


# --------------------------------------------------------------------------- SSv2


def make_ssv2(tmp: Path) -> dict[str, Path]:
    root, ann = tmp / "20bn-something-something-v2", tmp / "labels"
    labels = {"Putting something on a surface": "0", "Holding something next to something": "1"}
    train = [
        {"id": "78687", "label": "holding potato next to vicks vaporub bottle",
         "template": "Holding [something] next to [something]",
         "placeholders": ["potato", "vicks vaporub bottle"]},
        {"id": "42326", "label": "putting a cup on a table",
         "template": "Putting [something] on a surface", "placeholders": ["a cup"]},
    ]
    val = [{"id": "74225", "label": "putting pen on a desk",
            "template": "Putting [something] on a surface", "placeholders": ["pen"]}]
    test = [{"id": "1420"}]
    for name, data in (("labels.json", labels), ("train.json", train),
                       ("validation.json", val), ("test.json", test)):
        write(ann / name, json.dumps(data))
    for e in train + val + test:
        touch(root / f"{e['id']}.webm")
    return {"root": root, "annotations": ann}


def test_ssv2_rows(tmp_path: Path) -> None:
    paths = make_ssv2(tmp_path)
    rows = build_manifest("ssv2", **paths)
    assert triples(rows) == [
        ("42326", "train", 0, "Putting something on a surface"),
        ("78687", "train", 1, "Holding something next to something"),
        ("74225", "val", 0, "Putting something on a surface"),
        ("1420", "test", None, None),
    ]
    assert rows[0].path == str(paths["root"] / "42326.webm")
    assert ids(build_manifest("ssv2", **paths, splits=["val"])) == ["74225"]


def test_ssv2_lists_every_problem(tmp_path: Path) -> None:
    paths = make_ssv2(tmp_path)
    ann = paths["annotations"]
    val = json.loads((ann / "validation.json").read_text())
    val += [
        {"id": "1", "label": "dropping a pen", "template": "Dropping [something]"},  # unknown
        {"id": "2", "label": "x", "template": "Putting [something] on a surface"},  # missing video
        {"id": "3", "label": "no template"},  # malformed
    ]
    write(ann / "validation.json", json.dumps(val))
    err = build_error("ssv2", **paths)
    text = str(err)
    assert "unknown label 'Dropping something'" in text
    assert "2.webm" in text and "missing 'template'" in text
    assert len(err.problems) == 3, err.problems


# --------------------------------------------------------------------------- AVA

AVA_FILES = ["-5KQ66BBWC4.mkv", "053oq2xB3oU.mp4", "_145Aa_xkuE.webm"]


def make_ava(tmp: Path) -> dict[str, Path]:
    root, ann = tmp / "trainval", tmp / "ava"
    write(ann / "ava_file_names_trainval_v2.1.txt", "\n".join(AVA_FILES) + "\n")
    write(ann / "ava_train_v2.2.csv",
          "-5KQ66BBWC4,0902,0.077,0.151,0.283,0.811,80,1\n"
          "-5KQ66BBWC4,0903,0.077,0.151,0.283,0.811,80,1\n"
          "_145Aa_xkuE,1798,0.1,0.1,0.5,0.9,12,0\n")
    write(ann / "ava_val_v2.2.csv", "053oq2xB3oU,0902,0.2,0.1,0.5,0.9,17,3\n")
    for name in AVA_FILES:
        touch(root / name)
    return {"root": root, "annotations": ann}


def test_ava_rows(tmp_path: Path) -> None:
    paths = make_ava(tmp_path)
    rows = build_manifest("ava", **paths)
    assert [(r.video_id, r.split) for r in rows] == [
        ("-5KQ66BBWC4", "trainval"), ("053oq2xB3oU", "trainval"), ("_145Aa_xkuE", "trainval")
    ]
    assert all((r.start, r.end, r.label) == (900.0, 1800.0, None) for r in rows)
    assert rows[2].path == str(paths["root"] / "_145Aa_xkuE.webm")
    rows = build_manifest("ava", **paths, train_csv="ava_train_v2.2.csv", val_csv="ava_val_v2.2.csv")
    assert [(r.video_id, r.split) for r in rows] == [
        ("-5KQ66BBWC4", "train"), ("_145Aa_xkuE", "train"), ("053oq2xB3oU", "val")
    ]
    # The dataset config names those CSVs as defaults.
    assert build_from_config("ava", **paths) == rows


def test_ava_lists_every_problem(tmp_path: Path) -> None:
    paths = make_ava(tmp_path)
    (paths["root"] / "053oq2xB3oU.mp4").unlink()
    with open(paths["annotations"] / "ava_train_v2.2.csv", "a", encoding="utf-8") as f:
        f.write("notInTheList,0902,0.1,0.1,0.5,0.9,12,0\n")
    err = build_error("ava", **paths, train_csv="ava_train_v2.2.csv")
    text = str(err)
    assert "'notInTheList' is in the train CSV but not in" in text
    assert "movie '053oq2xB3oU' is in no given CSV" in text
    assert len(err.problems) == 2, err.problems
    err = build_error("ava", **paths, train_csv="ava_train_v2.2.csv", unassigned="val")
    assert any("053oq2xB3oU.mp4" in p for p in err.problems)  # now kept, hence missing


# --------------------------------------------------------------------------- folder(s)


def test_folder_rows_and_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    for rel in ("b/c/z.webm", "a/x.mp4", "a/y.MKV", "a/notes.txt", "a/.hidden.mp4", "._x.mp4"):
        touch(root / rel)
    rows = build_manifest("folder", root=root, split="val")
    assert [(r.video_id, r.split, r.label) for r in rows] == [
        ("a/x", "val", None), ("a/y", "val", None), ("b/c/z", "val", None)
    ]
    assert rows[1].path == str(root / "a" / "y.MKV")
    touch(root / "a" / "x.avi")
    touch(root / "b" / "c" / "z.mov")
    err = build_error("folder", root=root)
    assert "duplicate video_id 'a/x'" in str(err) and "duplicate video_id 'b/c/z'" in str(err)
    (tmp_path / "empty").mkdir()
    assert "no video files" in str(build_error("folder", root=tmp_path / "empty"))


def test_folder_per_class_layouts(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    for rel in ("dog/2.mp4", "cat/1.mp4", "dog/sub/3.avi"):
        touch(flat / rel)
    rows = build_manifest("folder-per-class", root=flat)
    assert triples(rows) == [
        ("cat/1", "train", 0, "cat"), ("dog/2", "train", 1, "dog"), ("dog/sub/3", "train", 1, "dog")
    ]
    split = tmp_path / "split"
    for rel in ("train/cat/1.mp4", "train/dog/2.mp4", "val/dog/3.mp4", "test/cat/4.mkv"):
        touch(split / rel)
    rows = build_manifest("folder-per-class", root=split)  # layout detected
    assert triples(rows) == [
        ("train/cat/1", "train", 0, "cat"), ("train/dog/2", "train", 1, "dog"),
        ("val/dog/3", "val", 1, "dog"), ("test/cat/4", "test", 0, "cat"),
    ]
    touch(split / "val" / "zebra" / "5.mp4")
    touch(split / "test" / "yak" / "6.mp4")
    touch(split / "train" / "stray.mp4")
    err = build_error("folder-per-class", root=split)
    assert "unknown label 'zebra'" in str(err) and "unknown label 'yak'" in str(err)
    assert "stray.mp4" in str(err) and len(err.problems) == 3
    rows = build_manifest("folder-per-class", root=flat, classes=["dog", "cat"])
    assert [r.label for r in rows] == [1, 0, 0]


# --------------------------------------------------------------------------- webdataset


def decode_all(url: str) -> list[np.ndarray]:
    """Frames ``(H, W, 3)`` uint8 of a video read through fsspec (tar members read in place)."""
    with fsspec.open(url, "rb") as f, av.open(f) as c:
        return [fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)]


def test_webdataset_reads_shards_in_place(tmp_path: Path, mp4_bytes: bytes) -> None:
    meta = lambda **kw: json.dumps(kw).encode()  # noqa: E731
    shard0 = write_tar(tmp_path / "shards" / "00000.tar", {
        "000000000.mp4": mp4_bytes,
        "000000000.json": meta(label=2, label_name="dog", caption="a dog runs on grass"),
        "000000000.txt": b"a dog runs on grass",
        "000000001.mp4": mp4_bytes,
        "000000001.cls": b"1\n",
        "000000001.json": meta(label_name="cat", caption="cute"),
        "000000002.json": meta(status="failed_to_download"),  # no video: skipped
    })
    write_tar(tmp_path / "shards" / "00001.tar", {
        "000010000.mp4": mp4_bytes,
        "000010000.cls": b"2",
        "000010000.json": meta(label_name="dog"),
    })
    rows = build_manifest("webdataset", shards=[tmp_path / "shards"], split="val")
    assert triples(rows) == [
        ("000000000", "val", 2, "dog"), ("000000001", "val", 1, "cat"), ("000010000", "val", 2, "dog")
    ]
    assert rows[0].path == f"tar://000000000.mp4::{shard0}"
    validate_manifest(rows, check_files=True)  # the tar:// URLs exist for fsspec
    for r in rows:
        frames = decode_all(r.path)
        assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
        levels = [float(f.mean()) for f in frames]
        assert np.allclose(levels, [30 * k for k in range(8)], atol=6), levels
    assert not any(p.is_dir() and p.name != "shards" for p in tmp_path.iterdir())  # nothing unpacked
    # A glob pattern selects the same shards.
    assert build_manifest("webdataset", shards=[str(tmp_path / "shards" / "0000*.tar")], split="val") == rows


def test_webdataset_problems_and_string_labels(tmp_path: Path, mp4_bytes: bytes) -> None:
    meta = lambda **kw: json.dumps(kw).encode()  # noqa: E731
    a = write_tar(tmp_path / "a.tar", {
        "k0.mp4": mp4_bytes, "k0.json": meta(label="abseiling"),
        "k1.mp4": mp4_bytes, "k1.json": meta(label="zumba"),
    })
    b = write_tar(tmp_path / "b.tar", {"k2.mp4": mp4_bytes, "k2.json": meta(label="abseiling")})
    rows = build_manifest("webdataset", shards=[a, b])
    assert triples(rows) == [
        ("k0", "train", 0, "abseiling"), ("k1", "train", 1, "zumba"), ("k2", "train", 0, "abseiling")
    ]
    clash = write_tar(tmp_path / "c.tar", {
        "k1.mp4": mp4_bytes,  # key already in a.tar
        "k3.mp4": mp4_bytes, "k3.cls": b"one",  # malformed .cls
        "k4.mp4": mp4_bytes, "k4.cls": b"0", "k4.json": meta(label=3),  # disagree
    })
    (tmp_path / "broken.tar").write_bytes(b"definitely not a tar" * 40)
    err = build_error("webdataset", shards=[a, clash, tmp_path / "broken.tar", tmp_path / "nope*.tar"],
                      classes=["abseiling"])
    text = str(err)
    assert "duplicate video_id 'k1'" in text and "a.tar" in text and "c.tar" in text
    assert "k3.cls: expected an integer" in text and ".cls says 0 but json 'label' says 3" in text
    assert "broken.tar" in text and "nope*.tar" in text
    assert "unknown label 'zumba'" in text
    assert len(err.problems) == 6, err.problems


# --------------------------------------------------------------------------- registry, configs


def test_registry_and_build_manifest_errors() -> None:
    assert BUILDERS.names() == sorted([
        "ava", "diving48", "folder", "folder-per-class", "hmdb51", "kinetics400", "ssv2",
        "ucf101", "webdataset",
    ])
    assert "choose one of" in str(build_error("imagenet"))
    err = build_error("ucf101", root="x", annotations="y", split=1)
    assert "unknown option(s) ['split']" in str(err) and "split_number" in str(err)
    assert "missing required option(s) ['annotations']" in str(build_error("ucf101", root="x"))


def test_dataset_configs_match_builders_and_extract_config() -> None:
    import inspect

    from extract.config import ExtractConfig
    from pipeline.config import from_dict

    names = ["ava", "diving48", "hmdb51", "kinetics400", "ssv2", "ucf101"]
    assert set(names) <= set(dataset_names())
    for name in names:
        cfg = dataset_config(name)
        assert cfg["name"] == name and cfg["format"] in BUILDERS
        params = inspect.signature(BUILDERS.get(cfg["format"])).parameters
        assert set(cfg.get("manifest", {})) <= set(params), name
        extract = from_dict(ExtractConfig, cfg["extract"])  # unknown keys would raise
        assert extract.geometry == "short_side_crop"
    assert dataset_config("ucf101")["manifest"]["split_number"] == 1
    assert "fps" not in dataset_config("ucf101")["extract"]  # null: every native frame
    assert dataset_config("ava")["extract"]["fps"] == 1.0
    assert dataclasses.is_dataclass(ExtractConfig)


# --------------------------------------------------------------------------- CLI

CliCase = Callable[[Path, bytes], tuple[list[str], dict]]


def _cli_cases() -> dict[str, CliCase]:
    def std(maker, fmt, extra_args=(), extra_opts=None):
        def case(tmp: Path, _: bytes) -> tuple[list[str], dict]:
            p = maker(tmp)
            args = [fmt, "--root", str(p["root"]), "--annotations", str(p["annotations"]), *extra_args]
            return args, {"fmt": fmt, **p, **(extra_opts or {})}
        return case

    def folder(tmp: Path, _: bytes):
        touch(tmp / "v" / "a.mp4")
        return ["folder", "--root", str(tmp / "v"), "--split", "test"], {
            "fmt": "folder", "root": tmp / "v", "split": "test"}

    def per_class(tmp: Path, _: bytes):
        touch(tmp / "v" / "train" / "cat" / "a.mp4")
        return ["folder-per-class", "--root", str(tmp / "v")], {"fmt": "folder-per-class", "root": tmp / "v"}

    def wds(tmp: Path, mp4: bytes):
        t = write_tar(tmp / "s.tar", {"x.mp4": mp4, "x.cls": b"0"})
        return ["webdataset", str(t)], {"fmt": "webdataset", "shards": [t]}

    return {
        "ucf101": std(make_ucf101, "ucf101", ["--split-number", "2"], {"split_number": 2}),
        "hmdb51": std(make_hmdb51, "hmdb51", ["--keep-unused"], {"keep_unused": True}),
        "diving48": std(make_diving48, "diving48"),
        "kinetics400": std(make_kinetics, "kinetics400", ["--split", "train", "--split", "val"],
                           {"splits": ["train", "val"]}),
        "ssv2": std(make_ssv2, "ssv2"),
        "ava": std(make_ava, "ava", ["--val-csv", "ava_val_v2.2.csv", "--unassigned", "train"],
                   {"val_csv": "ava_val_v2.2.csv", "unassigned": "train"}),
        "folder": folder,
        "folder-per-class": per_class,
        "webdataset": wds,
    }


@pytest.mark.parametrize("fmt", list(_cli_cases()))
def test_cli_writes_valid_manifest(fmt: str, tmp_path: Path, mp4_bytes: bytes) -> None:
    args, opts = _cli_cases()[fmt](tmp_path, mp4_bytes)
    out = tmp_path / "out" / "manifest.jsonl"
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = read_manifest(out)
    assert rows == build_manifest(opts.pop("fmt"), **opts) and rows
    validate_manifest(rows)
    for split in {r.split for r in rows}:
        assert split in result.output
    assert "wrote" in result.output


def test_cli_error_is_clean_with_exit_code_2(tmp_path: Path) -> None:
    paths = make_ucf101(tmp_path)
    (paths["root"] / "Archery" / "v_Archery_g08_c01.avi").unlink()
    (paths["root"] / "Archery" / "v_Archery_g01_c01.avi").unlink()
    out = tmp_path / "m.jsonl"
    result = CliRunner().invoke(app, ["ucf101", "--root", str(paths["root"]), "--annotations",
                                      str(paths["annotations"]), "--out", str(out)])
    assert result.exit_code == 2
    assert "v_Archery_g08_c01.avi" in result.output and "v_Archery_g01_c01.avi" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_cli_reports_dropped_missing_videos(tmp_path: Path) -> None:
    paths = make_kinetics(tmp_path, [["abseiling", "MISSING_one", 0, 10, "val"]])
    out = tmp_path / "m.jsonl"
    result = CliRunner().invoke(app, ["kinetics400", "--root", str(paths["root"]), "--annotations",
                                      str(paths["annotations"]), "--allow-missing", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "dropped 1 row(s)" in result.output
    assert len(read_manifest(out)) == 4
