"""The embedded default benchmark: small, labelled, deterministic synthetic videos.

``freezeframe synth OUT`` (:func:`write_synthetic`) renders two tasks as real H.264 MP4
files (PyAV, libx264, yuv420p) with one JSONL manifest each::

    OUT/synth.json                                  config + sha256 of every manifest
    OUT/<task>/manifest.jsonl                       pipeline.manifest rows (absolute paths)
    OUT/<task>/README.md                            what the task is
    OUT/<task>/videos/<task>_<split>_<class>_<i:04d>.mp4

Defaults (:class:`SynthConfig`): 128x128 px, 48 frames at 16 fps (3 s), 4 classes x
(24 train + 8 test) videos per task.

The world: a panning window onto a periodic scene
--------------------------------------------------
Every video is a ``size x size`` window that slides over a static, periodic *scene* (a
torus of side ``P = 2 * size`` px): a smooth textured low-saturation background plus 8-12
opaque, textured, outlined, saturated shapes (diameter 25-40 % of the frame side, so an
object spans about one cell of the 4x4 feature grid at 112 px). Frame ``t`` is::

    frame_t[i, j] = scene[(y0 + vy * t + i) mod P, (x0 + vx * t + j) mod P]

with an integer start ``(y0, x0)`` uniform on the torus and an integer velocity
``(vy, vx)`` in px/frame, so everything in view translates by ``-(vy, vx)`` px per frame
(the content moves opposite to the window). Each axis speed is an integer uniform in
``[round(0.02 * size), round(0.04 * size)]`` (3-5 px/frame per axis at 128 px, i.e. 4.2-7.1
px/frame overall; 6-10 px per axis between the frames of a stride-2 clip, less than half a
frame side even at stride 8, so the direction never aliases at the strides the samplers use).
The scene is rendered once and quantised to uint8; the frames are exact integer crops of it.

``motion``: classes differ only in how things move
--------------------------------------------------
Class = direction of the on-screen motion of the content: ``up_left``, ``up_right``,
``down_left``, ``down_right`` (``label = 2 * [moves down] + [moves right]``). The scene, the
start and the per-axis speed magnitudes are drawn from one class-independent distribution
(hue uniform on the colour circle, shape uniform over all shapes); only the signs of the
velocity depend on the label. Why averaging frame features cannot tell the classes apart:

1. *Time reversal (exact).* Reversing a clip with start ``s`` and velocity ``v`` gives the
   clip with start ``s + v (T - 1) mod P`` and velocity ``-v`` (:meth:`PanClip.reversed`).
   The start is uniform on the torus, so that start is uniform too: ``up_left`` videos are
   *exactly* ``down_right`` videos played backwards, with the same probability, and likewise
   ``up_right``/``down_left``. Any function of the *set* of frames (per-frame features
   averaged over time, with or without spatial pooling, and the 1-frame-receptive-field TMM
   ``kt = 1``) has the same distribution for the two classes of a pair. This holds for every
   sub-clip as well (a window of a reversed video is a reversed window), so clip sampling
   does not break it.
2. *Mirror symmetry.* Mirroring a clip left-right (:meth:`PanClip.mirrored`) flips the sign
   of ``vx`` and mirrors the scene; the scene distribution is mirror-invariant (isotropic
   noise, uniform object and texture orientations, mirror-symmetric shape families), so
   ``down_left`` videos are exactly mirrored ``down_right`` videos (over the draw of the
   scenes; with the scene pool of point 5 the scenes are fixed, and the two pairs differ only
   in whether a scene is scanned along one diagonal or the other, which leaves the mean of any
   per-frame statistic unchanged since the start is uniform). Between the two reversal pairs
   the frame sets therefore differ only by a mirror image, and ImageNet CNN features are
   close to mirror-invariant (they were trained with horizontal-flip augmentation).
3. *Why diagonal and not left/right/up/down.* Left/right vs up/down are related by a 90-degree
   rotation, to which CNN features are *not* invariant, and each axis would be special in a
   class-dependent way (e.g. the sub-pixel or border statistics of a purely horizontal pan
   differ along x and y). With diagonal classes the x-trajectory and the y-trajectory of a
   video are independent and have the same distribution in every class (each is a uniform
   start plus an integer speed, and its sign is removed by time reversal), so every
   statistic that is a sum of an x-part and a y-part is exactly class-independent.
4. *No static reference, no border or clipping cue.* The whole field moves (there is no
   static background against which an object's time-averaged position would draw a
   class-dependent streak), the scene is stationary (every window of the torus is
   distributed alike, so no class starts at a border or in the middle), and objects wrap
   around the torus instead of being clipped at a class-dependent border.
5. *A scene pool, balanced over classes.* The motion task draws its scenes from a pool of
   ``MotionTask.scene_pool = 4`` scenes: video ``i`` of *every* class uses scene
   ``i mod 4``, so each scene appears equally often in each class, in the training set
   itself and not only in expectation. A model cannot map "this scene" to a label, and the
   per-video appearance of the train and test sets is exactly balanced.

What remains to tell the classes apart is the *order* of the frames: the direction in
which content moves between consecutive frames, which a model with a temporal receptive
field (TMM ``kt = 3``) can see and an average over time cannot. (The per-frame statistics
that a temporal average *can* use -- colour, texture, object count -- are checked to be
class-independent in ``tests/test_synthetic.py``.) Codec effects (keyframes every second)
depend on the frame index only, the same way in every class.

Measured on frozen ImageNet MobileNetV2 features (4x4x1280 at 112 px) of 4 x (24 + 8)
motion videos (48 frames, a fresh scene per video): time+space average pooling + MLP
scored 16-19 % on the test videos (chance 25 %), and so did an MLP on the time-averaged
4x4 grid (position kept); a hand-written
flow statistic on the same features, ``sign(-sum((f[t+2] - f[t-2]) * grad f[t]))`` per
axis, recovered 99 % of the labels. The direction is in the features; only the order of
the frames carries it.

``appearance``: classes differ in what is seen
----------------------------------------------
Class = object family: ``red_disc``, ``yellow_star``, ``green_square``, ``blue_triangle``
(shape and a hue band of +-11 degrees; saturation, value, size, texture, orientation and
placement random). Background and motion (velocity signs uniform, speeds as in ``motion``)
are drawn from the same distribution for every class, so the task is solvable from any
single frame and an average over time does well.

Determinism
-----------
Video ``i`` of class ``c`` in split ``s`` of task ``k`` is rendered from
``np.random.default_rng(SeedSequence([seed, crc32(k), crc32(s), c, i]))`` and encoded with
libx264 (``crf``, one thread, fixed GOP, no mbtree), so the same config gives
bit-identical files with the same PyAV/FFmpeg build. :func:`write_synthetic` is
idempotent: rerunning it with the same config on a finished output does nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Protocol, Sequence

import numpy as np

from pipeline.config import to_dict
from pipeline.errors import ConfigMismatchError, FreezeframeError
from pipeline.manifest import ManifestRow, manifest_sha256, read_manifest, write_manifest
from pipeline.registry import Registry

if TYPE_CHECKING:
    from rich.progress import Progress

#: Bumped whenever rendering or encoding changes the bytes a config produces.
SYNTH_FORMAT_VERSION = 1

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
    """

    tasks: tuple[str, ...] = ("motion", "appearance")
    train_per_class: int = 24
    test_per_class: int = 8
    frames: int = 48
    size: int = 128
    fps: int = 16
    seed: int = 0
    crf: int = 18

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
        if not 0 <= self.crf <= 51:
            problems.append(f"crf must be in [0, 51] (got {self.crf})")
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise SynthError(f"invalid synthetic benchmark config:\n{lines}")


# --------------------------------------------------------------------------------------
# colour and shapes


def hsv_to_rgb(h: np.ndarray | float, s: np.ndarray | float, v: np.ndarray | float) -> np.ndarray:
    """Vectorised HSV -> RGB; all inputs in [0, 1] (hue in turns). Returns ``(..., 3)`` float."""
    h, s, v = np.broadcast_arrays(np.asarray(h, float), np.asarray(s, float), np.asarray(v, float))
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * h[..., None]) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


@dataclass(frozen=True)
class ShapeKind:
    """A star-shaped outline given by its radius as a function of angle.

    ``radius(phi, q)`` maps angles ``phi`` (radians, object frame) and a shape parameter
    ``q`` to radii in units of the object's outer radius (max 1). ``q`` is drawn uniformly
    from ``q_range`` per object.
    """

    radius: Callable[[np.ndarray, float], np.ndarray]
    q_range: tuple[float, float] = (0.0, 0.0)


def _ellipse(phi: np.ndarray, q: float) -> np.ndarray:
    return q / np.sqrt((q * np.cos(phi)) ** 2 + np.sin(phi) ** 2)


def _polygon(n: int) -> Callable[[np.ndarray, float], np.ndarray]:
    def radius(phi: np.ndarray, q: float) -> np.ndarray:
        sector = 2.0 * math.pi / n
        return math.cos(math.pi / n) / np.cos(np.mod(phi, sector) - math.pi / n)

    return radius


def _star(phi: np.ndarray, q: float) -> np.ndarray:
    return (1.0 + q * np.cos(5.0 * phi)) / (1.0 + q)


#: Shape name -> outline. Every family is mirror-symmetric (see the module docstring).
SHAPES: Registry[ShapeKind] = Registry("shape")
SHAPES.add("disc", ShapeKind(_ellipse, (0.85, 1.0)))
SHAPES.add("ellipse", ShapeKind(_ellipse, (0.5, 0.8)))
SHAPES.add("triangle", ShapeKind(_polygon(3)))
SHAPES.add("square", ShapeKind(_polygon(4)))
SHAPES.add("pentagon", ShapeKind(_polygon(5)))
SHAPES.add("hexagon", ShapeKind(_polygon(6)))
SHAPES.add("star", ShapeKind(_star, (0.25, 0.45)))


@dataclass(frozen=True)
class ObjectStyle:
    """Which objects a scene holds: shape names (uniform choice) and a hue band (turns)."""

    shapes: tuple[str, ...]
    hue: float = 0.0
    hue_halfwidth: float = 0.5  # 0.5: the whole colour circle


def _paint_object(canvas: np.ndarray, rng: np.random.Generator, style: ObjectStyle, size: int) -> None:
    """Alpha-blend one textured, outlined shape into the periodic ``canvas`` (P, P, 3) float.

    The object wraps around the torus; its parameters are all drawn from ``rng``.
    """
    P = canvas.shape[0]
    shape = SHAPES.get(style.shapes[int(rng.integers(len(style.shapes)))])
    q = float(rng.uniform(*shape.q_range))
    R = float(rng.uniform(0.125, 0.2)) * size  # outer radius: diameter 25-40 % of the frame side
    cy, cx = rng.uniform(0.0, P, size=2)
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    hue = (style.hue + rng.uniform(-style.hue_halfwidth, style.hue_halfwidth)) % 1.0
    rgb = hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
    freq = float(rng.uniform(1.5, 4.0)) / (2.0 * R)  # grating: 1.5-4 cycles per diameter
    g_angle = float(rng.uniform(0.0, 2.0 * math.pi))
    g_amp = float(rng.uniform(0.15, 0.35))
    g_phase = float(rng.uniform(0.0, 2.0 * math.pi))
    outline = max(1.0, 0.08 * R)

    h = int(math.ceil(R)) + 2
    iy, ix = int(math.floor(cy)), int(math.floor(cx))
    offs = np.arange(-h, h + 2)
    dy = (iy + offs - cy)[:, None]
    dx = (ix + offs - cx)[None, :]
    rho = np.hypot(dy, dx)
    rr = R * shape.radius(np.arctan2(dy, dx) - angle, q)
    alpha = np.clip(rr - rho + 0.5, 0.0, 1.0)[..., None]
    edge = np.clip(rho - (rr - outline) + 0.5, 0.0, 1.0)[..., None]
    u = dx * math.cos(g_angle) + dy * math.sin(g_angle)
    shade = 1.0 + g_amp * np.sin(2.0 * math.pi * freq * u + g_phase)
    colour = np.clip(rgb * shade[..., None], 0.0, 1.0) * (1.0 - edge) + 0.2 * rgb * edge
    index = np.ix_((iy + offs) % P, (ix + offs) % P)
    canvas[index] = canvas[index] * (1.0 - alpha) + colour * alpha


def _periodic_noise(rng: np.random.Generator, period: int, sigma_px: float) -> np.ndarray:
    """Isotropic Gaussian-filtered white noise on a ``period``-torus, zero mean, unit std."""
    k = np.fft.fftfreq(period)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    field = np.fft.ifft2(np.fft.fft2(rng.standard_normal((period, period)))
                         * np.exp(-2.0 * (math.pi * sigma_px) ** 2 * k2)).real
    return (field - field.mean()) / (field.std() + 1e-12)


def render_scene(rng: np.random.Generator, size: int, style: ObjectStyle) -> np.ndarray:
    """A periodic scene ``(P, P, 3)`` uint8 RGB with ``P = 2 * size``.

    Background: two low-saturation colours mixed by coarse isotropic noise, plus fine grain.
    Objects: 8-12 shapes drawn with ``style`` (see :func:`_paint_object`).
    """
    P = 2 * size
    coarse = _periodic_noise(rng, P, rng.uniform(0.04, 0.1) * size)
    fine = _periodic_noise(rng, P, 0.6)
    hues = rng.uniform(0.0, 1.0, size=2)
    c1 = hsv_to_rgb(hues[0], rng.uniform(0.05, 0.3), rng.uniform(0.15, 0.45))
    c2 = hsv_to_rgb(hues[1], rng.uniform(0.05, 0.3), rng.uniform(0.55, 0.9))
    mix = 0.5 + 0.5 * np.tanh(rng.uniform(0.8, 2.0) * coarse)
    canvas = c1 + (c2 - c1) * mix[..., None] + 0.04 * fine[..., None]
    for _ in range(int(rng.integers(8, 13))):
        _paint_object(canvas, rng, style, size)
    return np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------
# clips and tasks


@dataclass(frozen=True, eq=False)
class PanClip:
    """A window of side ``size`` sliding over a periodic ``scene`` (P, P, 3) uint8.

    ``start`` is the window's top-left corner ``(y0, x0)`` in scene pixels at frame 0 and
    ``velocity`` ``(vy, vx)`` its displacement in px per frame (integers), so the content
    seen moves by ``(-vy, -vx)`` px per frame.
    """

    scene: np.ndarray
    start: tuple[int, int]
    velocity: tuple[int, int]
    frames: int
    size: int

    @property
    def motion(self) -> tuple[int, int]:
        """On-screen displacement of the content ``(dy, dx)`` in px per frame (+y is down)."""
        return (-self.velocity[0], -self.velocity[1])

    def render(self) -> np.ndarray:
        """The frames ``(T, S, S, 3)`` uint8 RGB (exact crops of the scene)."""
        P = self.scene.shape[0]
        t = np.arange(self.frames)[:, None]
        pix = np.arange(self.size)[None, :]
        ys = (self.start[0] + self.velocity[0] * t + pix) % P  # (T, S)
        xs = (self.start[1] + self.velocity[1] * t + pix) % P  # (T, S)
        return self.scene[ys[:, :, None], xs[:, None, :]]

    def reversed(self) -> "PanClip":
        """The clip whose frames are this clip's frames in reverse order."""
        P = self.scene.shape[0]
        last = tuple((s + v * (self.frames - 1)) % P for s, v in zip(self.start, self.velocity))
        return dataclasses.replace(self, start=last, velocity=(-self.velocity[0], -self.velocity[1]))

    def mirrored(self) -> "PanClip":
        """The clip whose every frame is this clip's frame mirrored left-right."""
        P = self.scene.shape[0]
        return dataclasses.replace(
            self,
            scene=np.ascontiguousarray(self.scene[:, ::-1]),
            start=(self.start[0], (-(self.start[1] + self.size)) % P),
            velocity=(self.velocity[0], -self.velocity[1]),
        )


class SyntheticTask(Protocol):
    """A task: class names and a renderer of one labelled video ``(T, S, S, 3)`` uint8."""

    class_names: tuple[str, ...]
    description: str

    def render(self, rng: np.random.Generator, label: int, index: int = 0) -> np.ndarray: ...


def speed_range(size: int) -> tuple[int, int]:
    """Inclusive range of per-axis speeds in px/frame for frames of side ``size`` px."""
    lo = max(1, round(0.02 * size))
    return lo, max(lo, round(0.04 * size))


@functools.lru_cache(maxsize=64)
def _pooled_scene(seed: int, task: str, size: int, k: int, style: ObjectStyle) -> np.ndarray:
    """Scene ``k`` of a task's scene pool (read-only, shared by every video that uses it)."""
    scene = render_scene(video_rng(seed, task, "scene", 0, k), size, style)
    scene.setflags(write=False)
    return scene


@dataclass(frozen=True)
class _PanTask:
    """Shared sampler: a scene, a uniform start on its torus, per-axis speeds.

    Attributes:
        frames: frames per video.
        size: frame side in px.
        seed: base seed of the scene pool (the per-video generator is passed to :meth:`sample`).
        scene_pool: 0 draws a fresh scene for every video; ``K > 0`` makes video ``index``
            of *every* class use scene ``index mod K`` of a fixed pool, so each scene appears
            equally often in every class.
    """

    frames: int = 48
    size: int = 128
    seed: int = 0
    scene_pool: int = 0

    name: ClassVar[str] = ""
    class_names: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def style(self, label: int) -> ObjectStyle:
        raise NotImplementedError

    def motion_signs(self, rng: np.random.Generator, label: int) -> tuple[int, int]:
        """Signs ``(sy, sx)`` of the on-screen motion of the content."""
        raise NotImplementedError

    def _check_label(self, label: int) -> None:
        if not 0 <= label < len(self.class_names):
            raise ValueError(f"label {label} out of range for {len(self.class_names)} classes")

    def sample(self, rng: np.random.Generator, label: int, index: int = 0) -> PanClip:
        """Draw the clip of video ``index`` of class ``label`` (``index`` picks a pooled scene)."""
        self._check_label(label)
        if self.scene_pool:
            scene = _pooled_scene(self.seed, self.name, self.size, index % self.scene_pool, self.style(label))
        else:
            scene = render_scene(rng, self.size, self.style(label))
        P = scene.shape[0]
        start = (int(rng.integers(P)), int(rng.integers(P)))
        lo, hi = speed_range(self.size)
        speed = rng.integers(lo, hi + 1, size=2)
        sy, sx = self.motion_signs(rng, label)
        # the window moves opposite to the content
        return PanClip(scene, start, (-sy * int(speed[0]), -sx * int(speed[1])), self.frames, self.size)

    def render(self, rng: np.random.Generator, label: int, index: int = 0) -> np.ndarray:
        """Frames ``(T, S, S, 3)`` uint8 RGB of video ``index`` of class ``label``."""
        return self.sample(rng, label, index).render()


#: Task name -> task class, constructed as ``TASKS.get(name)(frames=..., size=..., seed=...)``.
TASKS: Registry[Callable[..., SyntheticTask]] = Registry("synthetic task")


@TASKS.register("motion")
@dataclass(frozen=True)
class MotionTask(_PanTask):
    """Classes = direction of the content's motion; appearance is class-independent."""

    scene_pool: int = 4
    name: ClassVar[str] = "motion"
    class_names: ClassVar[tuple[str, ...]] = ("up_left", "up_right", "down_left", "down_right")
    description: ClassVar[str] = (
        "Classes differ only in how things move: the whole textured scene (background and "
        "objects) slides diagonally across the frame, up-left / up-right / down-left / "
        "down-right, wrapping around. Scene, start and speeds come from one class-independent "
        "distribution; classes are time-reversals and mirror images of each other, so the set "
        "of frames of a video carries no class information and averaging frame features over "
        "time should stay at chance (25 %), while a temporal model can read the direction."
    )

    def style(self, label: int) -> ObjectStyle:
        return ObjectStyle(shapes=tuple(SHAPES.names()))

    def motion_signs(self, rng: np.random.Generator, label: int) -> tuple[int, int]:
        return (1 if label >= 2 else -1, 1 if label % 2 else -1)

    @classmethod
    def label_of(cls, motion: Sequence[int]) -> int:
        """Class index of an on-screen displacement ``(dy, dx)`` (both non-zero)."""
        dy, dx = motion
        if dy == 0 or dx == 0:
            raise ValueError(f"motion {tuple(motion)} has no diagonal direction")
        return 2 * int(dy > 0) + int(dx > 0)


@TASKS.register("appearance")
@dataclass(frozen=True)
class AppearanceTask(_PanTask):
    """Classes = object family (shape + hue band); motion is class-independent."""

    name: ClassVar[str] = "appearance"
    class_names: ClassVar[tuple[str, ...]] = ("red_disc", "yellow_star", "green_square", "blue_triangle")
    description: ClassVar[str] = (
        "Classes differ in what is seen: every object in a video belongs to the class's family "
        "(red discs, yellow stars, green squares, blue triangles; hue within +-11 degrees, "
        "random saturation, brightness, size, texture and orientation). Background and motion "
        "(diagonal pan with random signs and speeds) are drawn from one class-independent "
        "distribution, so a single frame suffices and averaging over time does well."
    )
    #: (shape, hue in turns) per class, in ``class_names`` order.
    families: ClassVar[tuple[tuple[str, float], ...]] = (
        ("disc", 0.0), ("star", 0.15), ("square", 0.36), ("triangle", 0.62))

    def style(self, label: int) -> ObjectStyle:
        shape, hue = self.families[label]
        return ObjectStyle(shapes=(shape,), hue=hue, hue_halfwidth=0.03)

    def motion_signs(self, rng: np.random.Generator, label: int) -> tuple[int, int]:
        s = rng.integers(0, 2, size=2) * 2 - 1
        return int(s[0]), int(s[1])


# --------------------------------------------------------------------------------------
# encoding


def encode_h264(frames: np.ndarray, path: str | os.PathLike, fps: int, crf: int = 18) -> Path:
    """Write ``frames`` (T, H, W, 3) uint8 RGB as H.264 yuv420p MP4 at ``fps`` (reproducibly).

    libx264 runs single-threaded with a fixed GOP of ``fps`` frames (a keyframe every second),
    no scene-cut keyframes and no macroblock-tree rate control, so the same frames give the
    same bytes with the same PyAV/FFmpeg build. Frame ``k`` is shown at ``k / fps`` seconds.
    Written to a temporary name first, then renamed.
    """
    import av

    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    T, H, W, _ = frames.shape
    tb = Fraction(1, fps)
    # mbtree=0: with macroblock-tree rate control on, this libx264 build gave different
    # bytes for the same frames from run to run (single-threaded; more often when the heap
    # had been churned, i.e. an uninitialised read), e.g. for 16-frame 64 px clips with a
    # GOP of 8. With it off, 400 churned re-encodes were all identical.
    options = {"crf": str(crf), "preset": "veryfast", "threads": "1", "g": str(fps),
               "keyint_min": str(fps), "sc_threshold": "0", "mbtree": "0"}
    with av.open(str(tmp), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = tb
        stream.codec_context.thread_count = 1
        for k in range(T):
            # explicit, single-threaded RGB -> YUV conversion (swscale's defaults)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[k]), format="rgb24")
            frame = frame.reformat(format="yuv420p", threads=1)
            frame.pts, frame.time_base = k, tb
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------
# writing the benchmark


def video_rng(seed: int, task: str, split: str, label: int, index: int) -> np.random.Generator:
    """The generator of one video, from ``(seed, task, split, label, index)`` only."""
    key = [seed, zlib.crc32(task.encode()), zlib.crc32(split.encode()), label, index]
    return np.random.default_rng(np.random.SeedSequence(key))


@dataclass(frozen=True)
class _Job:
    task: str
    split: str
    label: int
    index: int
    video_id: str
    path: Path


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
        f"Written by `freezeframe synth` (module `manifests.synthetic`, format version "
        f"{SYNTH_FORMAT_VERSION}); see that module's docstring for the design.\n\n"
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


def _write_json(path: Path, d: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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

    _write_json(out / _PARTIAL_JSON, want)
    gens = {task: TASKS.get(task)(frames=cfg.frames, size=cfg.size, seed=cfg.seed) for task in cfg.tasks}
    jobs = {task: _jobs(out, task, gens[task].class_names, cfg) for task in cfg.tasks}
    info: dict[str, dict] = {}
    with _progress_bar(progress) as bar:
        for task in cfg.tasks:
            (out / task / "videos").mkdir(parents=True, exist_ok=True)
            bar_id = bar.add_task(task, total=len(jobs[task]))
            for j in jobs[task]:
                rng = video_rng(cfg.seed, task, j.split, j.label, j.index)
                frames = gens[task].render(rng, j.label, j.index)
                encode_h264(frames, j.path, cfg.fps, cfg.crf)
                bar.advance(bar_id)
    for task in cfg.tasks:
        gen = gens[task]
        rows = [ManifestRow(video_id=j.video_id, path=str(j.path), split=j.split, label=j.label,
                            label_name=gen.class_names[j.label]) for j in jobs[task]]
        write_manifest(rows, manifests[task])
        (out / task / "README.md").write_text(_readme(task, gen, cfg), encoding="utf-8")
        info[task] = {"manifest": f"{task}/manifest.jsonl", "sha256": manifest_sha256(rows),
                      "videos": len(rows), "class_names": list(gen.class_names)}
    _write_json(out / SYNTH_JSON, {**want, "manifests": info, "environment": _environment(environment)})
    (out / _PARTIAL_JSON).unlink(missing_ok=True)
    return manifests


def _environment(environment: Callable[[], dict]) -> dict:
    import av

    env = environment()
    env["ffmpeg"] = {k: ".".join(map(str, v)) for k, v in av.library_versions.items()}
    return env


def _progress_bar(show: bool) -> "Progress":
    """A rich progress bar (one row per task), silent when ``show`` is false."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]synth[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not show)
