"""Co-Settle's training items from a feature store: frames t1, t2 and the return view A'.

Sampling (released ``sample_two_frames_tuple``, ``util/video/video_utils.py``): with ``n``
stored frames and ``gap = int(gap_fraction x n)`` (0.15: 3 frames of a 20-frame clip),

* ``n > 4`` and ``gap >= 1``: ``t1`` uniform in ``[1, n - gap)`` and ``t2 = t1 + gap``
  (``t1 >= 1`` because the release also loads the unused "past" frame ``t1 - 1``);
* otherwise ``t1`` and ``t2`` are two independent uniform frames.

An item is a dict: ``views`` ``(3, H, W, C)``, the stored tokens of ``[A = t1, B = t2, A']``
as stored (float16 or float32; the training loop casts float16 to float32 on the device, which
is exact, as for ``train.data``; int8 stores and the online view give float32), and ``frames``
``(2,)`` int64 ``(t1, t2)``. A DataLoader batch is read as one (``__getitems__``): the A, B and
stored A' rows of all its videos in one gathered read per shard and array
(:meth:`pipeline.store.FeatureStore.gather_stored`), straight into one batch tensor (in shared
memory in a worker), handed over by :func:`train.data.collate` without a copy. Where A' comes
from is a :data:`RETURN_VIEWS` entry:

``pea``     one of the K PEA views cached for frame t1 at extraction (``--pea-views K``), drawn
            uniformly per item; refused on a store without them.
``online``  frame t1 decoded again from the video (``pixels`` ``(S, S, 3)`` uint8) with a fresh
            window offset (``offsets`` ``(2,)``); the task's step runs the frozen encoder with
            that PEA window (``train.cosettle_online``) and fills ``views[:, 2]``.
``plain``   A' = A (no PEA): the only option for backbones without a positional embedding (the
            CNN); it is *not* Co-Settle's objective, since the cycle can then match positions.
``auto``    ``pea`` when the store has PEA views, else a clear error naming the others.

Randomness comes from ``np.random.default_rng((seed, epoch, index))`` as in ``train.data``,
so an item does not depend on the worker or rank that reads it (exact resume).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np
import torch

from pipeline.registry import Registry
from pipeline.store import FeatureStore
from train.data import DataError, ItemBatch, StoreSplit, batch_tensor

__all__ = [
    "RETURN_VIEWS",
    "CosettleDataError",
    "CosettleDataset",
    "ReturnView",
    "ReturnViewOptions",
    "resolve_return_view",
    "sample_pair",
]


class CosettleDataError(DataError):
    """The store cannot feed Co-Settle training as configured."""


def sample_pair(n: int, gap_fraction: float, rng: np.random.Generator) -> tuple[int, int]:
    """``(t1, t2)`` frame indices of a video with ``n`` stored frames (released sampling)."""
    if n < 1:
        raise CosettleDataError("a video without frames cannot be sampled")
    gap = int(gap_fraction * n)
    if n <= 4 or gap < 1:
        return int(rng.integers(0, n)), int(rng.integers(0, n))
    t1 = int(rng.integers(1, n - gap))
    return t1, t1 + gap


@dataclass(frozen=True)
class ReturnViewOptions:
    """``ratio``: PEA upsampling ratio r of the online view; ``manifest``: the videos of the
    online view (None: the manifest path recorded in the store header)."""

    ratio: float = 10.0
    manifest: str | None = None


class ReturnView(Protocol):
    """Where A' comes from: ``choose`` draws what an item needs (which stored view, which window)
    from the item's rng; ``read`` returns ``{"a_ret": (H, W, C) float32}`` or the inputs the
    step needs to compute it (``pixels``, ``offsets``). ``stored`` views also ``gather`` the A'
    rows of a batch: frame ``t1s[i]`` of ``video_ids[i]`` (with its ``choices[i]``) into
    ``out[dest[i]]``, not decoded (:meth:`~pipeline.store.FeatureStore.gather_stored`)."""

    name: str
    stored: bool

    def choose(self, rng: np.random.Generator) -> Any: ...

    def read(self, video_id: str, t1: int, a: np.ndarray, choice: Any) -> dict[str, np.ndarray]: ...

    def gather(self, video_ids: list[str], t1s: list[int], choices: list[Any], out: np.ndarray,
               dest: np.ndarray) -> None: ...


class PlainReturnView:
    """A' = A (no positional-embedding augmentation)."""

    name = "plain"
    stored = True

    def __init__(self, store: FeatureStore, options: ReturnViewOptions) -> None:
        self.store = store

    def choose(self, rng: np.random.Generator) -> Any:
        return None

    def read(self, video_id: str, t1: int, a: np.ndarray, choice: Any) -> dict[str, np.ndarray]:
        return {"a_ret": a}

    def gather(self, video_ids: list[str], t1s: list[int], choices: list[Any], out: np.ndarray,
               dest: np.ndarray) -> None:
        self.store.gather_stored(video_ids, t1s, out, dest)


class StoredPEAReturnView:
    """One of the K PEA views stored for frame t1, chosen uniformly per item."""

    name = "pea"
    stored = True

    def __init__(self, store: FeatureStore, options: ReturnViewOptions) -> None:
        views = store.pea_views_count
        if not views:
            raise CosettleDataError(
                f"store {store.path} was extracted without PEA views; re-extract with `--pea-views K` "
                f"(open_clip and timm ViTs), or compute A' online (`--set cosettle.return_view=online`), or "
                f"use the plain return view (`--set cosettle.return_view=plain`, A' = A, not Co-Settle's objective)"
            )
        self.store = store
        self.views = views

    def choose(self, rng: np.random.Generator) -> Any:
        return int(rng.integers(0, self.views))

    def read(self, video_id: str, t1: int, a: np.ndarray, choice: Any) -> dict[str, np.ndarray]:
        return {"a_ret": self.store.pea_features(video_id, [t1], [int(choice)])[0]}

    def gather(self, video_ids: list[str], t1s: list[int], choices: list[Any], out: np.ndarray,
               dest: np.ndarray) -> None:
        self.store.gather_stored(video_ids, t1s, out, dest, views=[int(c) for c in choices])


class OnlineReturnView:
    """Frame t1's pixels and a fresh PEA window offset; the step encodes them."""

    name = "online"
    stored = False

    def __init__(self, store: FeatureStore, options: ReturnViewOptions) -> None:
        from extract.pea import upsampled_size  # lazy: only the online view needs extract/
        from train.cosettle_online import FrameSource

        self.frames = FrameSource(store, options.manifest)
        grid = store.header.get("backbone", {}).get("grid")
        if not grid:
            raise CosettleDataError(f"the header of {store.path} does not record the backbone's patch grid")
        self.grid = (int(grid[0]), int(grid[1]))
        self.ratio = options.ratio
        self.upsampled = upsampled_size(self.grid, self.ratio)

    def choose(self, rng: np.random.Generator) -> Any:
        return np.array([rng.integers(0, self.upsampled[0] - self.grid[0] + 1),
                         rng.integers(0, self.upsampled[1] - self.grid[1] + 1)], dtype=np.int64)

    def read(self, video_id: str, t1: int, a: np.ndarray, choice: Any) -> dict[str, np.ndarray]:
        return {"a_ret": np.zeros_like(a), "pixels": self.frames.frame(video_id, t1), "offsets": choice}

    def gather(self, video_ids: list[str], t1s: list[int], choices: list[Any], out: np.ndarray,
               dest: np.ndarray) -> None:
        raise NotImplementedError("the online return view is computed by the step, not read")


RETURN_VIEWS: Registry[Callable[[FeatureStore, ReturnViewOptions], ReturnView]] = Registry("return view")
RETURN_VIEWS.add("plain", PlainReturnView)
RETURN_VIEWS.add("pea", StoredPEAReturnView)
RETURN_VIEWS.add("online", OnlineReturnView)


def resolve_return_view(name: str, store: FeatureStore) -> str:
    """``auto`` -> ``pea`` if the store holds PEA views; otherwise refuse, naming the choices."""
    if name != "auto":
        RETURN_VIEWS.get(name)  # unknown names raise here, listing the known ones
        return name
    if store.pea_views_count:
        return "pea"
    raise CosettleDataError(
        f"store {store.path} holds no PEA views (backbone {store.content.get('backbone')!r}); re-extract a ViT "
        f"store with `--pea-views K`, compute A' online with `--set cosettle.return_view=online` (open_clip and "
        f"timm ViTs), or choose the plain return view A' = A explicitly with `--set cosettle.return_view=plain` "
        f"(the only choice for backbones without a positional embedding; it is not Co-Settle's objective)"
    )


class CosettleDataset(StoreSplit):
    """One ``[A, B, A']`` triplet per video of ``split`` per epoch (item: see the module doc)."""

    def __init__(self, store: FeatureStore, split: str, return_view: str, gap_fraction: float = 0.15,
                 seed: int = 0, options: ReturnViewOptions | None = None) -> None:
        super().__init__(store, split, seed)
        self.return_view = RETURN_VIEWS.get(resolve_return_view(return_view, store))(
            store, options or ReturnViewOptions())
        self.gap_fraction = gap_fraction

    def draw(self, index: int) -> tuple[tuple[int, int], Any]:
        """The item's random choices: ``((t1, t2), return-view choice)``, from ``(seed, epoch, index)``."""
        rng = self._rng(index)
        t = sample_pair(int(self.lengths[index]), self.gap_fraction, rng)
        return t, self.return_view.choose(rng)

    def _batched(self) -> bool:
        """Whole batches can be gathered: A' is stored (or A) and the features need no extras."""
        return self.return_view.stored and not self.store.dtype.extras

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self._batched():
            return self.__getitems__([index])[0]
        vid = self.video_ids[index]
        (t1, t2), choice = self.draw(index)
        a, b = self.store.features(vid, [t1, t2])
        extra = self.return_view.read(vid, t1, a, choice)
        views = np.stack([a, b, extra.pop("a_ret")])
        item = {"views": torch.from_numpy(np.ascontiguousarray(views)),
                "frames": torch.tensor([t1, t2], dtype=torch.int64)}
        item.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in extra.items()})
        return item

    def __getitems__(self, indices: list[int]) -> list:
        """A whole batch (the DataLoader calls this instead of ``__getitem__`` per item): the
        batch ``{"views": (B, 3, H, W, C) as stored, "frames": (B, 2)}`` read in one gathered
        read per shard and array (A and B rows from ``features``, A' rows from ``pea_features``
        or A again for ``plain``) straight into one tensor, in shared memory in a DataLoader
        worker, as an :class:`~train.data.ItemBatch` (:func:`train.data.collate` hands it over
        without the stacking copy). The online view and int8 stores: the items one by one."""
        if not self._batched():
            return [self[i] for i in indices]
        n = len(indices)
        vids = [self.video_ids[i] for i in indices]
        draws = [self.draw(i) for i in indices]
        t1s = [t[0] for t, _ in draws]
        shape = self.store.feature_shape
        dtype = torch.from_numpy(np.empty(0, dtype=self.store.dtype.feature_dtype)).dtype
        views = batch_tensor((n, 3, *shape), dtype)
        frames = torch.tensor([t for t, _ in draws], dtype=torch.int64).reshape(n, 2)
        flat = views.numpy().reshape(n * 3, *shape)  # a view: row 3 b + v is view v of item b
        base = 3 * np.arange(n)
        self.store.gather_stored([v for v in vids for _ in (0, 1)], frames.reshape(-1).numpy(), flat,
                                 np.stack([base, base + 1], axis=1).reshape(-1))
        self.return_view.gather(vids, t1s, [c for _, c in draws], flat, base + 2)
        batch = {"views": views, "frames": frames}
        return ItemBatch([{k: v[b] for k, v in batch.items()} for b in range(n)], batch)
