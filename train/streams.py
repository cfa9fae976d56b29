"""Clip streams over long videos: which clips, in which order, and where a stopped run resumes.

Long-form pre-training (Kato et al., "Online pre-training with long-form videos"; see
``docs/longform.md``) cuts each long video into **consecutive clips**: clip ``j`` of a video
covers stored frames ``j*s .. j*s + T - 1`` for a clip length ``T`` and a stride ``s`` (both in
**frames** of the store, i.e. at the extraction frame rate; :func:`frames_for_seconds` turns
seconds into frames from the store's timestamps).

Two pieces, both pure numpy and deterministic:

* :class:`ClipSet` — the clip set: for every clip its video number, start frame and number of
  valid frames. Clips are numbered video by video in time order (clip id ``k``). What happens
  to the last, partial clip of a video is a config choice (:data:`LAST_CLIP_POLICIES`):
  ``"drop"`` (default; frames after the last full clip are never seen) or ``"mask"`` (one
  more clip starting at ``n_full * s``; its indices past the end repeat the last frame and
  :meth:`ClipSet.mask` marks them invalid).
* :class:`ClipSampler` — an order over the clip set for each pass (epoch) and a position in
  it, saved in checkpoints with :meth:`ClipSampler.state_dict`. Orders (:data:`CLIP_ORDERS`):

  - ``sequential``: time order, video by video (``streams = 1``), or round-robin over ``B``
    parallel streams: stream ``b`` reads one video in time order and, when it ends, takes the
    next unread video; the flat order visits stream 0, 1, ..., B-1, 0, 1, ... so consecutive
    groups of ``B`` clips hold one clip of each of ``B`` different videos (until the last
    videos run out and fewer streams remain). The same order in every pass; no seed.
  - ``random``: the same clip set shuffled across all videos, a new permutation per pass from
    ``np.random.default_rng((seed, epoch))``.

  Every clip appears exactly once per pass in both orders.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from pipeline.errors import ConfigMismatchError, FreezeframeError
from pipeline.registry import Registry
from pipeline.store import FeatureStore

__all__ = [
    "StreamError",
    "StreamConfig",
    "ClipSet",
    "ClipSampler",
    "LAST_CLIP_POLICIES",
    "CLIP_ORDERS",
    "frame_period",
    "frames_for_seconds",
    "resolve_clip_geometry",
    "clip_set_from_store",
]


class StreamError(FreezeframeError, ValueError):
    """A clip stream was configured impossibly (T or s < 1, unknown policy, bad seconds)."""


@dataclass
class StreamConfig:
    """How long videos are cut into clips and in which order they are visited.

    Attributes:
        order: ``"sequential"`` or ``"random"`` (:data:`CLIP_ORDERS`).
        clip_frames: T, frames per clip (stored frames, i.e. at the extraction frame rate).
        stride_frames: s, frames between the starts of consecutive clips of a video.
        clip_seconds: if set, T is derived from the store's timestamps (overrides clip_frames).
        stride_seconds: if set, s is derived from the store's timestamps (overrides stride_frames).
        streams: B parallel streams of the ``sequential`` order (1 = one video at a time).
        last_clip: ``"drop"`` or ``"mask"`` the last partial clip of each video.
    """

    order: str = "sequential"
    clip_frames: int = 16
    stride_frames: int = 16
    clip_seconds: float | None = None
    stride_seconds: float | None = None
    streams: int = 1
    last_clip: str = "drop"

    def __post_init__(self) -> None:
        CLIP_ORDERS.get(self.order)
        LAST_CLIP_POLICIES.get(self.last_clip)
        for name in ("clip_frames", "stride_frames", "streams"):
            if getattr(self, name) < 1:
                raise StreamError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("clip_seconds", "stride_seconds"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise StreamError(f"{name} must be > 0 seconds, got {v}")


# --------------------------------------------------------------------------------------
# the clip set
# --------------------------------------------------------------------------------------
LastClipPolicy = Callable[[int, int, int], tuple[np.ndarray, np.ndarray]]
"""``policy(length, T, s) -> (starts, valid)``: clip starts of one video and valid frames each."""

LAST_CLIP_POLICIES: Registry[LastClipPolicy] = Registry("last-clip policy")


def _full_clips(length: int, clip: int, stride: int) -> int:
    return 0 if length < clip else (length - clip) // stride + 1


@LAST_CLIP_POLICIES.register("drop")
def _drop(length: int, clip: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Full clips only: starts ``0, s, 2s, ...`` while ``start + T <= length``."""
    n = _full_clips(length, clip, stride)
    return np.arange(n, dtype=np.int64) * stride, np.full(n, clip, dtype=np.int64)


@LAST_CLIP_POLICIES.register("mask")
def _mask(length: int, clip: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Full clips, plus one partial clip at ``n_full * s`` if that start is inside the video.

    That clip reaches past the end (``n_full * s + T > length``), so it covers every frame after
    the last full clip (when ``s <= T``); it has ``length - n_full * s`` valid frames.
    """
    starts, valid = _drop(length, clip, stride)
    nxt = len(starts) * stride
    if nxt < length:
        starts = np.append(starts, nxt)
        valid = np.append(valid, length - nxt)
    return starts, valid


@dataclass(frozen=True)
class ClipSet:
    """Every clip of a list of videos, numbered video by video in time order.

    Attributes:
        video_ids: the videos, in the order their clips are numbered.
        lengths: (V,) stored frames per video.
        clip_frames, stride_frames: T and s in frames; last_clip: the policy name.
        video: (N,) int64 video number of each clip (index into ``video_ids``).
        start: (N,) int64 first frame of each clip.
        valid: (N,) int64 valid frames of each clip (``clip_frames`` except a masked last clip).
    """

    video_ids: tuple[str, ...]
    lengths: np.ndarray
    clip_frames: int
    stride_frames: int
    last_clip: str
    video: np.ndarray
    start: np.ndarray
    valid: np.ndarray

    @classmethod
    def build(cls, video_ids: Sequence[str], lengths: Sequence[int], clip_frames: int,
              stride_frames: int, last_clip: str = "drop") -> "ClipSet":
        """Cut videos of ``lengths`` frames into clips of ``clip_frames`` at ``stride_frames``."""
        for name, v in (("clip_frames", clip_frames), ("stride_frames", stride_frames)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise StreamError(f"stream.{name} must be a positive integer (frames), got {v!r}")
        if len(video_ids) != len(lengths):
            raise StreamError(f"{len(video_ids)} video ids for {len(lengths)} lengths")
        policy = LAST_CLIP_POLICIES.get(last_clip)
        vids, starts, valids = [], [], []
        for number, length in enumerate(lengths):
            s, v = policy(int(length), int(clip_frames), int(stride_frames))
            vids.append(np.full(len(s), number, dtype=np.int64))
            starts.append(s)
            valids.append(v)
        cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # noqa: E731
        return cls(tuple(video_ids), np.asarray(lengths, dtype=np.int64), int(clip_frames),
                   int(stride_frames), last_clip, cat(vids), cat(starts), cat(valids))

    def __len__(self) -> int:
        return len(self.start)

    def clips_of(self, number: int) -> np.ndarray:
        """Clip ids of video ``number`` in time order, shape (n,)."""
        return np.flatnonzero(self.video == number)

    def indices(self, k: int) -> np.ndarray:
        """Frame indices of clip ``k``, shape (T,) int64; past the video's end: its last frame."""
        last = int(self.lengths[self.video[k]]) - 1
        return np.minimum(self.start[k] + np.arange(self.clip_frames, dtype=np.int64), last)

    def mask(self, k: int) -> np.ndarray:
        """Valid frames of clip ``k``, shape (T,) bool (all True unless a masked last clip)."""
        return np.arange(self.clip_frames) < self.valid[k]

    def fingerprint(self) -> str:
        """sha256 of what defines the clip set (ids, lengths, T, s, policy): checked on resume."""
        key = {"ids": list(self.video_ids), "lengths": self.lengths.tolist(), "T": self.clip_frames,
               "s": self.stride_frames, "last": self.last_clip}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------
# orders
# --------------------------------------------------------------------------------------
ClipOrder = Callable[[ClipSet, int, int, int], np.ndarray]
"""``order(clips, streams, seed, epoch) -> (N,) int64`` permutation of clip ids for one pass."""

CLIP_ORDERS: Registry[ClipOrder] = Registry("clip order")


@CLIP_ORDERS.register("sequential")
def sequential_order(clips: ClipSet, streams: int, seed: int, epoch: int) -> np.ndarray:
    """Time order; round-robin over ``streams`` parallel streams (seed and epoch are unused)."""
    if streams == 1:
        return np.arange(len(clips), dtype=np.int64)
    # The same rules as a live stream (train.online.OnlineClipStream), which learns that a
    # video is over only when it asks for the next clip: a stream takes the next unread video
    # at its first turn after its video ended (a video with no clip yields nothing).
    queues = [clips.clips_of(n) for n in range(len(clips.video_ids))]
    next_video = 0
    slots: list[list] = []  # per stream: [clip ids of its current video, next position]
    while len(slots) < streams and next_video < len(queues):
        slots.append([queues[next_video], 0])
        next_video += 1
    out: list[int] = []
    turn = 0
    while slots:
        turn %= len(slots)
        slot = slots[turn]
        while slot[1] >= len(slot[0]) and next_video < len(queues):
            slot[0], slot[1] = queues[next_video], 0
            next_video += 1
        if slot[1] >= len(slot[0]):  # no unread video left: this stream ends
            del slots[turn]
            continue
        out.append(int(slot[0][slot[1]]))
        slot[1] += 1
        turn += 1
    return np.asarray(out, dtype=np.int64)


@CLIP_ORDERS.register("random")
def random_order(clips: ClipSet, streams: int, seed: int, epoch: int) -> np.ndarray:
    """The whole clip set shuffled across videos, one permutation per ``(seed, epoch)``."""
    if streams != 1:
        raise StreamError(
            f"stream.streams={streams} applies to the sequential order only; the random order "
            f"already mixes videos (set stream.streams=1)"
        )
    return np.random.default_rng((int(seed), int(epoch))).permutation(len(clips)).astype(np.int64)


class ClipSampler:
    """An order over a :class:`ClipSet` per pass plus a position: resumable mid-stream.

    Iterating yields clip ids from the current position to the end of the current pass and
    advances the position as it goes; :meth:`state_dict` after ``n`` clips and
    :meth:`load_state_dict` in a fresh sampler continue with clip ``n + 1`` exactly.
    """

    def __init__(self, clips: ClipSet, order: str = "sequential", *, streams: int = 1, seed: int = 0) -> None:
        if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
            raise StreamError(f"stream.streams must be a positive integer, got {streams!r}")
        self.clips = clips
        self.order_name = order
        self._order_fn = CLIP_ORDERS.get(order)
        self.streams = streams
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, np.ndarray] | None = None
        self.order(0)  # refuse a bad (order, streams) pair at once

    def order(self, epoch: int) -> np.ndarray:
        """(N,) clip ids of pass ``epoch`` in visiting order."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._order_fn(self.clips, self.streams, self.seed, epoch))
        return self._cache[1]

    def __len__(self) -> int:
        return len(self.clips)

    def remaining(self) -> int:
        """Clips left in the current pass."""
        return len(self.clips) - self.position

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        while self.position < len(order):
            k = int(order[self.position])
            self.position += 1
            yield k

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` clip ids of the current pass (fewer at its end), advancing the position."""
        order = self.order(self.epoch)
        out = order[self.position: self.position + n].copy()
        self.position += len(out)
        return out

    def next_pass(self) -> None:
        """Start the next pass (epoch) at its first clip."""
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        """JSON-able position: epoch, position, plus what must match to resume."""
        return {"epoch": self.epoch, "position": self.position, "order": self.order_name,
                "streams": self.streams, "seed": self.seed, "clip_set": self.clips.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` stopped; refuse a state of another clip set or order."""
        want = {"order": self.order_name, "streams": self.streams, "seed": self.seed,
                "clip_set": self.clips.fingerprint()}
        diffs = [f"{k}: saved {state.get(k)!r} vs now {v!r}" for k, v in want.items() if state.get(k) != v]
        if diffs:
            raise ConfigMismatchError(
                "the saved clip-stream position belongs to another clip set or order; resume "
                "with the same store, split and stream.* settings (or start a new run):\n  - "
                + "\n  - ".join(diffs)
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# --------------------------------------------------------------------------------------
# seconds -> frames, and a clip set from a store
# --------------------------------------------------------------------------------------
def frame_period(timestamps: Sequence[np.ndarray], tolerance: float = 0.01) -> float:
    """The common frame period in seconds of videos with these (T,) timestamp arrays.

    The median frame-to-frame gap of each video with at least 2 frames; they must agree
    within ``tolerance`` (relative), since a clip length in frames is shared by all videos.
    """
    periods = [float(np.median(np.diff(np.asarray(t, dtype=np.float64)))) for t in timestamps if len(t) > 1]
    periods = [p for p in periods if p > 0]
    if not periods:
        raise StreamError("cannot derive a frame period: no video has two stored frames; give T and s in frames")
    lo, hi = min(periods), max(periods)
    if hi > lo * (1 + tolerance):
        raise StreamError(
            f"the store's videos have different frame periods ({lo:.4g} s to {hi:.4g} s), so a "
            f"duration in seconds is not one number of frames; give stream.clip_frames / "
            f"stream.stride_frames instead, or extract at a fixed frame rate (--fps)"
        )
    return float(np.median(periods))


def frames_for_seconds(seconds: float, period: float) -> int:
    """``round(seconds / period)`` frames, at least 1 (``period`` from :func:`frame_period`)."""
    if not seconds > 0:
        raise StreamError(f"a duration in seconds must be > 0, got {seconds!r}")
    return max(1, int(round(seconds / period)))


def resolve_clip_geometry(cfg: StreamConfig, timestamps: Callable[[], Sequence[np.ndarray]]) -> tuple[int, int]:
    """(T, s) in frames: ``*_seconds`` fields (if set) converted with the store's frame period.

    ``timestamps`` is called only when a duration is given in seconds.
    """
    clip, stride = cfg.clip_frames, cfg.stride_frames
    if cfg.clip_seconds is not None or cfg.stride_seconds is not None:
        period = frame_period(timestamps())
        if cfg.clip_seconds is not None:
            clip = frames_for_seconds(cfg.clip_seconds, period)
        if cfg.stride_seconds is not None:
            stride = frames_for_seconds(cfg.stride_seconds, period)
    return clip, stride


def clip_set_from_store(store: FeatureStore, split: str, cfg: StreamConfig) -> ClipSet:
    """The :class:`ClipSet` of ``split`` (videos in store order) for ``cfg``."""
    ids = store.split_ids(split)
    if not ids:
        raise StreamError(f"split {split!r} of store {store.path} has no videos; choose one of {sorted(store.splits())}")
    clip, stride = resolve_clip_geometry(cfg, lambda: [store.timestamps(v) for v in ids])
    clips = ClipSet.build(ids, [store.num_frames(v) for v in ids], clip, stride, cfg.last_clip)
    if len(clips) == 0:
        raise StreamError(
            f"no clip of {clip} frames fits in any video of split {split!r} (longest: "
            f"{max(store.num_frames(v) for v in ids)} frames); lower stream.clip_frames or use "
            f"stream.last_clip='mask'"
        )
    return clips
