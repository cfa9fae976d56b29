"""The synthetic benchmark on disk: :class:`SynthConfig` and :func:`write_synthetic`.

``freezeframe synth OUT`` renders each task as real H.264 MP4 files with one JSONL
manifest::

    OUT/synth.json                                  config + sha256 of every manifest
    OUT/<task>/manifest.jsonl                       pipeline.manifest rows (absolute paths)
    OUT/<task>/README.md                            what the task is
    OUT/<task>/videos/<task>_<split>_<class>_<i:04d>.mp4

Video ``i`` of class ``c`` in split ``s`` of task ``k`` depends on
``(seed, k, s, c, i)`` only (:func:`synth.render.video_rng`), so the same config gives
bit-identical files with the same PyAV/FFmpeg build. Design notes: ``docs/synthetic.md``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from pipeline.config import to_dict
from pipeline.errors import ConfigMismatchError, FreezeframeError
from pipeline.fileio import atomic_write_json, atomic_write_text
from pipeline.manifest import ManifestRow, manifest_sha256, read_manifest, write_manifest
from synth.encode import encode_h264
from synth.render import TASKS, SyntheticTask, video_rng

if TYPE_CHECKING:
    from rich.progress import Progress

#: Bumped whenever rendering or encoding changes the bytes a config produces.
SYNTH_FORMAT_VERSION = 2  # 2: test videos of pooled-scene tasks use a disjoint scene pool

SYNTH_JSON = "synth.json"
_PARTIAL_JSON = ".synth-partial.json"
SPLITS: tuple[str, ...] = ("train", "test")


class SynthError(FreezeframeError):
    """The synthetic-benchmark config is invalid."""


class SynthOutputMismatchError(ConfigMismatchError):
    """OUT already holds a synthetic benchmark (or other files) made with another config."""


# --------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class SynthConfig:
    """What :func:`write_synthetic` renders.

    Attributes:
        tasks: task names from :data:`TASKS` (``motion``, ``appearance``).
        train_per_class: training videos per class.
        test_per_class: test videos per class (0: no test split).
        frames: frames per video (a video lasts ``frames / fps`` seconds).
        size: frame side in pixels (square frames, even, >= 32).
        fps: frame rate in frames per second (only the timestamps depend on it).
        seed: non-negative base seed.
        crf: libx264 constant rate factor (0 = lossless luma, 18 = visually lossless).
        scene_pool: scenes per pool of the pooled-scene tasks (motion); None = the task's
            default (4). Tasks that draw a fresh scene per video (appearance) ignore it.
        disjoint_test_scenes: test videos of pooled-scene tasks show scenes of a second pool
            that no training video shows (False: the same pool as training, format 1).
    """

    tasks: tuple[str, ...] = ("motion", "appearance")
    train_per_class: int = 24
    test_per_class: int = 8
    frames: int = 48
    size: int = 128
    fps: int = 16
    seed: int = 0
    crf: int = 18
    scene_pool: int | None = None
    disjoint_test_scenes: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            object.__setattr__(self, "tasks", (self.tasks,))
        else:
            object.__setattr__(self, "tasks", tuple(self.tasks))
        problems: list[str] = []
        if not self.tasks:
            problems.append("tasks is empty; choose from " + ", ".join(TASKS.names()))
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            problems.append(f"unknown task(s) {unknown}; choose from {', '.join(TASKS.names())}")
        if len(set(self.tasks)) != len(self.tasks):
            problems.append(f"tasks {list(self.tasks)} has duplicates")
        if self.train_per_class < 1:
            problems.append(f"train_per_class must be >= 1 (got {self.train_per_class})")
        if self.test_per_class < 0:
            problems.append(f"test_per_class must be >= 0 (got {self.test_per_class})")
        if self.frames < 2:
            problems.append(f"frames must be >= 2 (got {self.frames})")
        if self.size < 32 or self.size % 2:
            problems.append(f"size must be even and >= 32 px (yuv420p needs even sides; got {self.size})")
        if self.fps < 1:
            problems.append(f"fps must be >= 1 (got {self.fps})")
        if self.seed < 0:
            problems.append(f"seed must be >= 0 (got {self.seed})")
        if self.scene_pool is not None and self.scene_pool < 1:
            problems.append(f"scene_pool must be >= 1 or None (got {self.scene_pool})")
        if not 0 <= self.crf <= 51:
            problems.append(f"crf must be in [0, 51] (got {self.crf})")
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise SynthError(f"invalid synthetic benchmark config:\n{lines}")



# --------------------------------------------------------------------------------------
# writing the benchmark


@dataclass(frozen=True)
class _Job:
    task: str
    split: str
    label: int
    index: int
    video_id: str
    path: Path


def make_task(name: str, cfg: SynthConfig) -> SyntheticTask:
    """The renderer of task ``name`` as ``cfg`` configures it (size, frames, seed, scene pools)."""
    factory = TASKS.get(name)
    kw: dict = {"frames": cfg.frames, "size": cfg.size, "seed": cfg.seed,
                "disjoint_test_scenes": cfg.disjoint_test_scenes}
    if cfg.scene_pool is not None and getattr(factory, "scene_pool", 0):
        kw["scene_pool"] = cfg.scene_pool
    return factory(**kw)


def _jobs(out: Path, task: str, class_names: Sequence[str], cfg: SynthConfig) -> list[_Job]:
    counts = {"train": cfg.train_per_class, "test": cfg.test_per_class}
    jobs = []
    for split in SPLITS:
        for label, name in enumerate(class_names):
            for i in range(counts[split]):
                vid = f"{task}_{split}_{name}_{i:04d}"
                jobs.append(_Job(task, split, label, i, vid, out / task / "videos" / f"{vid}.mp4"))
    return jobs


def _record(cfg: SynthConfig) -> dict:
    return {"format_version": SYNTH_FORMAT_VERSION, "config": to_dict(cfg)}


def _readme(task: str, gen: SyntheticTask, cfg: SynthConfig) -> str:
    classes = "\n".join(f"| {i} | `{n}` |" for i, n in enumerate(gen.class_names))
    seconds = cfg.frames / cfg.fps
    return (
        f"# Synthetic task `{task}`\n\n{gen.description}\n\n"
        f"Written by `freezeframe synth` (package `synth`, format version "
        f"{SYNTH_FORMAT_VERSION}); see `docs/synthetic.md` in the repository for the design.\n\n"
        f"- {cfg.size}x{cfg.size} px, {cfg.frames} frames at {cfg.fps} fps ({seconds:g} s), "
        f"H.264 yuv420p crf {cfg.crf}\n"
        f"- {cfg.train_per_class} train + {cfg.test_per_class} test videos per class, seed {cfg.seed}\n"
        f"- `manifest.jsonl`: one row per video (video_id, absolute path, split, label, label_name)\n\n"
        f"| label | class |\n|---|---|\n{classes}\n"
    )


def _manifests_intact(out: Path, record: dict) -> bool:
    """True if every manifest listed in ``record`` exists, hashes right and its videos exist."""
    try:
        for task, info in record["manifests"].items():
            rows = read_manifest(out / task / "manifest.jsonl")
            if manifest_sha256(rows) != info["sha256"]:
                return False
            if not all(os.path.isfile(r.path) for r in rows):
                return False
    except (OSError, KeyError, TypeError, FreezeframeError):
        return False
    return True


def _config_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


def _remove_outputs(out: Path, tasks: Sequence[str]) -> None:
    """Delete only what :func:`write_synthetic` writes, for ``tasks``."""
    for task in tasks:
        videos = out / task / "videos"
        if videos.is_dir():
            for p in videos.iterdir():
                if p.suffix in (".mp4", ".tmp") and p.is_file():
                    p.unlink()
            if not any(videos.iterdir()):
                videos.rmdir()
        for name in ("manifest.jsonl", "manifest.jsonl.tmp", "README.md"):
            (out / task / name).unlink(missing_ok=True)
        if (out / task).is_dir() and not any((out / task).iterdir()):
            (out / task).rmdir()
    for name in (SYNTH_JSON, _PARTIAL_JSON):
        (out / name).unlink(missing_ok=True)


def _load_json(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def _check_existing(out: Path, want: dict, cfg: SynthConfig, overwrite: bool) -> bool:
    """Decide what to do with an existing OUT. Returns True if it is already complete."""
    done = _load_json(out / SYNTH_JSON)
    old = done or _load_json(out / _PARTIAL_JSON)
    if old is not None and {k: old.get(k) for k in want} == want:
        return done is not None and _manifests_intact(out, done)
    old_tasks = list((old or {}).get("config", {}).get("tasks", []))
    if old is not None:
        if not overwrite:
            diff = _config_diff(old.get("config", {}), want["config"])
            if old.get("format_version") != SYNTH_FORMAT_VERSION:
                diff = (f"format_version: {old.get('format_version')!r} -> {SYNTH_FORMAT_VERSION}"
                        + (f", {diff}" if diff else ""))
            raise SynthOutputMismatchError(
                f"{out} already holds a synthetic benchmark made with another config ({diff}). "
                "Write into another folder, or pass overwrite=True (CLI: --overwrite) to replace it."
            )
    else:
        foreign = [t for t in cfg.tasks if (out / t).exists() and (not (out / t).is_dir() or any((out / t).iterdir()))]
        if foreign and not overwrite:
            raise SynthOutputMismatchError(
                f"{out} has non-empty folder(s) {foreign} but no {SYNTH_JSON}: it was not written by "
                "`freezeframe synth`. Choose an empty or new folder, or pass overwrite=True "
                "(CLI: --overwrite) to replace the videos, manifest and README in them."
            )
    _remove_outputs(out, sorted(set(old_tasks) | set(cfg.tasks)))
    return False


def write_synthetic(
    out: str | os.PathLike,
    cfg: SynthConfig = SynthConfig(),
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Render the benchmark into ``out``; returns ``{task: manifest path}``.

    Idempotent: when ``out/synth.json`` records the same config and the manifests and videos
    are intact, nothing is written. An interrupted run with the same config is redone. Any
    other config (or foreign files in the task folders) raises
    :class:`SynthOutputMismatchError` unless ``overwrite`` is set, which deletes the previous
    benchmark's videos, manifests and READMEs first (nothing else).
    """
    from pipeline.provenance import environment

    out = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
    want = _record(cfg)
    manifests = {task: out / task / "manifest.jsonl" for task in cfg.tasks}
    out.mkdir(parents=True, exist_ok=True)
    if _check_existing(out, want, cfg, overwrite):
        return manifests

    atomic_write_json(out / _PARTIAL_JSON, want, sort_keys=True)
    gens = {task: make_task(task, cfg) for task in cfg.tasks}
    jobs = {task: _jobs(out, task, gens[task].class_names, cfg) for task in cfg.tasks}
    info: dict[str, dict] = {}
    with _progress_bar(progress) as bar:
        for task in cfg.tasks:
            (out / task / "videos").mkdir(parents=True, exist_ok=True)
            bar_id = bar.add_task(task, total=len(jobs[task]))
            for j in jobs[task]:
                rng = video_rng(cfg.seed, task, j.split, j.label, j.index)
                frames = gens[task].render(rng, j.label, j.index, j.split)
                encode_h264(frames, j.path, cfg.fps, cfg.crf)
                bar.advance(bar_id)
    for task in cfg.tasks:
        gen = gens[task]
        rows = [ManifestRow(video_id=j.video_id, path=str(j.path), split=j.split, label=j.label,
                            label_name=gen.class_names[j.label]) for j in jobs[task]]
        write_manifest(rows, manifests[task])
        atomic_write_text(out / task / "README.md", _readme(task, gen, cfg))
        info[task] = {"manifest": f"{task}/manifest.jsonl", "sha256": manifest_sha256(rows),
                      "videos": len(rows), "class_names": list(gen.class_names)}
    atomic_write_json(out / SYNTH_JSON, {**want, "manifests": info, "environment": _environment(environment)},
                      sort_keys=True)
    (out / _PARTIAL_JSON).unlink(missing_ok=True)
    return manifests


def _environment(environment: Callable[[], dict]) -> dict:
    import av  # lazy: PyAV is only needed when writing (keeps `import synth` light)

    env = environment()
    env["ffmpeg"] = {k: ".".join(map(str, v)) for k, v in av.library_versions.items()}
    return env


def _progress_bar(show: bool) -> "Progress":
    """A rich progress bar (one row per task), silent when ``show`` is false."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]synth[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not show)
