"""Frame-index samplers for stage 2: PRP pretext clips, fine-tuning clips and test views.

Stage 2 trains on cached per-frame features ``(T, H, W, C)`` (one row per stored frame).
The backbone is strictly per frame, so picking a clip's *cached frame indices* is exactly
equivalent to decoding those frames (AdViSe notes, section 6.2). Every sampler here returns
integer frame indices, 0-based into the video's ``length`` stored frames (all quantities
here are in **frames**, never seconds); the datasets gather ``features[indices]``.

Pure numpy. Every random choice comes from a caller-supplied ``np.random.Generator``; there
is no global RNG state.

What the released AdViSe code does, and what we reproduce (``short_video="wrap"``, the
default everywhere):

* PRP pretext (``TemporalModelingSampling``): ``clip_len = num_frames * stride`` (8 * 2 = 16
  frames); start ``s`` uniform integer on ``[0, L - clip_len]``; rate ``r`` uniform from
  ``(1, 2, 4, 8)``; jitter ``j ~ U(0.8, 1.2)`` drawn per clip; indices
  ``floor(linspace(s, s + clip_len*r*j, num_frames, endpoint=False))`` i.e.
  ``floor(s + stride*r*j*i)``, **taken mod L**. The start range ignores the rate, so a fast
  clip that starts late wraps round to the start of the video on videos of *any* length
  (e.g. rate 8 covers ~112-134 frames but the start may be ``L - 16``), not only on short
  ones. The released code rejects videos shorter than ``clip_len``; with ``wrap`` such videos
  still produce indices (the start is 0 and everything is taken mod L). Rejecting them is
  the dataset's decision (see :func:`released_min_length`).
* Test views (``DuplicSpeedStampsGenerator``, method ``uniform``): 10 starts
  ``floor(linspace(0, L - clip_len - 1, 10))`` with ``clip_len = 8 * 8``, each clip
  ``s + 8*i`` mod L, jitter 0.

``short_video="clamp"`` is our fix for the content jump of wrap-around: the start range
accounts for the clip's real span so the clip fits whenever the video is long enough, and
indices past the end are clamped to ``L - 1`` (only a video shorter than the span repeats its
last frame).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from pipeline.errors import FreezeframeError
from pipeline.registry import Registry

RATES: tuple[int, ...] = (1, 2, 4, 8)
"""PRP playback rates; a clip's ``rate_label`` is its index here (1->0, 2->1, 4->2, 8->3)."""

ShortVideoPolicy = Literal["wrap", "clamp"]
"""Names registered in :data:`SHORT_VIDEO_POLICIES`."""


class SamplingError(FreezeframeError, ValueError):
    """A sampler was asked for something impossible (empty video, bad config)."""


# --------------------------------------------------------------------------------------
# Short-video policies: where a clip may start, and what happens to indices past the end.
# --------------------------------------------------------------------------------------
class IndexPolicy(Protocol):
    """How a clip is kept inside a video of ``length`` frames."""

    def max_start(self, length: int, clip_len: int, span: float) -> int:
        """Largest allowed start frame (inclusive, >= 0).

        ``clip_len``: the released code's clip length ``num_frames * stride`` in frames (base
        stride, rate ignored). ``span``: the clip's real extent in frames, i.e. the offset of
        its last frame from its first, ``stride * rate * jitter * (num_frames - 1)``.
        """
        ...

    def apply(self, indices: np.ndarray, length: int) -> np.ndarray:
        """Map non-negative integer indices ``(num_frames,)`` into ``[0, length - 1]``."""
        ...


class WrapPolicy:
    """The released AdViSe behaviour: start on ``[0, max(L - clip_len, 0)]``, indices mod L."""

    def max_start(self, length: int, clip_len: int, span: float) -> int:
        return max(length - clip_len, 0)

    def apply(self, indices: np.ndarray, length: int) -> np.ndarray:
        return np.mod(indices, length)


class ClampPolicy:
    """Our fix: start on ``[0, max(floor(L - 1 - span), 0)]``, indices clamped to ``L - 1``.

    A video with ``L >= floor(span) + 1`` never clamps; a shorter one starts at 0 and repeats
    its last frame. Clamped indices are monotone non-decreasing.
    """

    def max_start(self, length: int, clip_len: int, span: float) -> int:
        return max(math.floor(length - 1 - span), 0)

    def apply(self, indices: np.ndarray, length: int) -> np.ndarray:
        return np.clip(indices, 0, length - 1)


SHORT_VIDEO_POLICIES: Registry[IndexPolicy] = Registry("short-video policy")
SHORT_VIDEO_POLICIES.add("wrap", WrapPolicy())
SHORT_VIDEO_POLICIES.add("clamp", ClampPolicy())


def get_policy(name: str) -> IndexPolicy:
    """The registered policy called ``name``; raises :class:`SamplingError` listing the choices."""
    try:
        return SHORT_VIDEO_POLICIES.get(name)
    except KeyError as e:
        raise SamplingError(
            f"{e.args[0]}; set short_video to 'wrap' (released AdViSe behaviour) "
            "or 'clamp' (no wrap-around)"
        ) from None


# --------------------------------------------------------------------------------------
# Config and results
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PRPConfig:
    """PRP (playback-rate prediction) clip sampling, defaults = released AdViSe config.

    rates: playback rates (frame-step multipliers); the label is the index into this tuple.
    jitter: each clip's rate is multiplied by ``U(1 - jitter, 1 + jitter)``, drawn per clip.
    num_frames: frames per clip (T of the model input).
    stride: base step between clip frames, in frames (rate 1 = ``stride`` frames per step).
    clips_per_video: clips drawn per video, each with its own rate, jitter and start.
    short_video: ``"wrap"`` (released: start on ``[0, L - num_frames*stride]``, indices
        mod L) or ``"clamp"`` (start so the clip fits, indices clamped to ``L - 1``).
    """

    rates: tuple[int, ...] = RATES
    jitter: float = 0.2
    num_frames: int = 8
    stride: int = 2
    clips_per_video: int = 4
    short_video: str = "wrap"

    def __post_init__(self) -> None:
        problems = []
        if len(self.rates) == 0 or any(r <= 0 for r in self.rates):
            problems.append(f"rates must be a non-empty list of positive numbers, got {self.rates!r}")
        if not 0.0 <= self.jitter < 1.0:
            problems.append(f"jitter must be in [0, 1), got {self.jitter!r}")
        for name in ("num_frames", "stride", "clips_per_video"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                problems.append(f"{name} must be a positive integer, got {v!r}")
        if self.short_video not in SHORT_VIDEO_POLICIES:
            problems.append(
                f"short_video must be one of {SHORT_VIDEO_POLICIES.names()}, got {self.short_video!r}"
            )
        if problems:
            raise SamplingError("invalid PRP sampling config: " + "; ".join(problems))

    @property
    def clip_len(self) -> int:
        """The released code's clip length ``num_frames * stride`` in frames (16 by default)."""
        return self.num_frames * self.stride


@dataclass(frozen=True)
class PRPClip:
    """One PRP clip.

    indices: ``(num_frames,)`` int64 frame indices into the video's stored frames.
    rate_label: index into ``PRPConfig.rates`` (1->0, 2->1, 4->2, 8->3): the class target.
    rate: the jittered rate actually used (``rates[rate_label] * jitter_factor``).
    start: first frame (before wrap/clamp), in frames.
    """

    indices: np.ndarray
    rate_label: int
    rate: float
    start: int


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------
def _check_length(length: int) -> None:
    if isinstance(length, bool) or int(length) != length or length < 1:
        raise SamplingError(
            f"video length must be a positive number of stored frames, got {length!r}; "
            "remove empty videos from the manifest or re-extract them"
        )


def _check_clip_shape(num_frames: int, stride: int) -> None:
    if num_frames < 1 or stride < 1:
        raise SamplingError(
            f"num_frames and stride must be positive integers, got num_frames={num_frames}, "
            f"stride={stride}"
        )


def released_min_length(cfg: PRPConfig) -> int:
    """Shortest video (frames) the released code accepts for PRP: ``num_frames * stride``.

    Shorter videos are rejected (and another video is drawn) by the released dataset.
    """
    return cfg.clip_len


def min_length_without_wrap(cfg: PRPConfig) -> int:
    """Shortest video (frames) on which *no* PRP clip can need wrap-around or clamping.

    The slowest-to-fit clip is the fastest rate at maximal jitter, whose last frame sits
    ``floor(stride * max(rates) * (1 + jitter) * (num_frames - 1))`` frames after its start
    (134 with the defaults), so the answer is that plus one (135 by default). Under
    ``"clamp"`` a video at least this long is never clamped. Under ``"wrap"`` (released) the
    start range ignores the rate, so fast clips that start late still wrap at any length:
    refusing shorter videos does not remove wrap-around there, only ``"clamp"`` does.
    """
    span = cfg.stride * max(cfg.rates) * (1.0 + cfg.jitter) * (cfg.num_frames - 1)
    return math.floor(span) + 1


def clip_fits(length: int, num_frames: int, stride: int) -> bool:
    """Whether ``num_frames`` frames at integer ``stride`` fit in ``length`` frames unwrapped.

    True iff ``length >= (num_frames - 1) * stride + 1``. When it holds, :func:`random_clip`
    and :func:`test_clips` never wrap or clamp, under either policy.
    """
    _check_clip_shape(num_frames, stride)
    return length >= (num_frames - 1) * stride + 1


# --------------------------------------------------------------------------------------
# PRP
# --------------------------------------------------------------------------------------
def prp_positions(start: int, rate: float, jitter_factor: float, cfg: PRPConfig) -> np.ndarray:
    """Unwrapped integer positions ``(num_frames,)`` int64 of a PRP clip.

    ``floor(linspace(start, start + clip_len*rate*jitter_factor, num_frames, endpoint=False))``,
    i.e. ``floor(start + stride*rate*jitter_factor*i)`` for ``i = 0..num_frames-1``; computed
    with ``np.linspace`` exactly as the released code does so float rounding matches too.
    """
    step_total = cfg.clip_len * float(rate) * float(jitter_factor)
    pos = np.linspace(float(start), float(start) + step_total, cfg.num_frames, endpoint=False)
    return np.floor(pos).astype(np.int64)


def prp_indices(
    length: int, start: int, rate: float, jitter_factor: float, cfg: PRPConfig
) -> np.ndarray:
    """Frame indices ``(num_frames,)`` int64 of a PRP clip with explicit start/rate/jitter.

    Pure (no randomness): :func:`prp_clip` draws the start, rate and jitter and calls this.
    ``rate`` is the un-jittered rate (e.g. 4), ``jitter_factor`` the multiplier ``j``;
    the positions of :func:`prp_positions` go through ``cfg.short_video`` (mod L for
    ``"wrap"``, ``min(., L-1)`` for ``"clamp"``).
    """
    _check_length(length)
    if not 0 <= start < length:
        raise SamplingError(f"clip start {start} is outside the video's frames [0, {length - 1}]")
    if rate <= 0 or jitter_factor <= 0:
        raise SamplingError(f"rate and jitter_factor must be positive, got {rate}, {jitter_factor}")
    policy = get_policy(cfg.short_video)
    return policy.apply(prp_positions(start, rate, jitter_factor, cfg), length)


def prp_clip(
    length: int, rng: np.random.Generator, cfg: PRPConfig, rate_label: int | None = None
) -> PRPClip:
    """Draw one PRP clip from a video of ``length`` stored frames.

    Draw order (all from ``rng``): rate label uniform over ``cfg.rates`` (skipped when
    ``rate_label`` is given), jitter ``j ~ U(1 - jitter, 1 + jitter)``, then the start,
    uniform integer on ``[0, policy.max_start]``:

    * ``"wrap"``: ``[0, max(L - num_frames*stride, 0)]`` (released; rate ignored);
    * ``"clamp"``: ``[0, max(floor(L - 1 - stride*r*j*(num_frames-1)), 0)]``.
    """
    _check_length(length)
    policy = get_policy(cfg.short_video)
    if rate_label is None:
        label = int(rng.integers(len(cfg.rates)))
    else:
        if not 0 <= rate_label < len(cfg.rates):
            raise SamplingError(
                f"rate_label {rate_label} is not an index into rates {cfg.rates}"
            )
        label = int(rate_label)
    rate = cfg.rates[label]
    j = float(rng.uniform(1.0 - cfg.jitter, 1.0 + cfg.jitter))
    span = cfg.stride * rate * j * (cfg.num_frames - 1)
    hi = min(policy.max_start(length, cfg.clip_len, span), length - 1)
    start = int(rng.integers(0, hi, endpoint=True))
    idx = policy.apply(prp_positions(start, rate, j, cfg), length)
    return PRPClip(indices=idx, rate_label=label, rate=rate * j, start=start)


def prp_clips(length: int, rng: np.random.Generator, cfg: PRPConfig) -> list[PRPClip]:
    """``cfg.clips_per_video`` independent PRP clips (own rate, jitter and start each).

    Stack with ``np.stack([c.indices for c in clips])`` -> ``(clips_per_video, num_frames)``.
    """
    return [prp_clip(length, rng, cfg) for _ in range(cfg.clips_per_video)]


# --------------------------------------------------------------------------------------
# Fine-tuning and test views
# --------------------------------------------------------------------------------------
def random_clip(
    length: int,
    rng: np.random.Generator,
    num_frames: int,
    stride: int,
    short_video: str = "wrap",
) -> np.ndarray:
    """One fine-tuning clip: indices ``(num_frames,)`` int64, ``s + stride*i``.

    The start ``s`` is uniform on the policy's valid range: ``[0, max(L - num_frames*stride,
    0)]`` for ``"wrap"``, ``[0, max(L - 1 - stride*(num_frames-1), 0)]`` for ``"clamp"``.
    Either way the clip fits whenever :func:`clip_fits` holds; only shorter videos wrap
    (mod L) or clamp (repeat the last frame). No rate jitter.

    Deviation from the released ``SpeedSampling`` fine-tuning path, which draws the start
    anywhere on ``[0, L - 1]`` (wrapping even long videos) and can jitter the stride.
    """
    _check_length(length)
    _check_clip_shape(num_frames, stride)
    policy = get_policy(short_video)
    span = float(stride * (num_frames - 1))
    hi = min(policy.max_start(length, num_frames * stride, span), length - 1)
    start = int(rng.integers(0, hi, endpoint=True))
    return policy.apply(start + stride * np.arange(num_frames, dtype=np.int64), length)


def test_clip_starts(length: int, num_clips: int = 10, num_frames: int = 8, stride: int = 8) -> np.ndarray:
    """Deterministic test-view starts ``(num_clips,)`` int64, in frames.

    The released ``uniform`` placement: ``floor(linspace(0, hi, num_clips))`` (endpoints
    included) with ``hi = L - num_frames*stride - 1``. When that is negative (videos of at most
    ``num_frames*stride`` frames) we use ``hi = 0``, so every view starts at frame 0; the
    released code would produce negative starts there and take them mod L.
    """
    _check_length(length)
    _check_clip_shape(num_frames, stride)
    if num_clips < 1:
        raise SamplingError(f"num_clips must be a positive integer, got {num_clips}")
    hi = max(length - num_frames * stride - 1, 0)
    return np.floor(np.linspace(0.0, float(hi), num_clips)).astype(np.int64)


test_clip_starts.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def test_clips(
    length: int,
    num_clips: int = 10,
    num_frames: int = 8,
    stride: int = 8,
    short_video: str = "wrap",
) -> np.ndarray:
    """Deterministic test views: indices ``(num_clips, num_frames)`` int64.

    Row ``k`` is ``s_k + stride*i`` (``i = 0..num_frames-1``) with ``s_k`` from
    :func:`test_clip_starts` (evenly spread, released placement), then mod L (``"wrap"``) or
    clamped to ``L - 1`` (``"clamp"``); the two differ only when :func:`clip_fits` is False.
    No jitter. The released protocol repeats each row for 3 spatial crops (30 views).
    """
    policy = get_policy(short_video)
    starts = test_clip_starts(length, num_clips, num_frames, stride)
    pos = starts[:, None] + stride * np.arange(num_frames, dtype=np.int64)[None, :]
    return policy.apply(pos, length)


test_clips.__test__ = False  # type: ignore[attr-defined]  # pytest must not collect it on import
