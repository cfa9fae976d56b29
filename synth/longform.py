"""The embedded long-form benchmark: minutes-long "movies" made of shots, and a small action task.

``freezeframe synth-longform OUT`` (or :func:`write_longform`) renders real H.264 videos::

    OUT/longform.json                       config + sha256 of both manifests
    OUT/videos/<split>_<i:03d>.mp4          long videos, ``minutes`` each, ``size`` px, ``fps``
    OUT/pretrain.jsonl                      the unlabelled long videos (split "train")
    OUT/actions.jsonl                       labelled short clips: segments [start, end) seconds
                                            of the shots of *other* long videos (train / test)
    OUT/shots.json                          every shot: video, first frame, frames, label, scene

A long video is a sequence of shots with hard cuts between them. A shot is a diagonal pan
over a scene (:class:`synth.render.MotionTask`): its *action* is the motion direction (4
classes: up-left, up-right, down-left, down-right) and its scene comes from a small pool, so
settings and actions recur over the movie and across movies, and consecutive clips of one
shot are near-duplicates (the redundancy that sequential sampling has to cope with).

The action task's clips are ``clip_seconds`` segments from the middle of each shot of the
labelled long videos, labelled with the shot's direction; scenes are shared by all classes,
so only motion tells the classes apart (chance 25 %). Pre-training videos and labelled
videos are disjoint; the labelled ones split into ``train_videos`` and ``test_videos``.

Everything depends on ``(seed, role, index)`` only (:func:`synth.render.video_rng`), so the
same config gives the same files with the same PyAV/FFmpeg build.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import to_dict
from pipeline.errors import FreezeframeError
from pipeline.fileio import atomic_write_json
from pipeline.manifest import ManifestRow, manifest_sha256, write_manifest
from synth.encode import encode_h264
from synth.render import MotionTask, video_rng

__all__ = ["LongformConfig", "Shot", "plan_shots", "render_long_video", "write_longform", "LONGFORM_JSON"]

LONGFORM_JSON = "longform.json"
TASK_NAME = "longform"


class LongformError(FreezeframeError, ValueError):
    """The long-form benchmark config is invalid."""


@dataclass
class LongformConfig:
    """Size of the long-form benchmark (times in seconds, sizes in px).

    Attributes:
        size: frame side; fps: frames per second of the rendered videos.
        seconds: length of each long video.
        pretrain_videos: unlabelled long videos for pre-training.
        train_videos, test_videos: labelled long videos whose shots give the action clips.
        shot_seconds: (min, max) shot length, drawn uniformly per shot.
        scene_pool: scenes shared by every shot of every video (settings recur).
        clip_seconds: length of a labelled action clip (must fit in the shortest shot).
        seed: base seed.
    """

    size: int = 64
    fps: int = 8
    seconds: float = 180.0
    pretrain_videos: int = 4
    train_videos: int = 3
    test_videos: int = 2
    shot_seconds: tuple[float, float] = (3.0, 8.0)
    scene_pool: int = 6
    clip_seconds: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.shot_seconds
        if not 0 < lo <= hi:
            raise LongformError(f"shot_seconds must be 0 < min <= max, got {self.shot_seconds}")
        if not 0 < self.clip_seconds <= lo:
            raise LongformError(f"clip_seconds ({self.clip_seconds}) must be > 0 and fit in the "
                                f"shortest shot ({lo} s)")
        if self.seconds < hi:
            raise LongformError(f"seconds ({self.seconds}) must hold at least one shot of {hi} s")
        for name in ("size", "fps", "scene_pool"):
            if getattr(self, name) < 1:
                raise LongformError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Shot:
    """One shot of a long video: frames ``[first, first + frames)``, action label, scene index."""

    first: int
    frames: int
    label: int
    scene: int


def plan_shots(cfg: LongformConfig, rng: np.random.Generator) -> list[Shot]:
    """Shots filling ``cfg.seconds`` (the last one is cut at the end, but never below the
    minimum shot length: the remainder is added to the previous shot)."""
    total = int(round(cfg.seconds * cfg.fps))
    lo, hi = (int(round(s * cfg.fps)) for s in cfg.shot_seconds)
    shots: list[Shot] = []
    first = 0
    while first < total:
        n = int(rng.integers(lo, hi + 1))
        if total - (first + n) < lo:
            n = total - first
        shots.append(Shot(first, n, int(rng.integers(4)), int(rng.integers(cfg.scene_pool))))
        first += n
    return shots


def render_long_video(cfg: LongformConfig, rng: np.random.Generator) -> tuple[np.ndarray, list[Shot]]:
    """Frames ``(N, size, size, 3)`` uint8 of one long video, and its shots."""
    shots = plan_shots(cfg, rng)
    task = MotionTask(frames=1, size=cfg.size, seed=cfg.seed, scene_pool=cfg.scene_pool)
    parts = []
    for shot in shots:
        clip = dataclasses.replace(task, frames=shot.frames).sample(rng, shot.label, index=shot.scene)
        parts.append(clip.render())
    return np.concatenate(parts), shots


def _videos(cfg: LongformConfig) -> list[tuple[str, str]]:
    """(role, video id) of every long video: pretrain, then train, then test."""
    out = [("pretrain", f"pretrain_{i:03d}") for i in range(cfg.pretrain_videos)]
    out += [("train", f"train_{i:03d}") for i in range(cfg.train_videos)]
    out += [("test", f"test_{i:03d}") for i in range(cfg.test_videos)]
    return out


def write_longform(out: str | Path, cfg: LongformConfig | None = None) -> Path:
    """Render the benchmark into ``out`` (skipped when ``out/longform.json`` has this config).

    Returns ``out``. A different config in an existing ``out`` is refused.
    """
    cfg = cfg or LongformConfig()
    out = Path(out)
    record_path = out / LONGFORM_JSON
    want = json.loads(json.dumps(to_dict(cfg)))  # tuples as lists, as read back
    if record_path.exists():
        have = json.loads(record_path.read_text())
        if have.get("config") != want:
            raise LongformError(f"{out} holds a long-form benchmark with another config; use a new "
                                f"directory or delete {out}")
        return out
    (out / "videos").mkdir(parents=True, exist_ok=True)
    pretrain: list[ManifestRow] = []
    actions: list[ManifestRow] = []
    shots_json: dict[str, list[dict]] = {}
    names = MotionTask.class_names
    clip_frames = int(round(cfg.clip_seconds * cfg.fps))
    for index, (role, vid) in enumerate(_videos(cfg)):
        rng = video_rng(cfg.seed, TASK_NAME, role, 0, index)
        frames, shots = render_long_video(cfg, rng)
        path = encode_h264(frames, out / "videos" / f"{vid}.mp4", cfg.fps)
        shots_json[vid] = [dataclasses.asdict(s) for s in shots]
        if role == "pretrain":
            pretrain.append(ManifestRow(vid, str(path.resolve()), "train"))
            continue
        for k, shot in enumerate(shots):
            first = shot.first + (shot.frames - clip_frames) // 2  # the middle of the shot
            # frame f is shown at f / fps; the segment [start, end) holds exactly clip_frames frames
            start, end = first / cfg.fps, (first + clip_frames) / cfg.fps
            actions.append(ManifestRow(f"{vid}_shot{k:03d}", str(path.resolve()), role, shot.label,
                                       names[shot.label], max(0.0, start - 0.5 / cfg.fps), end - 0.5 / cfg.fps))
    write_manifest(pretrain, out / "pretrain.jsonl")
    write_manifest(actions, out / "actions.jsonl")
    atomic_write_json(out / "shots.json", shots_json)
    atomic_write_json(record_path, {"config": want, "pretrain_sha256": manifest_sha256(pretrain),
                                    "actions_sha256": manifest_sha256(actions)})
    return out
