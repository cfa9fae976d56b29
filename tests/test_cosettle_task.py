"""The ``cosettle`` training task: released recipe defaults, sampling, training on PEA / plain /
online return views, kill and exact resume, weight decay on matrices only, refusals."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from extract.config import ExtractConfig
from extract.encode import build_backbone
from extract.pea import PEAError, pea_forward
from extract.runner import run_extract
from pipeline.errors import ConfigMismatchError
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.store import open_store
from tests.stores import make_real_store, train_config, write_synthetic_store
from tests.videos import make_lossless_video, pattern_frames
from train.config import resolve_train_config
from train.cosettle_data import CosettleDataError, CosettleDataset, sample_pair
from train.data import collate
from train.losses import cosettle_loss
from train.loop import fit
from train.rundir import RunDir
from train.tasks import get_task

TINY = ["optim.batch_size=2", "optim.epochs=2", "optim.warmup_epochs=1", "data.workers=0", "log_every=1",
        "checkpoint_every=1", "seed=3"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pea_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 real lossless videos (12-16 frames) through a random-weight DINOv2-S/14 with 4 registers
    at 56 px (4 x 4 x 384 tokens), 2 PEA views per frame, float32."""
    tmp = tmp_path_factory.mktemp("pea")
    rows = []
    for i in range(4):
        p = make_lossless_video(tmp / f"v{i}.mp4", pattern_frames(12 + i, 48, 64, seed=i), 10)
        rows.append(ManifestRow(f"v{i}", str(p), "train", i % 2, f"c{i % 2}"))
    manifest = write_manifest(rows, tmp / "m.jsonl")
    store = tmp / "s.zarr"
    run_extract(ExtractConfig(manifest=str(manifest), store=str(store), backbone="dinov2-vits14-reg",
                              random_weights=True, image_size=56, dtype="float32", pea_views=2, pea_seed=5,
                              videos_per_shard=2, batch_size=5, workers=1, device="cpu", progress=False))
    return store


def _cfg(store: Path, run: Path, *extra: str):
    return train_config("cosettle", store, run, *TINY, *extra)


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_defaults_are_the_released_recipe(tmp_path: Path) -> None:
    cfg = resolve_train_config("cosettle", None, None, [])
    o = cfg.optim
    assert (o.betas, o.weight_decay, o.epochs, o.warmup_epochs, o.batch_size) == ((0.9, 0.95), 0.05, 5, 1.0, 512)
    assert o.base_lr * 512 / 64 == pytest.approx(1e-4 * 512 / 256)  # the loop's scaling = the release's
    t = cfg.task_cfg
    assert (t.tau, t.lam, t.gap_fraction, t.pool_window, t.arch, t.return_view) == (0.03, 3.0, 0.15, 2, "linear", "auto")
    # PRP keeps its own defaults
    assert resolve_train_config("prp", None, None, []).optim.betas == (0.9, 0.999)


def test_sampling_follows_the_released_code() -> None:
    rng = np.random.default_rng(0)
    pairs = [sample_pair(20, 0.15, rng) for _ in range(2000)]
    assert all(t2 - t1 == 3 for t1, t2 in pairs)
    assert min(t1 for t1, _ in pairs) == 1 and max(t1 for t1, _ in pairs) == 16  # t1 in [1, 20 - 3)
    short = [sample_pair(4, 0.15, rng) for _ in range(500)]  # n <= 4: two independent frames
    assert {t for p in short for t in p} == {0, 1, 2, 3} and any(a != b for a, b in short)
    assert all(0 <= a < 6 and 0 <= b < 6 for a, b in (sample_pair(6, 0.15, rng) for _ in range(100)))  # gap 0


def test_pea_items_hold_stored_tokens(pea_store: Path) -> None:
    store = open_store(pea_store)
    ds = CosettleDataset(store, "train", "auto", seed=1)
    for i in range(len(ds)):
        item = ds[i]
        (t1, t2), view = ds.draw(i)
        vid = ds.video_ids[i]
        assert item["frames"].tolist() == [t1, t2] and t2 - t1 == int(0.15 * store.num_frames(vid))
        np.testing.assert_array_equal(item["views"][0].numpy(), store.features(vid, [t1])[0])
        np.testing.assert_array_equal(item["views"][1].numpy(), store.features(vid, [t2])[0])
        np.testing.assert_array_equal(item["views"][2].numpy(), store.pea_features(vid, [t1], [view])[0])
        assert not np.allclose(item["views"][2].numpy(), item["views"][0].numpy())


@pytest.mark.parametrize("view", ["pea", "plain"])
def test_a_batch_is_read_as_one_and_equals_its_items(pea_store: Path, view: str) -> None:
    """__getitems__ (one gathered read per shard and array, into one tensor) gives each item's
    stored tokens, in the DataLoader's order, also from a worker (shared memory)."""
    store = open_store(pea_store)
    ds = CosettleDataset(store, "train", view, seed=2)
    ds.set_epoch(1)
    order = [3, 0, 2, 1, 0]  # videos of both shards, one twice
    batch = collate(ds.__getitems__(order))
    assert batch["views"].shape == (5, 3, *store.feature_shape) and batch["views"].dtype == torch.float32
    for b, i in enumerate(order):
        (t1, t2), choice = ds.draw(i)
        vid = ds.video_ids[i]
        a_ret = store.pea_features(vid, [t1], [choice])[0] if view == "pea" else store.features(vid, [t1])[0]
        want = np.stack([*store.features(vid, [t1, t2]), a_ret])
        np.testing.assert_array_equal(batch["views"][b].numpy(), want)
        assert batch["frames"][b].tolist() == [t1, t2]
        np.testing.assert_array_equal(ds[i]["views"].numpy(), want)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=order[:4], num_workers=1, collate_fn=collate)
    (from_worker,) = list(loader)
    assert torch.equal(from_worker["views"], batch["views"][:4])
    assert torch.equal(from_worker["frames"], batch["frames"][:4])


def test_kill_and_exact_resume_on_a_pea_store(pea_store: Path, tmp_path: Path) -> None:
    full = fit(_cfg(pea_store, tmp_path / "full"))
    assert full.steps == 4 and np.isfinite(full.final_loss)
    part = tmp_path / "part"
    assert fit(_cfg(pea_store, part, "max_steps=3")).steps == 3  # the checkpoint is all that survives
    resumed = fit(_cfg(pea_store, part))
    assert resumed.steps == 4 and resumed.final_loss == full.final_loss
    a, b = _ckpt(full.run_dir / "checkpoints" / "final.pt"), _ckpt(part / "checkpoints" / "final.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the optimiser is in last.pt (the resume point) only; final.pt holds the model
    la, lb = _ckpt(full.run_dir / "checkpoints" / "last.pt"), _ckpt(part / "checkpoints" / "last.pt")
    for sa, sb in zip(la["optimizer"]["state"].values(), lb["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    lines = [m for m in RunDir(part).read_metrics() if m["kind"] == "train"]
    ref = [m for m in RunDir(full.run_dir).read_metrics() if m["kind"] == "train"]
    assert [{k: v for k, v in m.items() if k != "time"} for m in lines] == \
           [{k: v for k, v in m.items() if k != "time"} for m in ref]
    assert {"loss", "acc", "cycle", "kl", "cos_identity", "lr"} <= set(lines[0])


def test_weight_decay_on_weight_matrices_only(pea_store: Path, tmp_path: Path) -> None:
    res = fit(_cfg(pea_store, tmp_path / "run", "max_steps=1"))
    ck = _ckpt(res.run_dir / "checkpoints" / "last.pt")
    groups = ck["optimizer"]["param_groups"]
    names = list(ck["model"])  # state_dict order = parameters() order
    decay = {names[i] for g in groups if g["weight_decay"] > 0 for i in g["params"]}
    assert decay == {"linears.0.weight"}
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}
    assert all(tuple(g["betas"]) == (0.9, 0.95) for g in groups)


def test_step_is_the_released_objective(pea_store: Path) -> None:
    cfg = _cfg(pea_store, Path("unused"))
    store = open_store(pea_store)
    task = get_task("cosettle")(cfg, store, torch.device("cpu"))
    task.preflight()
    torch.manual_seed(0)
    g = task.build()
    assert g.init == "trunc_normal"  # DINOv2's init, chosen from the store's backbone
    batch = torch.utils.data.default_collate([task.train_dataset(0)[i] for i in range(3)])
    out = task.step(g, batch)
    ref = cosettle_loss(batch["views"], g(batch["views"]), tau=0.03, lam=3.0)
    assert out["loss"].item() == pytest.approx(ref.loss.item(), rel=1e-6)
    assert out["acc"].item() == ref.acc.item()


def test_refusals(pea_store: Path, tmp_path: Path) -> None:
    plain = write_synthetic_store(tmp_path / "plain.zarr", grid=(4, 4), channels=16)
    with pytest.raises(CosettleDataError, match=r"no PEA views.*--pea-views K.*return_view=online.*return_view=plain"):
        fit(_cfg(plain.path, tmp_path / "r1"))
    with pytest.raises(CosettleDataError, match="extracted without PEA views"):
        fit(_cfg(plain.path, tmp_path / "r2", "cosettle.return_view=pea"))
    tiny = write_synthetic_store(tmp_path / "tiny.zarr", grid=(1, 1), channels=16)
    with pytest.raises(ConfigMismatchError, match="smaller than the 2x2 pooling window"):
        fit(_cfg(tiny.path, tmp_path / "r3", "cosettle.return_view=plain"))
    cnn = make_real_store(tmp_path / "cnn", num_videos=2, frames=(12, 14))
    with pytest.raises(PEAError, match=r"no positional embedding.*return_view=plain"):
        fit(_cfg(cnn.path, tmp_path / "r4", "cosettle.return_view=online"))
    for run in ("r1", "r2", "r3", "r4"):
        assert not (tmp_path / run / "metrics.jsonl").exists()  # refused before any work


def test_plain_return_view_trains_on_a_cnn_store(tmp_path: Path) -> None:
    cnn = make_real_store(tmp_path / "cnn", num_videos=2, frames=(12, 14))
    res = fit(_cfg(cnn.path, tmp_path / "run", "cosettle.return_view=plain"))
    assert res.steps == 2 and np.isfinite(res.final_loss)
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["task"] == "cosettle" and cfg["task_cfg"]["return_view"] == "plain"


def test_online_return_view_is_the_encoder_with_a_fresh_window(pea_store: Path, tmp_path: Path) -> None:
    store = open_store(pea_store)
    cfg = _cfg(pea_store, tmp_path / "run", "cosettle.return_view=online")
    task = get_task("cosettle")(cfg, store, torch.device("cpu"))
    task.preflight()
    ds = task.train_dataset(0)
    item = ds[1]
    vid, t1 = ds.video_ids[1], int(item["frames"][0])
    bb = build_backbone(ExtractConfig(backbone="dinov2-vits14-reg", random_weights=True, image_size=56))
    from extract.decode import Geometry, decode_all

    frames = decode_all(ds.return_view.frames.rows[vid].path, geometry=Geometry(**store.content["geometry"]),
                        fps=store.content["fps"]).frames
    np.testing.assert_array_equal(item["pixels"].numpy(), frames[t1])
    with torch.no_grad():
        want = pea_forward(bb, bb.prepare(frames[t1:t1 + 1]), item["offsets"].unsqueeze(0), 10.0)
        got = task.encoder(item["pixels"].unsqueeze(0), item["offsets"].unsqueeze(0))
        # with r = 0 (the identity window) the online view is the stored token grid of frame t1
        from train.cosettle_online import OnlineEncoder

        ident = OnlineEncoder(store, 0.0, torch.device("cpu"))(item["pixels"].unsqueeze(0), torch.zeros(1, 2))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(ident[0].numpy(), store.features(vid, [t1])[0], rtol=0, atol=1e-4)
    res = fit(cfg)
    assert res.steps == 4 and np.isfinite(res.final_loss)
