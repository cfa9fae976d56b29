"""The dense chain on the synthetic DAVIS-layout data: manifest -> propagation -> results -> scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from manifests.dense import build_dense
from synth.davis import SynthDavisConfig, render_sequence, write_synth_davis
from pipeline.labels import read_label_png
from train.dense.adapters import adapter_for, propagate_labels_of
from train.dense.metrics import DenseEvalError
from train.dense.propagate import PropagationConfig
from train.dense.results import read_ground_truth, score_davis, write_copy_first, write_video_labels

CFG = SynthDavisConfig(val_sequences=2, frames=8, height=96, width=160, seed=1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = write_synth_davis(tmp_path_factory.mktemp("synth") / "DAVIS", CFG)
    return root, build_dense("davis2017", root=root, split="val")


def test_synth_davis_is_the_official_layout_with_exact_masks(synth):
    root, videos = synth
    assert [v.video_id for v in videos] == ["synth000", "synth001"]
    for i, v in enumerate(videos):
        frames, masks = render_sequence(i, CFG)
        assert v.size == (96, 160) and len(v.frames) == 8
        assert np.array_equal(read_ground_truth(v), masks)
        decoded = np.asarray(Image.open(v.frames[3]).convert("RGB"), np.int16)
        assert np.abs(decoded - frames[3]).mean() < 4  # JPEG q95
        assert read_label_png(v.labels[0]).max() >= CFG.min_objects
    # objects move: masks change over time
    assert not np.array_equal(render_sequence(0, CFG)[1][0], render_sequence(0, CFG)[1][-1])


def test_scores_of_ground_truth_copy_first_and_missing(synth, tmp_path):
    _, videos = synth
    for v in videos:
        write_video_labels(tmp_path / "gt", v, read_ground_truth(v))
        write_copy_first(tmp_path / "copy", v)
    perfect = score_davis(videos, tmp_path / "gt")
    assert perfect.J_mean == 1.0 and perfect.F_mean == 1.0 and perfect.JF_mean == 1.0
    copy = score_davis(videos, tmp_path / "copy")
    assert 0.0 < copy.JF_mean < 1.0
    assert set(copy.per_sequence) == {"synth000", "synth001"}
    (tmp_path / "copy" / "synth001" / "00003.png").unlink()
    (tmp_path / "copy" / "synth000" / "00005.png").unlink()
    with pytest.raises(DenseEvalError, match="2 problem"):
        score_davis(videos, tmp_path / "copy")


def oracle_features(v, grid=(24, 40), noise=0.05, seed=0) -> torch.Tensor:
    """Features that know the object at each cell centre (plus noise): propagation should track."""
    gt = read_ground_truth(v)
    ys = ((np.arange(grid[0]) + 0.5) * gt.shape[1] / grid[0]).astype(int)
    xs = ((np.arange(grid[1]) + 0.5) * gt.shape[2] / grid[1]).astype(int)
    ids = gt[:, ys][:, :, xs]  # (T, h, w)
    f = np.eye(8)[ids] + noise * np.random.default_rng(seed).standard_normal(ids.shape + (8,))
    return torch.from_numpy(f).float()


def test_propagation_with_oracle_features_beats_copying_the_first_mask(synth, tmp_path):
    _, videos = synth
    cfg = PropagationConfig()
    for v in videos:
        soft = propagate_labels_of(v, oracle_features(v), cfg)
        assert soft.shape[:3] == (8, 24, 40)
        assert adapter_for(v).write(v, soft, tmp_path / "prop", cfg) == 8
        write_copy_first(tmp_path / "copy", v)
    prop = score_davis(videos, tmp_path / "prop")
    copy = score_davis(videos, tmp_path / "copy")
    assert prop.JF_mean > copy.JF_mean
    assert prop.J_mean > 0.7 and prop.F_mean > 0.85


def test_grid_pixel_mapping_round_trip():
    from train.dense.adapters import grid_to_pixels, pixels_to_grid

    xy = np.array([[0.0, 0.0], [159.0, 95.0], [7.5, 7.5]])
    g = pixels_to_grid(xy, (96, 160), (6, 10))
    assert g[2].tolist() == [0.0, 0.0]  # centre of the first 16-pixel cell
    assert np.allclose(grid_to_pixels(g, (96, 160), (6, 10)), xy)


def test_jhmdb_joints_read_back_and_scored(tmp_path):
    from tests.test_dense_manifests import jhmdb_root
    from train.dense.adapters import JointAdapter
    from train.dense.results import score_jhmdb, write_joints
    from manifests.jhmdb import read_joints

    root = jhmdb_root(tmp_path, {"v1": (4, "2")})
    (v,) = build_dense("jhmdb", root=root)
    ad = JointAdapter()
    grid = (12, 20)  # 2 px per cell at 24 x 40
    heat = ad.first_grid(v, grid, PropagationConfig())
    assert heat.shape == (12, 20, 15)
    joints = read_joints(v.labels[0])
    inside = (joints[0, :, 0] < 40) & (joints[0, :, 1] < 24)
    back = ad.coords(heat[None], v.size)[0]
    assert np.abs(back - joints[0])[inside].max() < 2.0  # within one cell
    write_joints(tmp_path / "res", v, joints)
    assert score_jhmdb([v], tmp_path / "res").mean == 1.0
    write_joints(tmp_path / "bad", v, joints + 50)
    assert score_jhmdb([v], tmp_path / "bad").mean == 0.0


def test_vip_scoring_of_ground_truth(tmp_path):
    from tests.test_dense_manifests import vip_root
    from train.dense.results import score_vip

    videos = build_dense("vip", root=vip_root(tmp_path, {"videos1": 3}))
    write_video_labels(tmp_path / "res", videos[0], read_ground_truth(videos[0]))
    assert score_vip(videos, tmp_path / "res").miou() == 1.0
