"""A small synthetic dataset in the DAVIS-2017 layout, with exact masks.

Each sequence shows 2-3 textured objects (ellipses, polygons, stars) that move along
smooth paths, turn and occlude each other (fixed depth order) over a textured background
that pans. Masks are rendered at pixel level without antialiasing, so the annotation of
every frame is exact: id ``k`` wherever object ``k`` is the front-most one. Objects may
leave the view or hide completely behind another one (absent from a frame).

Written as the official layout (the ``480p`` folder name is the layout's, whatever the
frame size)::

    OUT/ImageSets/2017/val.txt (and train.txt)
    OUT/JPEGImages/480p/<seq>/00000.jpg ...
    OUT/Annotations/480p/<seq>/00000.png ...      palette PNGs, ids 0..K

so every DAVIS tool (our manifest builder, ``davis-eval``, the official evaluation) reads it.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.fileio import atomic_write_bytes, atomic_write_lines
from pipeline.labels import write_label_png
from synth.render import _periodic_noise

__all__ = ["SynthDavisConfig", "render_sequence", "write_synth_davis"]

RESOLUTION_DIR = "480p"


@dataclass(frozen=True)
class SynthDavisConfig:
    """Size and content of the synthetic DAVIS-layout dataset.

    Attributes:
        val_sequences: sequences listed in ``val.txt``.
        train_sequences: sequences listed in ``train.txt``.
        frames: frames per sequence.
        height, width: frame size in pixels.
        min_objects, max_objects: objects per sequence (ids 1..K).
        max_speed: object speed bound in pixels per frame.
        max_turn: object rotation bound in radians per frame.
        pan: background pan bound in pixels per frame.
        jpeg_quality: quality of the written JPEG frames.
        seed: base seed (sequence ``i`` uses ``(seed, i)``).
    """

    val_sequences: int = 3
    train_sequences: int = 0
    frames: int = 24
    height: int = 192
    width: int = 352
    min_objects: int = 2
    max_objects: int = 3
    max_speed: float = 4.0
    max_turn: float = 0.08
    pan: float = 1.5
    jpeg_quality: int = 95
    seed: int = 0


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """``(h, w, 3)`` smooth noise in [0, 1]: :func:`synth.render._periodic_noise` per channel,
    cut to ``h x w`` and min-max scaled."""
    side = max(h, w)
    out = np.stack([_periodic_noise(rng, side, sigma)[:h, :w] for _ in range(3)], axis=-1)
    return (out - out.min(axis=(0, 1))) / np.maximum(out.max(axis=(0, 1)) - out.min(axis=(0, 1)), 1e-9)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A saturated ``(size, size, 3)`` float texture: a random hue with stripes and noise."""
    hue = rng.uniform(0, 1)
    base = np.clip(np.abs(((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6) - 3) - 1, 0, 1)  # hue -> RGB
    fine = _smooth_noise(rng, size, size, 1.5)
    freq = rng.uniform(0.25, 0.7, 2)
    stripes = 0.5 + 0.5 * np.sin(np.arange(size)[:, None] * freq[0] + np.arange(size)[None] * freq[1])
    tex = 0.15 + 0.6 * base * (0.6 + 0.4 * stripes[..., None]) + 0.25 * fine
    return np.clip(tex, 0, 1)


@dataclass(frozen=True)
class _Object:
    shape: str  # ellipse | polygon | star
    radius: float
    aspect: float
    sides: int
    pos0: np.ndarray  # (2,) y, x
    vel: np.ndarray  # (2,) pixels / frame
    wobble: np.ndarray  # (2,) sinusoid amplitude
    angle0: float
    turn: float  # radians / frame
    texture: np.ndarray  # (S, S, 3)


def _inside(obj: _Object, qy: np.ndarray, qx: np.ndarray) -> np.ndarray:
    """Object-local coordinates -> inside mask."""
    r = np.hypot(qy, qx * obj.aspect)
    phi = np.arctan2(qy, qx)
    if obj.shape == "ellipse":
        bound = obj.radius
    elif obj.shape == "polygon":
        k = obj.sides
        bound = obj.radius * np.cos(np.pi / k) / np.cos((phi % (2 * np.pi / k)) - np.pi / k)
    else:  # star
        bound = obj.radius * (0.65 + 0.35 * np.cos(obj.sides * phi))
    return r <= bound


def _objects(rng: np.random.Generator, cfg: SynthDavisConfig) -> list[_Object]:
    k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    h, w = cfg.height, cfg.width
    out = []
    for _ in range(k):
        radius = float(rng.uniform(0.12, 0.22) * min(h, w))
        pos0 = np.array([rng.uniform(0.25, 0.75) * h, rng.uniform(0.2, 0.8) * w])
        # aim roughly across the frame so that paths cross (occlusions)
        target = np.array([rng.uniform(0.3, 0.7) * h, rng.uniform(0.2, 0.8) * w])
        vel = (target - pos0) / max(cfg.frames - 1, 1)
        speed = np.linalg.norm(vel)
        if speed > cfg.max_speed:
            vel *= cfg.max_speed / speed
        out.append(
            _Object(
                shape=str(rng.choice(["ellipse", "polygon", "star"])),
                radius=radius,
                aspect=float(rng.uniform(0.7, 1.4)),
                sides=int(rng.integers(3, 7)),
                pos0=pos0,
                vel=vel,
                wobble=rng.uniform(0, 0.06 * min(h, w), 2),
                angle0=float(rng.uniform(0, 2 * np.pi)),
                turn=float(rng.uniform(-cfg.max_turn, cfg.max_turn)),
                texture=_texture(rng, 64),
            )
        )
    return out


def render_sequence(index: int, cfg: SynthDavisConfig) -> tuple[np.ndarray, np.ndarray]:
    """Frames ``(T, H, W, 3)`` uint8 RGB and exact masks ``(T, H, W)`` uint8 of sequence ``index``.

    Object ``k`` (id ``k``, 1-based) is drawn in front of objects ``< k``.
    """
    rng = np.random.default_rng([cfg.seed, index])
    h, w, t_len = cfg.height, cfg.width, cfg.frames
    bg_h, bg_w = h + int(np.ceil(cfg.pan * t_len)) + 2, w + int(np.ceil(cfg.pan * t_len)) + 2
    noise = 0.7 * _smooth_noise(rng, bg_h, bg_w, 4.0) + 0.3 * _smooth_noise(rng, bg_h, bg_w, 1.0)
    grey = noise.mean(-1, keepdims=True)
    background = np.clip(0.25 + 0.5 * (0.7 * grey + 0.3 * noise), 0, 1)  # muted, textured
    pan = rng.uniform(-cfg.pan, cfg.pan, 2)
    objects = _objects(rng, cfg)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    frames = np.empty((t_len, h, w, 3), np.uint8)
    masks = np.zeros((t_len, h, w), np.uint8)
    for t in range(t_len):
        oy = int(round((bg_h - h) / 2 + pan[0] * (t - t_len / 2)))
        ox = int(round((bg_w - w) / 2 + pan[1] * (t - t_len / 2)))
        img = background[oy : oy + h, ox : ox + w].copy()
        lab = np.zeros((h, w), np.uint8)
        for k, obj in enumerate(objects, 1):
            cy, cx = obj.pos0 + obj.vel * t + obj.wobble * np.sin(np.array([0.21, 0.17]) * t)
            a = obj.angle0 + obj.turn * t
            dy, dx = yy - cy, xx - cx
            qy = np.cos(a) * dy - np.sin(a) * dx  # rotate pixels into the object frame
            qx = np.sin(a) * dy + np.cos(a) * dx
            inside = _inside(obj, qy, qx)
            s = obj.texture.shape[0]
            ty = np.floor(qy[inside]).astype(np.int64) % s
            tx = np.floor(qx[inside]).astype(np.int64) % s
            img[inside] = obj.texture[ty, tx]
            lab[inside] = k
        frames[t] = np.round(img * 255).astype(np.uint8)
        masks[t] = lab
    return frames, masks


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_synth_davis(out: str | os.PathLike, cfg: SynthDavisConfig = SynthDavisConfig()) -> Path:
    """Write the dataset under ``out`` (files atomically; rewriting is idempotent). Returns ``out``."""
    out = Path(out)
    names = {"val": [f"synth{i:03d}" for i in range(cfg.val_sequences)]}
    names["train"] = [f"synth-train{i:03d}" for i in range(cfg.train_sequences)]
    index = 0
    for split in ("val", "train"):
        for seq in names[split]:
            frames, masks = render_sequence(index, cfg)
            index += 1
            for t in range(cfg.frames):
                atomic_write_bytes(out / "JPEGImages" / RESOLUTION_DIR / seq / f"{t:05d}.jpg", _jpeg(frames[t], cfg.jpeg_quality))
                write_label_png(out / "Annotations" / RESOLUTION_DIR / seq / f"{t:05d}.png", masks[t])
        atomic_write_lines(out / "ImageSets" / "2017" / f"{split}.txt", names[split])
    return out
