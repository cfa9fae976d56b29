"""Synthetic scenes, textures and motion: what a video of each synthetic task shows.

A video is a ``size x size`` window sliding at an integer velocity (px/frame) over a static
periodic scene (``(P, P, 3)`` uint8, ``P = 2 * size``). :data:`TASKS` holds the two tasks
(``motion``: classes = direction of motion; ``appearance``: classes = object family). The
design and why average pooling cannot solve ``motion``: ``docs/synthetic.md``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol, Sequence

import numpy as np

from pipeline.registry import Registry


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


#: Shape name -> outline. Every family is mirror-symmetric (see docs/synthetic.md).
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

    def render(self, rng: np.random.Generator, label: int, index: int = 0, split: str = "train") -> np.ndarray: ...


def speed_range(size: int) -> tuple[int, int]:
    """Inclusive range of per-axis speeds in px/frame for frames of side ``size`` px."""
    lo = max(1, round(0.02 * size))
    return lo, max(lo, round(0.04 * size))


@functools.lru_cache(maxsize=64)
def _pooled_scene(seed: int, task: str, size: int, k: int, style: ObjectStyle, pool: int = 0) -> np.ndarray:
    """Scene ``k`` of a task's scene pool ``pool`` (0: training / shared pool, 1: the disjoint
    test pool); read-only, shared by every video that uses it."""
    scene = render_scene(video_rng(seed, task, "scene", pool, k), size, style)
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
        disjoint_test_scenes: with a scene pool, videos of every split other than ``train``
            draw from a second pool of ``scene_pool`` scenes that no training video shows, so a
            test accuracy measures generalisation to unseen scenes (False: one pool for all
            splits, the format-1 behaviour).
    """

    frames: int = 48
    size: int = 128
    seed: int = 0
    scene_pool: int = 0
    disjoint_test_scenes: bool = True

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

    def sample(self, rng: np.random.Generator, label: int, index: int = 0, split: str = "train") -> PanClip:
        """Draw the clip of video ``index`` of class ``label`` in ``split`` (``index`` picks a
        pooled scene; ``split`` picks the pool, see ``disjoint_test_scenes``)."""
        self._check_label(label)
        if self.scene_pool:
            pool = int(self.disjoint_test_scenes and split != "train")
            scene = _pooled_scene(self.seed, self.name, self.size, index % self.scene_pool, self.style(label), pool)
        else:
            scene = render_scene(rng, self.size, self.style(label))
        P = scene.shape[0]
        start = (int(rng.integers(P)), int(rng.integers(P)))
        lo, hi = speed_range(self.size)
        speed = rng.integers(lo, hi + 1, size=2)
        sy, sx = self.motion_signs(rng, label)
        # the window moves opposite to the content
        return PanClip(scene, start, (-sy * int(speed[0]), -sx * int(speed[1])), self.frames, self.size)

    def render(self, rng: np.random.Generator, label: int, index: int = 0, split: str = "train") -> np.ndarray:
        """Frames ``(T, S, S, 3)`` uint8 RGB of video ``index`` of class ``label`` in ``split``."""
        return self.sample(rng, label, index, split).render()


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
# seeds


def video_rng(seed: int, task: str, split: str, label: int, index: int) -> np.random.Generator:
    """The generator of one video, from ``(seed, task, split, label, index)`` only."""
    key = [seed, zlib.crc32(task.encode()), zlib.crc32(split.encode()), label, index]
    return np.random.default_rng(np.random.SeedSequence(key))

