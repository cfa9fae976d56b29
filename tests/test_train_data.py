"""Stage-2 datasets over real and synthetic stores (train/data.py).

The key property of the method: a PRP item read from the store is exactly what decoding the
same frames and running the same frozen backbone on them gives. Plus shapes, seeding by
(seed, epoch, index) across DataLoader worker processes, and the short-video policies.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from extract.backbones import create_backbone
from extract.decode import Geometry, decode_all
from pipeline.store import open_store
from tests.stores import RealStore, SynthStore, make_real_store, write_synthetic_store
from train.data import ClipConfig, ClipDataset, DataError, PRPDataset, to_model_dtype
from train.data import TestViewConfig as ViewConfig
from train.data import TestViewDataset as ViewDataset
from train.sampling import PRPConfig, prp_clips, random_clip, test_clips


@pytest.fixture(scope="module")
def real_store(tmp_path_factory: pytest.TempPathFactory) -> RealStore:
    return make_real_store(tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthStore:
    # lengths 6..40 frames: some shorter than a clip (wrap/clamp matter), some longer
    return write_synthetic_store(tmp_path_factory.mktemp("synth") / "s.zarr",
                                 video_lengths=[6, 40, 9, 33, 25, 12, 38, 20, 30, 7, 22, 36])


# --------------------------------------------------------------------------------------
# 1. PRP batch from the store == decode + backbone on the same frames
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_prp_item_equals_decoding_and_backbone(real_store: RealStore) -> None:
    store = open_store(real_store.path)
    cfg = PRPConfig(num_frames=4, stride=2, clips_per_video=3, jitter=0.2)
    ds = PRPDataset(store, "train", cfg, seed=7)
    ds.set_epoch(3)
    torch.manual_seed(0)  # irrelevant: the weights come from the same file as the extraction
    backbone = create_backbone(real_store.backbone, weights=real_store.weights,
                               image_size=real_store.image_size).eval()
    geometry = Geometry(size=backbone.preprocess.size, mode=real_store.geometry,
                        interpolation=backbone.preprocess.interpolation)
    assert store.content["geometry"] == dataclasses.asdict(geometry)
    checked = 0
    for index in range(len(ds)):
        x, y = ds[index]
        vid = ds.video_ids[index]
        length = store.num_frames(vid)
        # the same draws as the dataset: rng seeded by (seed, epoch, index)
        clips = prp_clips(length, np.random.default_rng((7, 3, index)), cfg)
        assert y.tolist() == [c.rate_label for c in clips]
        idx = np.stack([c.indices for c in clips])  # (K, T)
        frames = decode_all(real_store.video_paths[vid], geometry=geometry).frames  # (N, S, S, 3)
        assert len(frames) == length  # every frame was stored (fps=None)
        with torch.inference_mode():
            ref = backbone(backbone.prepare(frames[idx.reshape(-1)]))  # (K*T, H, W, C)
        ref = ref.reshape(*idx.shape, *ref.shape[1:]).numpy()
        assert x.shape == ref.shape == (3, 4, 2, 2, 1280)
        assert x.dtype == torch.float32
        scale = float(np.abs(ref).max())
        assert scale > 0.1  # the features are not trivially zero
        # float32 through ~50 conv layers with other batch sizes / conv algorithms than the
        # extraction's: equal up to summation order (observed <= 1e-5 of the feature scale)
        np.testing.assert_allclose(x.numpy(), ref, rtol=1e-4, atol=5e-5 * scale)
        # ...and that tolerance tells frames apart: the neighbouring frame's features are far off
        with torch.inference_mode():
            shifted = backbone(backbone.prepare(frames[(idx.reshape(-1) + 1) % length])).numpy()
        assert np.abs(shifted.reshape(ref.shape) - ref).max() > 100 * 5e-5 * scale
        checked += 1
    assert checked == 4
    # different epochs give different clips on the same video
    a, _ = ds[0]
    ds.set_epoch(4)
    b, _ = ds[0]
    assert not torch.equal(a, b)


# --------------------------------------------------------------------------------------
# 2. shapes, seeding across workers and epochs, wrap vs clamp
# --------------------------------------------------------------------------------------
def _frame_ids(clip: torch.Tensor) -> np.ndarray:
    """Channel 0 of the synthetic store holds the frame index: (..., T, H, W, C) -> (..., T)."""
    ids = clip[..., 0]
    assert torch.all(ids == ids[..., :1, :1])  # constant over the grid
    return ids[..., 0, 0].numpy().astype(np.int64)


def _video_no(clip: torch.Tensor) -> int:
    values = torch.unique(clip[..., 1])
    assert values.numel() == 1
    return int(values)


def test_shapes_and_indices(synth: SynthStore) -> None:
    store = open_store(synth.path)
    prp = PRPDataset(store, "train", PRPConfig(num_frames=5, stride=2, clips_per_video=3), seed=1)
    clip = ClipDataset(store, "train", ClipConfig(num_frames=6, stride=2), seed=1)
    views = ViewDataset(store, "test", ViewConfig(num_clips=4, num_frames=3, stride=3))
    assert len(prp) == len(clip) == 8 and len(views) == 4
    x, y = prp[2]
    assert x.shape == (3, 5, 2, 2, 16) and y.shape == (3,) and y.dtype == torch.int64
    assert set(y.tolist()) <= {0, 1, 2, 3}
    assert _video_no(x) == 2
    c, label = clip[2]
    assert c.shape == (6, 2, 2, 16) and label == synth.videos[2].label
    v, label = views[1]
    assert v.shape == (4, 3, 2, 2, 16) and label == synth.split("test")[1].label
    # the gathered frames are exactly the sampler's indices
    length = synth.videos[3].length
    expected = random_clip(length, np.random.default_rng((1, 0, 3)), 6, 2, "wrap")
    assert _frame_ids(clip[3][0]).tolist() == expected.tolist()
    np.testing.assert_array_equal(clip[3][0].numpy(), synth.features["train-003"][expected])
    tv = synth.split("test")[1]
    np.testing.assert_array_equal(_frame_ids(v), test_clips(tv.length, 4, 3, 3))
    # a batch of PRP items: (B, K, T, H, W, C)
    xb, yb = next(iter(DataLoader(prp, batch_size=4)))
    assert xb.shape == (4, 3, 5, 2, 2, 16) and yb.shape == (4, 3)


def _epoch_items(ds: torch.utils.data.Dataset, epoch: int, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ds.set_epoch(epoch)  # type: ignore[attr-defined]
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                        multiprocessing_context="fork" if workers else None)
    return [(x.clone(), torch.as_tensor(y)) for x, y in loader]


def test_items_same_in_worker_processes_and_differ_across_epochs(synth: SynthStore) -> None:
    store = open_store(synth.path)  # lazily opened zarr handles, reopened in each worker
    for ds in (PRPDataset(store, "train", PRPConfig(num_frames=4, stride=2, clips_per_video=2), seed=3),
               ClipDataset(store, "train", ClipConfig(num_frames=4, stride=2), seed=3)):
        main = _epoch_items(ds, 5, 0)
        workers = _epoch_items(ds, 5, 2)
        assert len(main) == len(workers) == 8
        for (a, la), (b, lb) in zip(main, workers):
            assert torch.equal(a, b) and torch.equal(la, lb)
        other = _epoch_items(ds, 6, 0)
        changed = sum(not torch.equal(a, b) for (a, _), (b, _) in zip(main, other))
        assert changed >= 6  # almost every item is drawn anew in another epoch
    # another seed, same epoch: different items too
    a = PRPDataset(store, "train", PRPConfig(num_frames=4), seed=3)[1][0]
    b = PRPDataset(store, "train", PRPConfig(num_frames=4), seed=4)[1][0]
    assert not torch.equal(a, b)


def test_wrap_vs_clamp_on_short_video(synth: SynthStore) -> None:
    store = open_store(synth.path)
    short = [i for i, v in enumerate(synth.split("train")) if v.length < 15]
    assert short  # train-000 has 6 frames, train-002 9 frames, train-005 12 frames
    wrap = ClipDataset(store, "train", ClipConfig(num_frames=8, stride=2, short_video="wrap"), seed=0)
    clamp = ClipDataset(store, "train", ClipConfig(num_frames=8, stride=2, short_video="clamp"), seed=0)
    for i in short:
        length = synth.videos[i].length
        w = _frame_ids(wrap[i][0])
        c = _frame_ids(clamp[i][0])
        assert w.tolist() == [(2 * k) % length for k in range(8)]  # start 0, taken mod L
        assert np.any(np.diff(w) < 0)  # jumps back to the start
        assert c.tolist() == [min(2 * k, length - 1) for k in range(8)]  # start 0, last frame repeated
        assert np.all(np.diff(c) >= 0) and c[-1] == length - 1
    # a long video is never wrapped or clamped by either policy
    for i, v in enumerate(synth.split("train")):
        if v.length >= 15:
            for ds in (wrap, clamp):
                ids = _frame_ids(ds[i][0])
                assert np.all(np.diff(ids) == 2)
    # PRP with clamp: monotone indices, all inside the video
    prp = PRPDataset(store, "train", PRPConfig(num_frames=4, stride=2, short_video="clamp"), seed=0)
    for i in range(len(prp)):
        ids = _frame_ids(prp[i][0])  # (K, T)
        assert np.all(np.diff(ids, axis=1) >= 0) and ids.max() < synth.videos[i].length


def test_refusals_of_datasets(synth: SynthStore) -> None:
    store = open_store(synth.path)
    with pytest.raises(DataError, match=r"split 'val' .* has no videos .*splits present"):
        ClipDataset(store, "val", ClipConfig())
    with pytest.raises(DataError, match="longer than every video .* wrap-around is off"):
        ClipDataset(store, "train", ClipConfig(num_frames=8, stride=20, short_video="clamp"))
    with pytest.raises(DataError, match="shorter than a PRP clip .* wrap-around is off"):
        PRPDataset(store, "train", PRPConfig(num_frames=8, stride=20, short_video="clamp"))
    # with wrap-around the same config is allowed (released behaviour)
    assert len(ClipDataset(store, "train", ClipConfig(num_frames=8, stride=20, short_video="wrap"))) == 8


# --------------------------------------------------------------------------------------
# 1b. the same equivalence on the default float16 store, with a CNN and with a ViT
# --------------------------------------------------------------------------------------
#: float16 unit roundoff (round to nearest, 10 stored mantissa bits): |fp16(x) - x| <= 2**-11 |x|
#: for normal numbers, and <= 2**-25 (half the subnormal spacing 2**-24) below 2**-14
FP16_RTOL = 2.0 ** -11
FP16_ATOL = 2.0 ** -25


@pytest.mark.slow
@pytest.mark.parametrize("backbone,image_size,shape", [
    ("mobilenetv2-imagenet", 64, (2, 2, 1280)),  # the default backbone
    ("dinov2-vits14", 28, (2, 2, 384)),  # a ViT: patch tokens after the final norm
])
def test_prp_item_equals_decoding_and_backbone_on_float16_store(
        tmp_path: Path, backbone: str, image_size: int, shape: tuple[int, int, int]) -> None:
    """A PRP item from a float16 store equals decode + backbone on the same frames up to the
    float16 rounding of the stored value, stated here from the storage dtype:

        |stored - ref| <= 2**-11 * |ref| + 2**-25 + (float32 recomputation noise)

    with the float32 recomputation noise bounded as in the float32 test above (other batch
    sizes and algorithms than the extraction's: 1e-4 relative, 5e-5 of the feature scale)."""
    real = make_real_store(tmp_path, dtype="float16", backbone=backbone, image_size=image_size, num_videos=2,
                           frames=(24, 30))
    store = open_store(real.path)
    assert store.dtype.feature_dtype == "float16"  # the default extraction dtype
    cfg = PRPConfig(num_frames=4, stride=2, clips_per_video=3, jitter=0.2)
    ds = PRPDataset(store, "train", cfg, seed=11)
    backbone_net = create_backbone(real.backbone, weights=real.weights, image_size=real.image_size).eval()
    geometry = Geometry(size=backbone_net.preprocess.size, mode=real.geometry,
                        interpolation=backbone_net.preprocess.interpolation)
    for index in range(len(ds)):
        x, y = ds[index]
        vid = ds.video_ids[index]
        length = store.num_frames(vid)
        clips = prp_clips(length, np.random.default_rng((11, 0, index)), cfg)
        assert y.tolist() == [c.rate_label for c in clips]
        idx = np.stack([c.indices for c in clips])
        frames = decode_all(real.video_paths[vid], geometry=geometry).frames
        with torch.inference_mode():
            ref = backbone_net(backbone_net.prepare(frames[idx.reshape(-1)]))
            shifted = backbone_net(backbone_net.prepare(frames[(idx.reshape(-1) + 1) % length]))
        ref = ref.reshape(*idx.shape, *ref.shape[1:]).numpy().astype(np.float64)
        # the item keeps the storage dtype; the loop casts it on the device (exactly)
        assert x.shape == ref.shape == (3, 4, *shape) and x.dtype == torch.float16
        x = to_model_dtype(x)
        assert x.dtype == torch.float32
        scale = float(np.abs(ref).max())
        assert scale > 0.1
        err = np.abs(x.numpy().astype(np.float64) - ref)
        bound = (FP16_RTOL + 1e-4) * np.abs(ref) + FP16_ATOL + 5e-5 * scale
        assert np.all(err <= bound), float((err - bound).max())
        # the float16 rounding is really there (the store is not float32 in disguise) ...
        assert float(err.max()) > 1e-6 * scale
        # ... and the tolerance still tells neighbouring frames apart
        far = np.abs(shifted.numpy().reshape(ref.shape) - ref)
        assert far.max() > 20 * bound.max()


def test_hflip_is_refused_on_left_right_labels(tmp_path: Path) -> None:
    """A horizontal flip turns an "up_left" clip into "up_right" motion: fine-tuning refuses it
    before any training; on labels without a direction it is allowed."""
    from train.config import resolve_train_config
    from train.loop import fit

    store = write_synthetic_store(tmp_path / "s.zarr", num_classes=3, label_names=("up_left", "up_right", "still"))
    cfg = resolve_train_config("finetune", None, None, [
        f'data.store="{store.path}"', f'run_dir="{tmp_path / "run"}"', 'data.augment=["hflip"]', "data.workers=0",
        "model.num_classes=3", "model.tmm.in_channels=16", "optim.epochs=1", "clip.num_frames=4"])
    with pytest.raises(DataError, match="hflip.*up_left"):
        fit(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    from train.data import check_label_preserving

    check_label_preserving(("hflip",), ["class0", "playing_guitar"])  # no direction in the names: allowed
    check_label_preserving(("grid-crop",), ["up_left"])  # a crop does not mirror


def test_relabel_reverses_clips_and_remaps_their_labels(tmp_path: Path) -> None:
    """``data.relabel = {reverse = [...]}``: about half the items are the same clip played
    backwards with the mapped label, the others unchanged; over epochs both happen for a video."""
    from train.data import apply_relabeling

    store = write_synthetic_store(tmp_path / "s.zarr", splits={"train": 4}, num_classes=4, lengths=(24, 24))
    cfg = ClipConfig(num_frames=6, stride=2)
    plain = ClipDataset(open_store(store.path), "train", cfg, seed=3)
    perm = [3, 2, 1, 0]
    rev = ClipDataset(open_store(store.path), "train", cfg, seed=3, relabel={"reverse": perm})
    seen = set()
    for epoch in range(6):
        plain.set_epoch(epoch)
        rev.set_epoch(epoch)
        for i in range(len(rev)):
            (xp, yp), (xr, yr) = plain[i], rev[i]
            if yr == yp:
                assert torch.equal(xr, xp)
                seen.add("kept")
            else:
                assert yr == perm[yp]
                assert torch.equal(xr, xp.flip(0))  # the same clip (same frames drawn), backwards
                seen.add("reversed")
    assert seen == {"kept", "reversed"}
    clip = np.arange(2 * 2 * 3 * 1, dtype=np.float32).reshape(2, 2, 3, 1)
    flips = {apply_relabeling({"hflip": [1, 0]}, clip, 0, np.random.default_rng(s))[1] for s in range(8)}
    assert flips == {0, 1}
    out, lab = next((o, lab) for s in range(8)
                    for o, lab in [apply_relabeling({"hflip": [1, 0]}, clip, 0, np.random.default_rng(s))] if lab == 1)
    assert np.array_equal(out, clip[:, :, ::-1])


def test_relabel_is_checked_before_training(tmp_path: Path) -> None:
    """A map that is not a permutation of the classes, an unknown name or a name also in
    data.augment is refused before training; hflip with a map is allowed on left/right labels."""
    from pipeline.registry import RegistryError
    from train.config import resolve_train_config
    from train.loop import fit

    store = write_synthetic_store(tmp_path / "s.zarr", num_classes=2, label_names=("left", "right"))
    base = [f'data.store="{store.path}"', "data.workers=0", "model.num_classes=2", "model.tmm.in_channels=16",
            "optim.epochs=1", "clip.num_frames=4", "test.num_clips=2", "test.num_frames=4", "model.tmm.hidden=8",
            "model.tmm.out_channels=8", "model.mlp_dim=8"]
    for i, (extra, err) in enumerate([
        (["data.relabel.reverse=[0, 0]"], "permutation"),
        (["data.relabel.reverse=[1, 0, 2]"], "permutation"),
        (['data.augment=["hflip"]', "data.relabel.hflip=[1, 0]"], "both data.augment"),
    ]):
        with pytest.raises(DataError, match=err):
            fit(resolve_train_config("finetune", None, None, base + [f'run_dir="{tmp_path / f"r{i}"}"'] + extra))
    with pytest.raises(RegistryError, match="reverse"):
        fit(resolve_train_config("finetune", None, None, base + [f'run_dir="{tmp_path / "r9"}"', "data.relabel.spin=[1, 0]"]))
    res = fit(resolve_train_config("finetune", None, None, base + [f'run_dir="{tmp_path / "ok"}"',
                                                                  "data.relabel.hflip=[1, 0]",
                                                                  "data.relabel.reverse=[1, 0]"]))
    assert res.top1 is not None
