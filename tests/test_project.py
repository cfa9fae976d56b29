"""Applying a trained projection: a new store of g(tokens) with the run's provenance, readable by
the store reader, ``verify``, the metrics and the training commands."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigMismatchError
from pipeline.store import open_store, verify_store
from tests.stores import write_synthetic_store
from train.config import resolve_train_config
from train.loop import fit
from train.project import ProjectionError, apply_projection, load_projection

#: float16 storage of LayerNorm outputs (|x| < ~4): round-to-nearest error <= 2^-11 |x|
F16_RTOL = 2.0**-11


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("proj")
    store = write_synthetic_store(tmp / "s.zarr", splits={"train": 6, "test": 3}, grid=(4, 4), channels=16,
                                  dtype="float16", num_classes=3)
    cfg = resolve_train_config("cosettle", None, None, [
        f'data.store="{store.path}"', f'run_dir="{tmp / "run"}"', "cosettle.return_view=plain", "optim.batch_size=3",
        "optim.epochs=2", "data.workers=0", "optim.base_lr=1e-2"])
    run = fit(cfg).run_dir
    return store, run, tmp


def test_projected_store_holds_g_of_every_frame(trained) -> None:
    store, run, tmp = trained
    out = apply_projection(store.path, run, tmp / "projected.zarr")
    src, dst = open_store(store.path), open_store(out)
    g = load_projection(run)
    assert dst.video_ids == src.video_ids and dst.splits() == src.splits()
    assert dst.feature_shape == src.feature_shape
    for vid in src.video_ids:
        want = g(torch.from_numpy(src.features(vid))).numpy()
        np.testing.assert_allclose(dst.features(vid), want, rtol=F16_RTOL, atol=1e-6)
        np.testing.assert_array_equal(dst.timestamps(vid), src.timestamps(vid))
        assert dst.meta(vid).label == src.meta(vid).label
    prov = dst.content["projection"]
    assert prov["run"] == str(Path(run).resolve()) and len(prov["checkpoint_sha256"]) == 64
    assert dst.content["source_content_hash"] == src.header["content_hash"]
    assert dst.header["content_hash"] != src.header["content_hash"]
    assert verify_store(out) == []
    # rerunning the same command resumes (nothing to do) and gives the same store
    apply_projection(store.path, run, tmp / "projected.zarr")
    np.testing.assert_array_equal(open_store(out).features(src.video_ids[0]), dst.features(src.video_ids[0]))


def test_stage2_commands_read_the_projected_store(trained) -> None:
    store, run, tmp = trained
    out = apply_projection(store.path, run, tmp / "p2.zarr")
    cfg = resolve_train_config("finetune", None, None, [
        f'data.store="{out}"', f'run_dir="{tmp / "ft"}"', "model.tmm.in_channels=16", "model.tmm.hidden=8",
        "model.tmm.out_channels=16", "model.mlp_dim=16", "model.num_classes=3", "clip.num_frames=4",
        "test.num_clips=2", "test.num_frames=4", "optim.batch_size=2", "optim.epochs=1", "data.workers=0"])
    res = fit(cfg)
    assert res.top1 is not None
    from train.represent import measure_store

    m = measure_store(open_store(out))
    assert m.videos == 9 and np.isfinite(m.d_intra)


def test_projection_refusals(trained, tmp_path: Path) -> None:
    store, run, tmp = trained
    other = write_synthetic_store(tmp_path / "wide.zarr", grid=(4, 4), channels=32)
    with pytest.raises(ProjectionError, match="D=16 tokens but .* C=32"):
        apply_projection(other.path, run, tmp_path / "x.zarr")
    with pytest.raises(ProjectionError, match="new path"):
        apply_projection(store.path, run, store.path)
    prp = resolve_train_config("prp", None, None, [
        f'data.store="{store.path}"', f'run_dir="{tmp_path / "prp"}"', "model.tmm.in_channels=16", "model.tmm.hidden=8",
        "model.tmm.out_channels=16", "model.mlp_dim=16", "prp.num_frames=4", "prp.clips_per_video=2",
        "optim.batch_size=2", "optim.epochs=1", "data.workers=0"])
    fit(prp)
    with pytest.raises(ProjectionError, match="'prp' run"):
        load_projection(tmp_path / "prp")
    # a different projection into an existing projected store is another store
    apply_projection(store.path, run, tmp_path / "p.zarr")
    with pytest.raises(ConfigMismatchError):
        apply_projection(store.path, run, tmp_path / "p.zarr", dtype="float32")
