"""Clips from a stream: videos read once in time order, features computed as they arrive.

For true streams nothing is stored: a *chunk function* yields a video's features chunk by
chunk in time order (:func:`decoded_chunks`: PyAV decode + the frozen backbone through
:class:`extract.source.OnlineFeatureSource`; :func:`store_chunks`: the same from a feature
store, for tests and for replaying a store as if it were a stream).

:class:`OnlineClipStream` cuts those chunks into clips exactly as :class:`train.streams.ClipSet`
cuts a stored video (clip ``j`` = frames ``j*s .. j*s+T-1``, the same last-clip policies) and
visits them in the :func:`train.streams.sequential_order` order (one video at a time, or
round-robin over ``B`` parallel streams, each holding one open decoder). Memory per stream is
``O(T + chunk)`` frames, whatever the video length.

Resume: every clip carries the stream position right after it (:attr:`StreamClip.after`); a
trainer saves the position of the last clip it trained on, and
``OnlineClipStream(..., position=saved)`` continues with the next clip. Frames before the
resumed clip are decoded again (containers are read from the start; seeking is not exact for
every codec) but only the decode chunk holding the resumed clip's first frame goes through the
backbone again.

:class:`ClipFeed` runs a stream in a background thread behind a bounded FIFO of clips and
hands out batches; :class:`ReplayBuffer` optionally keeps past clips and draws several
batches per incoming batch. Both report progress in frames per second.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch

from pipeline.store import FeatureStore
from train.streams import LAST_CLIP_POLICIES, StreamError

if TYPE_CHECKING:
    from extract.source import OnlineFeatureSource

__all__ = [
    "ChunkFn",
    "StreamClip",
    "OnlineClipStream",
    "store_chunks",
    "decoded_chunks",
    "ClipFeed",
    "ReplayBuffer",
    "collate_clips",
]

ChunkFn = Callable[[str, int], Iterator[tuple[int, np.ndarray, np.ndarray]]]
"""``chunks(video_id, skip) -> iterator of (first_index, features (n, H, W, C) float32,
timestamps (n,) seconds)`` in time order. Frames with index < ``skip`` may be left out (they
are not needed); indices are positions among the video's selected frames."""


def store_chunks(store: FeatureStore, chunk: int = 32) -> ChunkFn:
    """A stored video replayed as a stream, ``chunk`` frames at a time."""

    def chunks(video_id: str, skip: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        n = store.num_frames(video_id)
        ts = store.timestamps(video_id)
        for first in range(min(skip, n), n, chunk):
            idx = np.arange(first, min(n, first + chunk))
            yield first, store.features(video_id, idx), ts[idx]

    return chunks


def decoded_chunks(source: "OnlineFeatureSource", *, as_stored: bool = False) -> ChunkFn:
    """Decode with PyAV and run the frozen backbone, chunk by chunk (``source.cfg.chunk_size``
    frames). Chunks wholly before ``skip`` are decoded but never encoded; ``as_stored`` rounds
    features through the store dtype."""
    from extract.decode import iter_frames  # lazy: keeps `import train.online` light (no PyAV)

    def chunks(video_id: str, skip: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        row = source.rows[video_id]
        frames = iter_frames(row.path, geometry=source.geometry, fps=source.cfg.fps, start=row.start,
                             end=row.end, chunk_size=source.cfg.chunk_size, threads=source.cfg.decode_threads)
        pos = 0
        try:
            for c in frames:
                n = len(c.frames)
                lo = max(0, skip - pos)
                if lo < n:
                    # the whole decode chunk goes through the backbone, so every frame is always
                    # encoded in the same batch (float reductions depend on the batch): a resumed
                    # stream gives bit-identical features
                    feats = source.encode(c.frames, as_stored=as_stored)
                    yield pos + lo, feats[lo:], c.timestamps[lo:]
                pos += n
        finally:
            frames.close()

    return chunks


@dataclass
class StreamClip:
    """One clip of a stream.

    Attributes:
        video: number of the video in the stream's list; video_id: its id.
        index: clip number j within the video; start: first frame (= j * s).
        features: (T, H, W, C) float32; frames past the video's end repeat its last frame.
        mask: (T,) bool valid frames; timestamps: (T,) seconds.
        after: the stream position right after this clip (JSON-able, see OnlineClipStream).
    """

    video: int
    video_id: str
    index: int
    start: int
    features: np.ndarray
    mask: np.ndarray
    timestamps: np.ndarray
    after: dict = field(default_factory=dict)


def _video_clips(number: int, video_id: str, chunks: ChunkFn, clip: int, stride: int,
                 last_clip: str, first_clip: int) -> Iterator[StreamClip]:
    """Clips ``first_clip, first_clip+1, ...`` of one video, as its chunks arrive."""
    policy = LAST_CLIP_POLICIES.get(last_clip)
    j = first_clip
    base = j * stride  # frame index of buf_f[0]
    buf_f: list[np.ndarray] = []
    buf_t: list[np.ndarray] = []
    have = 0  # frames in the buffer
    total = base
    for first, feats, ts in chunks(video_id, base):
        if first + len(feats) <= base:
            continue
        lo = max(0, base - first) if not buf_f else 0
        if buf_f and first != base + have:
            raise StreamError(f"chunks of {video_id!r} are not contiguous (frame {first}, expected {base + have})")
        buf_f.append(feats[lo:])
        buf_t.append(ts[lo:])
        have += len(feats) - lo
        total = first + len(feats)
        while j * stride + clip <= total:
            f, t = np.concatenate(buf_f), np.concatenate(buf_t)
            off = j * stride - base
            yield StreamClip(number, video_id, j, j * stride, f[off: off + clip], np.ones(clip, bool), t[off: off + clip])
            j += 1
            drop = min(j * stride - base, len(f))  # frames before the next start are not needed
            buf_f, buf_t, have, base = [f[drop:]], [t[drop:]], len(f) - drop, base + drop
    starts, valid = policy(total, clip, stride)
    if len(buf_f):
        f, t = np.concatenate(buf_f), np.concatenate(buf_t)
    for k in range(j, len(starts)):  # the masked last clip (the only one left after full clips)
        off = int(starts[k]) - base
        idx = np.minimum(np.arange(off, off + clip), len(f) - 1)
        yield StreamClip(number, video_id, k, int(starts[k]), f[idx], np.arange(clip) < valid[k], t[idx])


class OnlineClipStream:
    """Clips of ``video_ids`` in time order, one video at a time or round-robin over ``streams``.

    Position (``after`` of each clip; ``position=`` to resume) is a dict::

        {"next_video": n,            # first video no stream has taken yet
         "slots": [[video, clip], ...],  # each active stream: its video and its next clip number
         "turn": i}                  # the slot that gives the next clip

    The visiting order equals ``train.streams.sequential_order`` over a ClipSet of the same videos.
    """

    def __init__(self, video_ids: Sequence[str], chunks: ChunkFn, clip_frames: int, stride_frames: int, *,
                 last_clip: str = "drop", streams: int = 1, position: dict | None = None) -> None:
        if clip_frames < 1 or stride_frames < 1 or streams < 1:
            raise StreamError(f"clip_frames, stride_frames and streams must be >= 1, got "
                              f"{clip_frames}, {stride_frames}, {streams}")
        LAST_CLIP_POLICIES.get(last_clip)
        self.video_ids = list(video_ids)
        self.chunks = chunks
        self.clip, self.stride, self.last_clip, self.streams = clip_frames, stride_frames, last_clip, streams
        self.position = position or {"next_video": 0, "slots": [], "turn": 0, "started": False}

    def _open(self, video: int, first_clip: int) -> Iterator[StreamClip]:
        return _video_clips(video, self.video_ids[video], self.chunks, self.clip, self.stride, self.last_clip, first_clip)

    def __iter__(self) -> Iterator[StreamClip]:
        pos = self.position
        next_video = int(pos["next_video"])
        slots: list[list] = [[int(v), int(c)] for v, c in pos["slots"]]
        if not pos.get("started", True):
            slots, next_video = [], 0
            while len(slots) < self.streams and next_video < len(self.video_ids):
                slots.append([next_video, 0])
                next_video += 1
        gens = [self._open(v, c) for v, c in slots]
        turn = int(pos["turn"])
        while slots:
            turn %= len(slots)
            clip = next(gens[turn], None)
            while clip is None:  # this stream's video is done: take the next unread one
                if next_video >= len(self.video_ids):
                    break
                slots[turn], gens[turn] = [next_video, 0], self._open(next_video, 0)
                next_video += 1
                clip = next(gens[turn], None)
            if clip is None:  # no video left for this stream: it ends
                del slots[turn], gens[turn]
                continue
            slots[turn][1] = clip.index + 1
            after_turn = turn + 1
            clip.after = {"next_video": next_video, "slots": [list(s) for s in slots],
                          "turn": after_turn % len(slots), "started": True}
            yield clip
            turn = after_turn


def collate_clips(clips: Sequence[StreamClip]) -> dict[str, torch.Tensor]:
    """Batch: ``clips`` (B, T, H, W, C) float32, ``mask`` (B, T) bool, ``video`` (B,) int64, ``start`` (B,)."""
    return {
        "clips": torch.from_numpy(np.stack([c.features for c in clips])),
        "mask": torch.from_numpy(np.stack([c.mask for c in clips])),
        "video": torch.tensor([c.video for c in clips], dtype=torch.int64),
        "start": torch.tensor([c.start for c in clips], dtype=torch.int64),
    }


class ClipFeed:
    """A stream read ahead in a background thread into a bounded FIFO; batches of ``batch_size``.

    ``buffer`` bounds the clips read but not yet handed out (memory: ``buffer`` clips). The
    last batch of the stream may be smaller. :meth:`close` stops the reader. ``frames_per_s``
    is the rate of new frames handed out (stride frames per clip) since the feed started.
    """

    _END = object()

    def __init__(self, stream: OnlineClipStream, batch_size: int, buffer: int = 64) -> None:
        if batch_size < 1 or buffer < 1:
            raise StreamError(f"batch_size and buffer must be >= 1, got {batch_size}, {buffer}")
        self.stream, self.batch_size = stream, batch_size
        self._q: queue.Queue = queue.Queue(maxsize=buffer)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="clip-feed", daemon=True)
        self._t0 = time.monotonic()
        self.frames = 0
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for clip in self.stream:
                if not self._put(clip):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._error = e
        self._put(self._END)

    def batches(self) -> Iterator[list[StreamClip]]:
        """Batches in stream order until the stream ends (re-raises a reader error)."""
        done = False
        while not done:
            batch: list[StreamClip] = []
            while len(batch) < self.batch_size:
                item = self._q.get()
                if item is self._END:
                    done = True
                    break
                batch.append(item)
            if self._error is not None:
                raise self._error
            if batch:
                self.frames += sum(min(self.stream.stride, int(c.mask.sum())) for c in batch)
                yield batch

    @property
    def frames_per_s(self) -> float:
        return self.frames / max(1e-9, time.monotonic() - self._t0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> "ClipFeed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReplayBuffer:
    """Past clips kept for reuse: FIFO of ``capacity`` clips, batches drawn uniformly.

    ``draw(n, step)`` takes ``n`` clips without replacement with ``np.random.default_rng((seed,
    step))``, so a resumed run draws the same batches. Its contents are part of the
    checkpoint (:meth:`state_dict`: capacity x (T, H, W, C) float32 features).
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise StreamError(f"replay capacity must be >= 1, got {capacity}")
        self.capacity, self.seed = capacity, seed
        self.items: list[StreamClip] = []

    def add(self, clips: Sequence[StreamClip]) -> None:
        self.items.extend(clips)
        del self.items[: max(0, len(self.items) - self.capacity)]

    def draw(self, n: int, step: int) -> list[StreamClip]:
        rng = np.random.default_rng((self.seed, step))
        pick = rng.choice(len(self.items), size=min(n, len(self.items)), replace=False)
        return [self.items[int(i)] for i in pick]

    _ARRAYS = ("features", "mask", "timestamps")

    def state_dict(self) -> dict:
        """Clips as tensors (loadable with ``torch.load(weights_only=True)``)."""
        return {"items": [{"video": c.video, "video_id": c.video_id, "index": c.index, "start": c.start,
                           **{k: torch.from_numpy(np.ascontiguousarray(getattr(c, k))) for k in self._ARRAYS}}
                          for c in self.items]}

    def load_state_dict(self, state: dict) -> None:
        self.items = [StreamClip(**{k: (v.numpy() if k in self._ARRAYS else v) for k, v in d.items()})
                      for d in state["items"]]
