"""Map-style datasets over clip streams of a store (the long-form pretexts' training data).

Item ``i`` of epoch ``e`` is clip ``ClipSampler.order(e)[i]`` of the split's :class:`ClipSet`
(``train.streams``): the loop must visit indices in order (``shuffle = False`` tells it not
to shuffle), so the order is the stream's — time order for ``sequential``, a seeded
permutation for ``random``. Per-item randomness (views, masks) comes from
``np.random.default_rng((seed, epoch, i))``, so a resumed run reads identical items.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.store import FeatureStore
from train.data import apply_augmentations
from train.streams import ClipSampler, ClipSet, StreamConfig, clip_set_from_store

__all__ = ["StreamClipDataset", "ItemFn"]

ItemFn = Callable[["StreamClipDataset", int, np.random.Generator], dict[str, Any]]
"""``item(dataset, clip_id, rng) -> dict`` of tensors / ints (collated by the default collate)."""


class StreamClipDataset(Dataset):
    """Clips of ``split`` in the order of ``stream``; items built by ``item``.

    Attributes:
        clips: the :class:`ClipSet`; sampler: the :class:`ClipSampler` giving each pass's order.
        shuffle: False — the order is the stream's; the loop must not shuffle it.
    """

    shuffle = False

    def __init__(self, store: FeatureStore, split: str, stream: StreamConfig, seed: int, item: ItemFn) -> None:
        self.store = store
        self.clips: ClipSet = clip_set_from_store(store, split, stream)
        self.sampler = ClipSampler(self.clips, stream.order, streams=stream.streams, seed=seed)
        self.seed = seed
        self.epoch = 0
        self.item = item

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.clips)

    def clip_id(self, index: int) -> int:
        """Clip id at position ``index`` of the current pass."""
        return int(self.sampler.order(self.epoch)[index])

    def features(self, k: int) -> np.ndarray:
        """Features of clip ``k``: (T, H, W, C) float32 (a masked last clip repeats its last frame)."""
        return self.store.features(self.clips.video_ids[self.clips.video[k]], self.clips.indices(k))

    def shifted(self, k: int, offset: int) -> np.ndarray:
        """Features of the T frames starting ``offset`` frames after clip ``k``'s start, kept
        inside the video (clamped), (T, H, W, C) float32."""
        number = int(self.clips.video[k])
        length = int(self.clips.lengths[number])
        start = int(np.clip(self.clips.start[k] + offset, 0, max(0, length - self.clips.clip_frames)))
        idx = np.minimum(start + np.arange(self.clips.clip_frames), length - 1)
        return self.store.features(self.clips.video_ids[number], idx)

    def timestamps(self, k: int) -> np.ndarray:
        """(T,) seconds of clip ``k``'s frames."""
        return self.store.timestamps(self.clips.video_ids[self.clips.video[k]])[self.clips.indices(k)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return self.item(self, self.clip_id(index), rng)


def view(clip: np.ndarray, names: tuple[str, ...], rng: np.random.Generator) -> torch.Tensor:
    """A feature-space view of ``clip`` (T, H, W, C): the named augmentations, as a float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(apply_augmentations(names, clip, rng), dtype=np.float32))
