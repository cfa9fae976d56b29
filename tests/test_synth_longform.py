"""The embedded long-form benchmark (synth/longform.py): shots, real H.264 long videos, action segments."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from extract.decode import Geometry, decode_all
from pipeline.manifest import read_manifest
from synth.longform import LongformConfig, LongformError, plan_shots, render_long_video, write_longform
from synth.render import MotionTask, video_rng

CFG = LongformConfig(size=32, fps=8, seconds=30.0, pretrain_videos=1, train_videos=1, test_videos=1,
                     shot_seconds=(3.0, 6.0), scene_pool=3, clip_seconds=2.0, seed=1)


def test_shots_partition_the_video() -> None:
    for i in range(5):
        shots = plan_shots(CFG, np.random.default_rng(i))
        assert shots[0].first == 0 and sum(s.frames for s in shots) == 240
        assert all(a.first + a.frames == b.first for a, b in zip(shots, shots[1:]))
        assert all(s.frames >= 24 for s in shots)  # never shorter than shot_seconds[0]
        assert all(0 <= s.label < 4 and 0 <= s.scene < 3 for s in shots)


def test_a_shot_is_a_pan_of_its_label_and_cuts_change_content() -> None:
    frames, shots = render_long_video(CFG, video_rng(1, "longform", "train", 0, 0))
    assert frames.shape == (240, 32, 32, 3) and frames.dtype == np.uint8
    assert len({(s.label, s.scene) for s in shots}) > 1
    for s in shots:  # within a shot, frame t+1 is frame t shifted by the shot's motion
        a, b = frames[s.first], frames[s.first + 1]
        shifts = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                  if np.array_equal(np.roll(a, (dy, dx), axis=(0, 1))[4:-4, 4:-4], b[4:-4, 4:-4])]
        assert shifts and all(MotionTask.label_of(d) == s.label for d in shifts)


def test_write_longform(tmp_path) -> None:
    out = write_longform(tmp_path / "lf", CFG)
    pre, act = read_manifest(out / "pretrain.jsonl"), read_manifest(out / "actions.jsonl")
    shots = json.loads((out / "shots.json").read_text())
    assert [r.video_id for r in pre] == ["pretrain_000"] and pre[0].label is None
    full = decode_all(pre[0].path, geometry=Geometry(size=32))
    assert len(full.frames) == 240
    assert np.allclose(np.diff(full.timestamps), 1 / 8)
    assert {r.split for r in act} == {"train", "test"}
    assert len(act) == sum(len(shots[v]) for v in ("train_000", "test_000"))
    assert {r.label for r in act} <= {0, 1, 2, 3}
    for r in act[:4]:
        vid, k = r.video_id.rsplit("_shot", 1)
        shot = shots[vid][int(k)]
        seg = decode_all(r.path, geometry=Geometry(size=32), start=r.start, end=r.end)
        assert len(seg.frames) == 16  # clip_seconds * fps
        first = int(round(seg.timestamps[0] * 8))
        assert shot["first"] <= first and first + 16 <= shot["first"] + shot["frames"]
        assert r.label == shot["label"] and r.label_name == MotionTask.class_names[shot["label"]]
    # the same config: nothing redone; another config: refused
    digest = hashlib.sha256((out / "videos" / "train_000.mp4").read_bytes()).hexdigest()
    write_longform(out, CFG)
    assert hashlib.sha256((out / "videos" / "train_000.mp4").read_bytes()).hexdigest() == digest
    with pytest.raises(LongformError, match="another config"):
        write_longform(out, LongformConfig(size=32, seconds=30.0, seed=2))


def test_bad_config_is_refused() -> None:
    with pytest.raises(LongformError, match="clip_seconds"):
        LongformConfig(shot_seconds=(1.0, 2.0), clip_seconds=2.5)
