"""Map-style datasets over the feature store (stage 2 never decodes video).

Each item is one video. Randomness is drawn from ``np.random.default_rng((seed, epoch,
index))``, so an item is the same whichever DataLoader worker or rank reads it and
whenever it is read: that makes resumed runs bit-identical to uninterrupted ones.

Shapes: a clip is ``(T, H, W, C)`` (store layout); models permute it themselves. Items keep
the store's float16 (half the bytes through workers, pinned memory and the host-to-device
copy); the training loop casts them to float32 on the device (:func:`to_model_dtype`), which
is exact: every float16 value is a float32 value. Other storage dtypes, and items that run
feature-space augmentations, are float32 already in the worker.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from pipeline.errors import FreezeframeError
from pipeline.registry import Registry
from pipeline.splits import read_split_table
from pipeline.store import CROP_PREFIX, FeatureStore, decode_crops, open_store, store_status
from train.schema import TrainConfig, raise_problems, range_problems
from train.sampling import PRPConfig, clip_fits, prp_clips, random_clip, test_clips


class DataError(FreezeframeError):
    """The store cannot feed the requested training (empty split, clips too long...)."""


class NonFiniteFeaturesError(DataError):
    """Stored features hold NaN or inf (a damaged shard): training on them would be garbage."""


# --------------------------------------------------------------------------------------
# feature-space augmentations (off by default: approximations of pixel augmentation)
# --------------------------------------------------------------------------------------
Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]
AUGMENTATIONS: Registry[Augment] = Registry("feature augmentation")


@AUGMENTATIONS.register("hflip")
def hflip(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flip the token grid left-right with p = 0.5 (T, H, W, C).

    An approximation of a pixel flip: a CNN/ViT feature of a flipped image is not exactly
    the flipped feature map (filters are not mirror-symmetric)."""
    return clip[:, :, ::-1].copy() if rng.random() < 0.5 else clip


@AUGMENTATIONS.register("grid-crop")
def grid_crop(clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crop of the token grid (60-100% of each side) resized back bilinearly.

    An approximation of random-resized-crop in pixels: tokens carry context from outside
    the crop and positional information of the full frame."""
    t, h, w, c = clip.shape
    if h < 2 or w < 2:
        return clip
    ch = max(1, int(round(h * rng.uniform(0.6, 1.0))))
    cw = max(1, int(round(w * rng.uniform(0.6, 1.0))))
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    x = torch.from_numpy(np.ascontiguousarray(clip[:, y0 : y0 + ch, x0 : x0 + cw])).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


#: augmentation -> words in a class name whose meaning it swaps (a mirrored "left" is a "right")
LABEL_CHANGING_WORDS: dict[str, tuple[str, ...]] = {"hflip": ("left", "right", "leftward", "rightward")}


def check_label_preserving(augment: tuple[str, ...], class_names: list[str]) -> None:
    """Refuse an augmentation that changes what a label means (e.g. ``hflip`` on classes named
    by a left/right direction: a flipped "up_left" clip shows "up_right" motion)."""
    for name in augment:
        words = LABEL_CHANGING_WORDS.get(name, ())
        hit = [c for c in class_names if set(re.split(r"[^a-z]+", str(c).lower())) & set(words)]
        if hit:
            raise DataError(
                f"data.augment has {name!r}, which changes the meaning of the labels {hit[:4]} "
                f"(it mirrors {'/'.join(words[:2])}): remove {name!r} from data.augment for this dataset, or "
                f"move it to data.relabel with the class each class becomes (data.relabel.{name} = [...])")


# --------------------------------------------------------------------------------------
# label-changing augmentations (data.relabel: name -> the class each class becomes)
# --------------------------------------------------------------------------------------
#: clip (T, H, W, C) -> the transformed clip; applied with p = 0.5 each, the label remapped
RELABELINGS: Registry[Callable[[np.ndarray], np.ndarray]] = Registry("label-changing augmentation")
RELABELINGS.add("reverse", lambda clip: clip[::-1].copy())  # exact: the frames played backwards
RELABELINGS.add("hflip", lambda clip: clip[:, :, ::-1].copy())  # approximate, like the "hflip" augmentation
RELABELINGS.add("vflip", lambda clip: clip[:, ::-1].copy())  # approximate: the token grid upside down


def check_relabel(relabel: dict[str, Sequence[int]], num_classes: int, augment: tuple[str, ...] = ()) -> None:
    """Refuse an unknown name, a map that is not a permutation of the ``num_classes`` classes,
    or a name that is also in ``data.augment`` (label-preserving there, remapped here)."""
    for name, perm in relabel.items():
        RELABELINGS.get(name)  # unknown: RegistryError naming the known ones
        if sorted(int(c) for c in perm) != list(range(num_classes)):
            raise DataError(f"data.relabel.{name} = {list(perm)} must list, for each of the {num_classes} classes, "
                            f"the class it becomes (a permutation of 0..{num_classes - 1})")
        if name in augment:
            raise DataError(f"{name!r} is in both data.augment (label kept) and data.relabel (label remapped); "
                            "keep it in one of them")


def apply_relabeling(relabel: dict[str, Sequence[int]], clip: np.ndarray, label: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Each augmentation of ``relabel`` (in its order) with p = 0.5; the label follows its map."""
    for name, perm in relabel.items():
        if rng.random() < 0.5:
            clip, label = RELABELINGS.get(name)(clip), int(perm[label])
    return clip, label


def apply_augmentations(names: tuple[str, ...], clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    for name in names:
        clip = AUGMENTATIONS.get(name)(clip, rng)
    return clip


#: IEEE exponent bits of each float dtype: all ones means inf or NaN
_EXPONENT = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}


def finite_rows(x: np.ndarray) -> np.ndarray:
    """(n, k) floats -> (n,) bool: every value of the row is finite. The same as
    ``np.isfinite(x).all(axis=1)``, read from the exponent bits (an integer mask and compare,
    about 15x faster on float16, which numpy's ``isfinite`` handles without SIMD)."""
    bits = _EXPONENT.get(x.dtype)
    if bits is None or not x.flags.c_contiguous:
        return np.isfinite(x).all(axis=1)
    uint, mask = bits
    return ((x.view(uint) & uint(mask)) != uint(mask)).all(axis=1)


class ItemBatch(list):
    """The items of one batch, as a list (what ``default_collate`` expects, and stacks), whose
    tensors are views of a batch the dataset already built, ``batch`` (e.g. ``(clips (B, ...),
    labels (B, ...))`` or a dict of ``(B, ...)`` tensors): :func:`collate` returns ``batch`` as
    it is, without copying."""

    def __init__(self, items: list, batch: Any) -> None:
        super().__init__(items)
        self.batch = batch


def collate(batch: list) -> Any:
    """The DataLoader's ``collate_fn`` for these datasets: an :class:`ItemBatch`'s ``batch`` as
    it is, anything else by ``default_collate``."""
    if isinstance(batch, ItemBatch):
        return batch.batch
    return default_collate(batch)


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker in shared memory, where the batch goes to the main
    process without a copy (allocated as torch's own ``default_collate`` does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    elem = torch.empty(0, dtype=dtype)
    storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
    return elem.new(storage).resize_(*shape)


def to_model_dtype(x: torch.Tensor) -> torch.Tensor:
    """A float16 tensor (features as stored) as float32, on its own device; anything else as it is."""
    return x.float() if x.dtype == torch.float16 else x


# --------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------
class StoreSplit(Dataset):
    """Base of the datasets over a feature store (here and ``train.cosettle_data``): the videos
    of one split in store order, their ``lengths`` (frames), and each item's rng from
    ``(seed, epoch, index)`` (see the module doc)."""

    def __init__(self, store: FeatureStore, split: str, seed: int = 0) -> None:
        self.store = store
        self.split = split
        self.video_ids = store.split_ids(split)
        if not self.video_ids:
            raise DataError(
                f"split {split!r} of store {store.path} has no videos "
                f"(splits present: {store.splits() or 'none'}); pick another split or re-extract"
            )
        self.lengths = np.array([store.num_frames(v) for v in self.video_ids])
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.video_ids)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, index))


class _StoreVideos(StoreSplit):
    """Base of the clip datasets: items read as (clip, label) batches, checked finite."""

    def _require_fitting_clip(self, desc: str, num_frames: int, stride: int, short_video: str, section: str) -> None:
        """Refuse a clip (``desc``, at rate 1) longer than every video when wrap-around is off."""
        if short_video == "clamp" and not any(clip_fits(int(n), num_frames, stride) for n in self.lengths):
            raise DataError(
                f"every video of split {self.split!r} is shorter than {desc} ({(num_frames - 1) * stride + 1} "
                f"frames): the clip is longer than every video (longest: {int(self.lengths.max())} frames) and "
                f"wrap-around is off; use fewer frames, a smaller stride, or {section}.short_video=wrap"
            )

    augment: tuple[str, ...] = ()
    relabel: dict[str, Sequence[int]] = {}  # label-changing augmentations (ClipDataset sets its own)

    def plan(self, index: int) -> tuple[str, np.ndarray, Any, np.random.Generator | None]:
        """Item ``index`` without its features: (video id, frame indices (..., T), label, its rng)."""
        raise NotImplementedError

    def __getitems__(self, indices: list[int]) -> list:
        """A whole batch (DataLoader calls this instead of ``__getitem__`` per item): the frames
        of every item read straight into one batch tensor, in shared memory when read in a
        DataLoader worker, so :func:`collate` hands it over without the stacking copy. With
        augmentations (label-changing ones included) or an int8 store: the items one by one."""
        if self.augment or self.relabel or self.store.dtype.extras:
            return [self[i] for i in indices]
        plans = [self.plan(i) for i in indices]
        shape = self.store.feature_shape
        dtype = torch.from_numpy(np.empty(0, dtype=self.store.dtype.feature_dtype)).dtype
        clips = batch_tensor((len(plans), *plans[0][1].shape, *shape), dtype)
        flat = clips.numpy()
        for b, (vid, idx, _, _) in enumerate(plans):
            dest = flat[b].reshape(-1, *shape)  # a view: the batch is contiguous
            self.store.stored_features(vid, idx.reshape(-1), out=dest)
            self.checked(vid, idx.reshape(-1), dest)
        labels = default_collate([p[2] for p in plans])
        return ItemBatch([(clips[b], labels[b]) for b in range(len(plans))], (clips, labels))

    def frames(self, video_id: str, indices: np.ndarray, augment: tuple[str, ...] = ()) -> np.ndarray:
        """Frames ``indices`` (n,) of a video, ``(n, H, W, C)``, checked finite: as stored (float16)
        when the store holds float16 and no augmentation will run on them, else float32 (the
        augmentations compute in float32, int8 is dequantised here)."""
        if augment or self.store.dtype.extras:
            feats = self.store.features(video_id, indices)
        else:
            feats = self.store.stored_features(video_id, indices)["features"]
        return self.checked(video_id, indices, feats)

    def checked(self, video_id: str, indices: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """``feats`` (``len(indices)`` frames first) unless a value is NaN/inf: then
        :class:`NonFiniteFeaturesError` naming the video, the stored frame and its shard."""
        finite = finite_rows(feats.reshape(len(indices), -1))
        if not finite.all():
            frame = int(np.asarray(indices)[int(np.argmin(finite))])
            raise NonFiniteFeaturesError(
                f"video {video_id!r} frame {frame} in store {self.store.path} (shard {self.store.meta(video_id).shard}) "
                f"has NaN/inf features: the store is damaged. Run `freezeframe verify {self.store.path}`, re-extract "
                "the damaged shards, or set data.skip_bad_videos=true to leave such videos out")
        return feats

    def drop_bad_videos(self) -> list[str]:
        """Scan every video of the split and leave out those with NaN/inf features (before
        training, on every rank alike); returns the ids left out."""
        bad = [v for v in self.video_ids if not np.isfinite(self.store.features(v)).all()]
        if bad:
            keep = [i for i, v in enumerate(self.video_ids) if v not in set(bad)]
            self.video_ids = [self.video_ids[i] for i in keep]
            self.lengths = self.lengths[keep]
            if not self.video_ids:
                raise DataError(f"every video of split {self.split!r} of store {self.store.path} has NaN/inf features; "
                                "re-extract the store")
        return bad

    def label(self, index: int) -> int:
        lab = self.store.meta(self.video_ids[index]).label
        if lab is None:
            raise DataError(f"video {self.video_ids[index]!r} has no label; fine-tuning needs labels")
        return int(lab)


class PRPDataset(_StoreVideos):
    """Playback-rate perception: ``clips_per_video`` clips per video, each with its own rate.

    Item: ``(clips (K, T, H, W, C) float16 as stored (or float32, see :meth:`frames`), rate labels (K,) int64)``. Resampling at rate r
    is done by choosing cached frame indices (``train.sampling.prp_clips``), exactly what
    decoding those frames would give.
    """

    def __init__(self, store: FeatureStore, split: str, cfg: PRPConfig, seed: int = 0,
                 augment: tuple[str, ...] = ()) -> None:
        super().__init__(store, split, seed)
        self.cfg = cfg
        self.augment = augment
        self._require_fitting_clip("a PRP clip at rate 1", cfg.num_frames, cfg.stride, cfg.short_video, "prp")

    def plan(self, index: int) -> tuple[str, np.ndarray, torch.Tensor, np.random.Generator]:
        rng = self._rng(index)
        clips = prp_clips(int(self.lengths[index]), rng, self.cfg)
        idx = np.stack([c.indices for c in clips])  # (K, T)
        return self.video_ids[index], idx, torch.from_numpy(np.array([c.rate_label for c in clips], dtype=np.int64)), rng

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        vid, idx, labels, rng = self.plan(index)
        feats = self.frames(vid, idx.reshape(-1), self.augment).reshape(*idx.shape, *self.store.feature_shape)
        if self.augment:
            feats = np.stack([apply_augmentations(self.augment, f, rng) for f in feats])
        return torch.from_numpy(np.ascontiguousarray(feats)), labels


@dataclass(frozen=True)
class ClipConfig:
    """A clip of ``num_frames`` frames, ``stride`` frames apart."""

    num_frames: int = 8
    stride: int = 2
    short_video: str = "wrap"  # wrap | clamp (see train.sampling)

    def __post_init__(self) -> None:
        raise_problems(range_problems(self, at_least=[("num_frames", 1), ("stride", 1)]))


class ClipDataset(_StoreVideos):
    """Fine-tuning: one random clip per video per epoch. Item: ``((T, H, W, C), label)``.

    ``relabel``: label-changing augmentations (:data:`RELABELINGS`) and the class each class
    becomes under them, e.g. ``{"reverse": [3, 2, 1, 0]}``, applied after ``augment``."""

    def __init__(self, store: FeatureStore, split: str, cfg: ClipConfig, seed: int = 0,
                 augment: tuple[str, ...] = (), relabel: dict[str, Sequence[int]] | None = None) -> None:
        super().__init__(store, split, seed)
        self.cfg = cfg
        self.augment = augment
        self.relabel = dict(relabel or {})
        self._require_fitting_clip(f"a clip of {cfg.num_frames} frames at stride {cfg.stride}", cfg.num_frames,
                                   cfg.stride, cfg.short_video, "clip")

    def plan(self, index: int) -> tuple[str, np.ndarray, int, np.random.Generator]:
        rng = self._rng(index)
        idx = random_clip(int(self.lengths[index]), rng, self.cfg.num_frames, self.cfg.stride, self.cfg.short_video)
        return self.video_ids[index], idx, self.label(index), rng

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        vid, idx, label, rng = self.plan(index)
        clip = self.frames(vid, idx, self.augment)
        if self.augment:
            clip = apply_augmentations(self.augment, clip, rng)
        if self.relabel:
            clip, label = apply_relabeling(self.relabel, clip, label, rng)
        return torch.from_numpy(np.ascontiguousarray(clip)), label


#: ``test.spatial_crops`` values: 1 (the centre crop), 3 (+ the 2 stored side crops: the
#: 30-view test), ``auto`` (3 when the store has crops for every test video, else 1)
SPATIAL_CROPS = (1, 3, "auto")


@dataclass(frozen=True)
class TestViewConfig:
    """Test views: ``num_clips`` clips spread evenly x ``spatial_crops`` spatial crops per clip
    (AdViSe: 10 x 3 = 30 views; the crops are stored at extraction, ``extract test_crops=3``)."""

    num_clips: int = 10
    num_frames: int = 8
    stride: int = 8
    short_video: str = "wrap"
    spatial_crops: int | str = "auto"  # 1 | 3 | auto

    def __post_init__(self) -> None:
        problems = range_problems(self, at_least=[("num_clips", 1), ("num_frames", 1), ("stride", 1)])
        if isinstance(self.spatial_crops, bool) or self.spatial_crops not in SPATIAL_CROPS:
            problems.append(f"spatial_crops must be 1, 3 or 'auto' (3 when every test video has stored crops), "
                            f"got {self.spatial_crops!r}")
        raise_problems(problems)


#: where the centre crop is among a clip's spatial crops (:meth:`FeatureStore.crop_views` order)
CENTRE_CROP = {1: 0, 3: 1}


def resolve_spatial_crops(store: FeatureStore, video_ids: Sequence[str], asked: int | str) -> tuple[int, str]:
    """The spatial crops per clip to test ``video_ids`` with, and why (for the eval output).

    ``auto``: 3 when the store has the side crops of every one of them, else 1. ``3`` with a
    video that has none: one :class:`DataError` listing them (what to re-extract)."""
    if asked == 1:
        return 1, "centre crop (test.spatial_crops=1)"
    missing = [v for v in video_ids if not store.has_crops(v)]
    if asked == "auto":
        if not missing:
            return 3, "3 crops (auto: the store has them for every test video)"
        why = ("the store was extracted without test crops" if store.test_crops_count == 1 else
               f"{len(missing)} of {len(video_ids)} test videos have no stored crops")
        return 1, f"centre crop (auto: {why})"
    if missing:
        more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise DataError(
            f"test.spatial_crops=3 but {len(missing)} of {len(video_ids)} test videos have no stored side crops in "
            f"{store.path}: {', '.join(missing[:20])}{more}. Re-extract them with `--set test_crops=3` and their split "
            "in test_crop_splits (e.g. test_crop_splits=[\"all\"] when a split table picks the test videos), or "
            "test with test.spatial_crops=1")
    return 3, "3 crops (test.spatial_crops=3)"


class TestViewDataset(_StoreVideos):
    """All test views of a video. Item: ``((V, T, H, W, C), label)`` with ``V = clips x crops``,
    view ``v = k * crops + c`` for clip ``k`` and spatial crop ``c`` (first side, centre, second
    side: :data:`CENTRE_CROP`); logits are averaged over V. ``crops`` / ``crops_note``: the
    spatial crops used and why (``test.spatial_crops``, :func:`resolve_spatial_crops`)."""

    __test__ = False  # not a pytest class

    def __init__(self, store: FeatureStore, split: str, cfg: TestViewConfig) -> None:
        super().__init__(store, split, 0)
        self.cfg = cfg
        self.crops, self.crops_note = resolve_spatial_crops(store, self.video_ids, cfg.spatial_crops)

    @property
    def views(self) -> int:
        """V, the views per video: clips x spatial crops."""
        return self.cfg.num_clips * self.crops

    def plan(self, index: int) -> tuple[str, np.ndarray, int, None]:
        idx = test_clips(int(self.lengths[index]), self.cfg.num_clips, self.cfg.num_frames, self.cfg.stride,
                         self.cfg.short_video)  # (clips, T)
        return self.video_ids[index], idx, self.label(index), None

    def __getitems__(self, indices: list[int]) -> list:
        if self.crops == 1:
            return super().__getitems__(indices)
        return [self[i] for i in indices]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        vid, idx, label, _ = self.plan(index)
        shape = self.store.feature_shape
        flat = idx.reshape(-1)
        feats = self.frames(vid, flat).reshape(*idx.shape, *shape)  # (clips, T, H, W, C)
        if self.crops == 1:
            return torch.from_numpy(np.ascontiguousarray(feats)), label
        sides = self.store.stored_crops(vid, flat)
        if self.store.dtype.extras:
            side = decode_crops(self.store.dtype, sides)
            feats = feats.astype(np.float32, copy=False)
        else:
            side = sides[CROP_PREFIX + "features"]
        self.checked(vid, flat, side)
        side = side.reshape(*idx.shape, 2, *shape)  # (clips, T, 2, H, W, C)
        views = np.stack([side[:, :, 0], feats, side[:, :, 1]], axis=1)  # (clips, 3, T, H, W, C)
        return torch.from_numpy(np.ascontiguousarray(views.reshape(-1, *views.shape[2:]))), label


def flatten_clips(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, T, H, W, C), (B, K) -> (B*K, T, H, W, C), (B*K,) in (video, clip) order."""
    x, y = batch
    return x.flatten(0, 1), y.flatten(0, 1)


def open_training_store(cfg: TrainConfig) -> FeatureStore:
    """The run's feature store (``data.store``), with the splits of ``data.splits`` when given (a
    split table, :mod:`pipeline.splits`), read into RAM first when ``data.in_memory`` says so
    (``auto``: when its features take less than ``data.in_memory_max_gb`` GiB). An incomplete
    store is refused unless ``data.allow_incomplete``."""
    if not cfg.data.store:
        raise FreezeframeError("no feature store given: set data.store (or --store) to a store made by `freezeframe extract`")
    status = store_status(cfg.data.store)
    if status.complete_shards < status.planned_shards and not cfg.data.allow_incomplete:
        raise DataError(
            f"store {cfg.data.store} is incomplete: {status.complete_shards} of {status.planned_shards} shards "
            f"extracted ({status.videos_stored} of {status.planned_videos} videos); finish it by rerunning "
            "`freezeframe extract` with the same arguments, or set data.allow_incomplete=true to train on the "
            "videos stored so far")
    store = open_store(cfg.data.store)
    if cfg.data.splits:  # splits (and labels) chosen now, not at extraction
        store.apply_split_table(read_split_table(cfg.data.splits), f"split table {cfg.data.splits}")
    mode = cfg.data.in_memory
    if mode == "yes" or (mode == "auto" and _store_bytes(store) < cfg.data.in_memory_max_gb * 2**30):
        store.load_into_memory()
    return store


def _store_bytes(store: FeatureStore) -> int:
    """Bytes of every feature of the store, in RAM (the side-crop arrays of a store with test
    crops hold 2 more rows per frame, zeros for the videos without crops)."""
    h, w, c = store.feature_shape
    item = {"float16": 2, "float32": 4, "int8": 1}[store.dtype.feature_dtype]
    frames = sum(int(m["num_frames"]) for m in store.markers.values())
    return frames * h * w * c * item * store.test_crops_count
