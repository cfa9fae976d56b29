"""The embedded synthetic benchmark (synth/): real H.264 files, manifests,
determinism, idempotence, and the properties the demo relies on -- in the motion task only
the order of frames carries the label, in the appearance task a single frame does."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.config import to_dict
from pipeline.errors import FreezeframeError
from pipeline.manifest import manifest_sha256, read_manifest, validate_manifest
from synth.benchmark import SYNTH_JSON, SynthConfig, SynthError, SynthOutputMismatchError, write_synthetic
from synth.encode import encode_h264
from synth.render import TASKS, AppearanceTask, MotionTask, speed_range, video_rng

#: Small enough to write both tasks in about a second.
SMALL = SynthConfig(train_per_class=2, test_per_class=1, frames=16, size=64, fps=8)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("synth") / "bench"
    return out, write_synthetic(out, SMALL, progress=False)


def decode(path: str | Path) -> tuple[np.ndarray, av.video.stream.VideoStream]:
    """All frames ``(T, H, W, 3)`` uint8 RGB of a video, and its stream (closed)."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
    return frames, stream


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def estimate_motion(frames: np.ndarray, max_shift: int) -> tuple[int, int]:
    """On-screen displacement ``(dy, dx)`` px/frame by exhaustive block matching.

    The content of frame ``t + 1`` at ``(i + dy, j + dx)`` equals frame ``t`` at ``(i, j)``;
    the squared error summed over all consecutive pairs is minimised over integer shifts.
    """
    f = frames.astype(np.float64).mean(-1)
    m, S = max_shift, frames.shape[1]
    ref = f[:-1, m:S - m, m:S - m]
    best, arg = np.inf, (0, 0)
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            err = np.mean((f[1:, m + dy:S - m + dy, m + dx:S - m + dx] - ref) ** 2)
            if err < best:
                best, arg = err, (dy, dx)
    return arg


def hue_sat_val(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HSV of uint8 RGB ``(..., 3)``: hue in turns [0, 1), saturation and value in [0, 1]."""
    rgb = frames.astype(np.float64) / 255.0
    mx, mn = rgb.max(-1), rgb.min(-1)
    d = np.where(mx > mn, mx - mn, 1.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    h = np.where(mx == r, (g - b) / d, np.where(mx == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    return (h / 6.0) % 1.0, np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-12), 0.0), mx


def appearance_stats(frames: np.ndarray) -> np.ndarray:
    """Per-frame appearance statistics averaged over time (what a temporal average sees).

    Mean RGB, luminance contrast, gradient energies along x and y and their correlation
    (orientation content), saturated-pixel fraction and an 8-bin hue histogram of saturated
    pixels: ``(16,)``.
    """
    f = frames.astype(np.float64) / 255.0
    lum = f.mean(-1)
    gx = np.diff(lum, axis=2)[:, :-1, :]
    gy = np.diff(lum, axis=1)[:, :, :-1]
    h, s, v = hue_sat_val(frames)
    sat = (s > 0.5) & (v > 0.3)
    hist = [np.mean(sat & (np.floor(h * 8) == k), axis=(1, 2)) for k in range(8)]
    per_frame = np.stack([
        *f.mean(axis=(1, 2)).T, lum.std(axis=(1, 2)), (gx ** 2).mean(axis=(1, 2)),
        (gy ** 2).mean(axis=(1, 2)), (gx * gy).mean(axis=(1, 2)), sat.mean(axis=(1, 2)), *hist,
    ], axis=1)
    return per_frame.mean(axis=0)


def anova_f(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One-way ANOVA F statistic of every column of ``x`` (N, D) across the classes ``y``."""
    classes = np.unique(y)
    grand = x.mean(0)
    between = sum((y == c).sum() * (x[y == c].mean(0) - grand) ** 2 for c in classes) / (len(classes) - 1)
    within = sum(((x[y == c] - x[y == c].mean(0)) ** 2).sum(0) for c in classes) / (len(y) - len(classes))
    return between / np.maximum(within, 1e-30)


def loo_nearest_centroid(x: np.ndarray, y: np.ndarray) -> float:
    """Leave-one-out accuracy of a nearest-class-mean classifier on standardised features."""
    z = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    hits = 0
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        cents = {c: z[keep & (y == c)].mean(0) for c in np.unique(y)}
        pred = min(cents, key=lambda c: float(((z[i] - cents[c]) ** 2).sum()))
        hits += int(pred == y[i])
    return hits / len(y)


def rendered(task_name: str, per_class: int, frames: int = 12, size: int = 48, **kw: int):
    """Render ``per_class`` videos per class (no encoding): (videos, labels, clips)."""
    task = TASKS.get(task_name)(frames=frames, size=size, **kw)
    clips, labels = [], []
    for label in range(len(task.class_names)):
        for i in range(per_class):
            clips.append(task.sample(video_rng(123, task_name, "probe", label, i), label, i))
            labels.append(label)
    return [c.render() for c in clips], np.array(labels), clips


# ---------------------------------------------------------------------------------- files


def test_layout_manifests_and_balance(bench: tuple[Path, dict[str, Path]]) -> None:
    out, manifests = bench
    assert set(manifests) == {"motion", "appearance"}
    record = json.loads((out / SYNTH_JSON).read_text())
    assert record["config"] == to_dict(SMALL)
    for task, manifest in manifests.items():
        assert manifest == out / task / "manifest.jsonl"
        assert "# Synthetic task" in (out / task / "README.md").read_text()
        rows = read_manifest(manifest)
        names = TASKS.get(task).class_names
        validate_manifest(rows, check_files=True, num_classes=len(names))
        assert record["manifests"][task]["sha256"] == manifest_sha256(rows)
        assert len(rows) == len(names) * (SMALL.train_per_class + SMALL.test_per_class)
        for r in rows:
            p = Path(r.path)
            assert p.is_absolute() and p.parent == out / task / "videos"
            assert p.stem == r.video_id and r.video_id.startswith(f"{task}_{r.split}_{names[r.label]}_")
            assert r.label_name == names[r.label]
        per_split = Counter((r.split, r.label) for r in rows)
        assert per_split == {**{("train", k): 2 for k in range(4)}, **{("test", k): 1 for k in range(4)}}


def test_videos_are_real_h264_matching_the_renderer(bench: tuple[Path, dict[str, Path]]) -> None:
    _, manifests = bench
    for task, manifest in manifests.items():
        gen = TASKS.get(task)(frames=SMALL.frames, size=SMALL.size, seed=SMALL.seed)
        for r in read_manifest(manifest):
            frames, stream = decode(r.path)
            assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
            assert frames.shape == (SMALL.frames, SMALL.size, SMALL.size, 3)
            assert stream.average_rate == SMALL.fps
            i = int(r.video_id[-4:])
            want = gen.render(video_rng(SMALL.seed, task, r.split, r.label, i), r.label, i, r.split)
            mse = np.mean((frames.astype(np.float64) - want) ** 2)
            assert 10 * np.log10(255.0 ** 2 / mse) > 28.0, (r.video_id, mse)


def test_same_config_gives_identical_bytes(bench: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    out, _ = bench
    again = write_synthetic(tmp_path / "again", SMALL, progress=False)
    for task, manifest in again.items():
        rows = read_manifest(manifest)
        assert rows and all(
            sha256(Path(r.path)) == sha256(out / task / "videos" / Path(r.path).name) for r in rows
        )


def test_encoder_is_reproducible_whatever_the_heap_holds(tmp_path: Path) -> None:
    # libx264's mbtree rate control read uninitialised memory: the same frames gave different
    # bytes depending on what the heap held. Re-encode one clip with garbage churned between
    # frames (16 frames, GOP 8: the case that failed) and require one single output.
    frames = MotionTask(frames=16, size=64).render(video_rng(0, "motion", "train", 0, 0), 0)
    junk_rng = np.random.default_rng()
    digests = set()
    for rep in range(10):
        junk = [junk_rng.integers(0, 256, size=int(n), dtype=np.uint8).tobytes()
                for n in junk_rng.integers(1_000, 200_000, size=20)]
        del junk
        digests.add(sha256(encode_h264(frames, tmp_path / f"e{rep}.mp4", fps=8)))
    assert len(digests) == 1


def test_rerun_is_a_noop_and_other_configs_are_refused(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, tasks=("motion",), train_per_class=1, test_per_class=0)
    out = tmp_path / "b"
    manifest = write_synthetic(out, cfg, progress=False)["motion"]
    files = sorted(out.rglob("*"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert write_synthetic(out, cfg, progress=False) == {"motion": manifest}
    assert sorted(out.rglob("*")) == files
    assert {p: p.stat().st_mtime_ns for p in files} == stamps

    # a lost video with the same config is simply redone, with the same bytes
    video = Path(read_manifest(manifest)[0].path)
    digest = sha256(video)
    video.unlink()
    write_synthetic(out, cfg, progress=False)
    assert sha256(video) == digest

    other = dataclasses.replace(cfg, seed=1)
    with pytest.raises(SynthOutputMismatchError, match="seed: 0 -> 1.*overwrite"):
        write_synthetic(out, other, progress=False)
    assert sha256(video) == digest  # refused: nothing touched
    write_synthetic(out, other, progress=False, overwrite=True)
    assert json.loads((out / SYNTH_JSON).read_text())["config"]["seed"] == 1
    assert sha256(video) != digest

    foreign = tmp_path / "foreign"
    (foreign / "motion").mkdir(parents=True)
    (foreign / "motion" / "notes.txt").write_text("mine")
    with pytest.raises(SynthOutputMismatchError, match="not written by"):
        write_synthetic(foreign, cfg, progress=False)
    write_synthetic(foreign, cfg, progress=False, overwrite=True)
    assert (foreign / "motion" / "notes.txt").read_text() == "mine"  # overwrite spares foreign files


def test_config_validation() -> None:
    assert SynthConfig(tasks=["motion"]).tasks == ("motion",)  # type: ignore[arg-type]
    with pytest.raises(SynthError, match="even"):
        SynthConfig(size=63)
    with pytest.raises(SynthError, match="choose from appearance, motion"):
        SynthConfig(tasks=("motion", "colour"))
    with pytest.raises(FreezeframeError, match="frames"):
        SynthConfig(frames=1)


# ------------------------------------------------------------------------ motion task


def test_motion_label_is_the_direction_of_displacement(bench: tuple[Path, dict[str, Path]]) -> None:
    _, manifests = bench
    lo, hi = speed_range(SMALL.size)
    for r in read_manifest(manifests["motion"]):
        frames, _ = decode(r.path)
        dy, dx = estimate_motion(frames, max_shift=hi + 1)
        assert lo <= abs(dy) <= hi and lo <= abs(dx) <= hi, (r.video_id, dy, dx)
        assert MotionTask.label_of((dy, dx)) == r.label, (r.video_id, dy, dx)


def test_motion_classes_are_reversals_and_mirrors_of_each_other() -> None:
    task = MotionTask(frames=16, size=64)
    P = 2 * task.size
    for label in range(4):
        clip = task.sample(video_rng(7, "motion", "probe", label, 0), label)
        frames = clip.render()
        assert MotionTask.label_of(clip.motion) == label
        rev = clip.reversed()
        # exactly the reversed frames, from a start that is as likely as any other (uniform)
        # and the opposite velocity: the reversed video *is* a video of the opposite class
        assert np.array_equal(rev.render(), frames[::-1])
        assert all(0 <= s < P for s in rev.start)
        assert MotionTask.label_of(rev.motion) == 3 - label
        mir = clip.mirrored()
        assert np.array_equal(mir.render(), frames[:, :, ::-1])
        assert all(0 <= s < P for s in mir.start)
        assert MotionTask.label_of(mir.motion) == label ^ 1


def test_motion_scenes_are_balanced_over_classes() -> None:
    task = MotionTask(frames=4, size=32, seed=5)
    scenes = {(label, i): task.sample(video_rng(5, "motion", "train", label, i), label, i).scene
              for label in range(4) for i in range(8)}
    for i in range(8):
        # video i of every class shows scene i mod 4 ...
        assert all(np.array_equal(scenes[(0, i)], scenes[(label, i)]) for label in range(4))
        assert np.array_equal(scenes[(0, i)], scenes[(0, i % 4)])
    # ... and the pool holds 4 different scenes, which depend on the seed
    assert len({scenes[(0, k)].tobytes() for k in range(4)}) == 4
    other = MotionTask(frames=4, size=32, seed=6).sample(video_rng(6, "motion", "train", 0, 0), 0, 0)
    assert not np.array_equal(other.scene, scenes[(0, 0)])


@pytest.mark.parametrize("scene_pool", [4, 0])
def test_motion_appearance_is_class_independent(scene_pool: int) -> None:
    # with the default pool of 4 scenes and with a fresh scene for every video
    videos, y, _ = rendered("motion", per_class=24, scene_pool=scene_pool)
    x = np.stack([appearance_stats(v) for v in videos])
    f = anova_f(x, y)
    assert np.nanmax(f) < 5.0, f  # F(3, 92) > 5 has p < 0.003 under no class effect
    assert loo_nearest_centroid(x, y) < 0.45  # chance is 0.25


def test_the_same_statistics_see_the_appearance_classes() -> None:
    # the check above has power: the same statistics separate the appearance task's classes
    videos, y, clips = rendered("appearance", per_class=24)
    x = np.stack([appearance_stats(v) for v in videos])
    assert np.nanmax(anova_f(x, y)) > 50.0
    assert loo_nearest_centroid(x, y) > 0.8
    # ... while its motion carries no label
    by_motion = np.array([MotionTask.label_of(c.motion) for c in clips])
    assert np.mean(by_motion == y) < 0.45


# -------------------------------------------------------------------- appearance task


def test_appearance_label_is_the_dominant_hue(bench: tuple[Path, dict[str, Path]]) -> None:
    _, manifests = bench
    hues = np.array([h for _, h in AppearanceTask.families])
    for r in read_manifest(manifests["appearance"]):
        frames, _ = decode(r.path)
        h, s, v = hue_sat_val(frames)
        sat = (s > 0.5) & (v > 0.3)
        # per frame: share of saturated pixels within 0.06 turns of each class hue; then mean over time
        near = np.abs((h[..., None] - hues + 0.5) % 1.0 - 0.5) < 0.06
        share = (near & sat[..., None]).mean(axis=(1, 2)).mean(axis=0)
        assert int(np.argmax(share)) == r.label, (r.video_id, share)
