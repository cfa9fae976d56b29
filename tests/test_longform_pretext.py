"""Long-form pretext pieces: InfoNCE, MoCo queue/momentum, masked feature modelling, distillation."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigMismatchError
from pipeline.store import open_store
from tests.stores import write_synthetic_store
from train.losses import distill_kl, info_nce, masked_feature_loss
from train.models import ModelConfig, TMMConfig, build_model
from train.models.distill import DistillConfig, FrozenTeacher, StoreTeacher, align_by_time, distill_loss
from train.models.mfm import MaskedFeatureModel, MaskError, MFMConfig, mfm_loss, tube_mask, tube_mask_np
from train.models.moco import MoCoConfig, MoCoState, NegativeQueue, ema_update, momentum_at


def _model(num_classes: int = 8, c: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(tmm=TMMConfig(in_channels=c, hidden=8, out_channels=12, blocks=1, temporal_kernel=3),
                      mlp_dim=32, num_classes=num_classes)
    return build_model(cfg)


def _clips(b: int = 4, t: int = 6, h: int = 3, w: int = 3, c: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, h, w, c, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------
# InfoNCE
# --------------------------------------------------------------------------------------
def _direct_info_nce(q, k, queue, t, keep):
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ queue[j]) / t) for j in range(len(queue)) if keep[i, j])
        total += -math.log(pos / (pos + neg))
    return total / len(q)


@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_info_nce_matches_direct_formula(t: float) -> None:
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(11, 8, generator=g, dtype=torch.float64), dim=1)
    keep = torch.rand(5, 11, generator=g) > 0.4
    keep[2] = False  # a query with no negative at all: loss log(1) = 0 for it
    got = float(info_nce(q, k, queue, t, keep))
    assert got == pytest.approx(_direct_info_nce(q, k, queue, t, keep), rel=1e-10)
    all_keep = torch.ones(5, 11, dtype=torch.bool)
    assert float(info_nce(q, k, queue, t)) == pytest.approx(_direct_info_nce(q, k, queue, t, all_keep), rel=1e-10)
    # the standard cross-entropy form with target 0 agrees when nothing is masked
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], 1) / t
    assert float(info_nce(q, k, queue, t)) == pytest.approx(float(F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))), rel=1e-10)


# --------------------------------------------------------------------------------------
# MoCo queue, momentum, state
# --------------------------------------------------------------------------------------
def test_queue_is_fifo_and_different_video_drops_same_video_keys() -> None:
    q = NegativeQueue(5, 2)
    assert not q.keep(torch.tensor([0]), "all_past").any()  # empty slots are never negatives
    q.enqueue(torch.arange(6.0).view(3, 2), torch.tensor([7, 7, 3]))
    assert q.vids.tolist() == [7, 7, 3, -1, -1] and q.ptr == 3
    q.enqueue(torch.arange(6.0, 12.0).view(3, 2), torch.tensor([3, 9, 9]))
    assert q.vids.tolist() == [9, 7, 3, 3, 9] and q.ptr == 1  # the oldest entry was overwritten
    assert q.keys[0].tolist() == [10.0, 11.0]
    keep = q.keep(torch.tensor([7, 3, 5]), "different_video")
    assert keep.tolist() == [[True, False, True, True, True],
                             [True, True, False, False, True],
                             [True, True, True, True, True]]
    assert q.keep(torch.tensor([7, 3, 5]), "all_past").all()


def test_different_video_negatives_do_not_influence_the_loss() -> None:
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    k = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    queue = NegativeQueue(6, 8)
    queue.enqueue(F.normalize(torch.randn(6, 8, generator=g), dim=1), torch.tensor([0, 1, 0, 2, 1, 5]))
    vids = torch.tensor([0, 1, 2])
    keys = queue.keys.clone().requires_grad_(True)
    loss = info_nce(q, k, keys, 0.2, queue.keep(vids, "different_video"))
    loss.backward()
    # query 0 (video 0) ignores entries 0, 2; query 1 ignores 1, 4; query 2 ignores 3
    per_query = [info_nce(q[i:i + 1], k[i:i + 1], keys, 0.2, queue.keep(vids[i:i + 1], "different_video")) for i in range(3)]
    for i, same in enumerate([[0, 2], [1, 4], [3]]):
        (grad,) = torch.autograd.grad(per_query[i], keys)
        assert torch.all(grad[same] == 0)
        assert torch.any(grad[[j for j in range(6) if j not in same]] != 0)


def test_momentum_schedules() -> None:
    assert momentum_at(0.99, 17, 100, "constant") == 0.99
    assert momentum_at(0.99, 0, 100, "cosine") == pytest.approx(0.99)
    assert momentum_at(0.99, 50, 100, "cosine") == pytest.approx(0.995)
    assert momentum_at(0.99, 100, 100, "cosine") == pytest.approx(1.0)


def test_ema_update_formula() -> None:
    a, b = _model(seed=0), _model(seed=1)
    before = [p.clone() for p in a.parameters()]
    ema_update(a, b, 0.9)
    for pa, p0, pb in zip(a.parameters(), before, b.parameters()):
        assert torch.allclose(pa, 0.9 * p0 + 0.1 * pb)


def _moco_run(steps: int, cut: int | None = None, policy: str = "different_video"):
    """Train a query encoder with MoCo for ``steps`` steps; optionally stop after ``cut`` steps,
    save everything and continue in fresh objects. Returns the query, the MoCo state, losses."""
    query = _model(num_classes=16)
    cfg = MoCoConfig(queue_size=10, proj_dim=16, momentum=0.9, momentum_schedule="cosine", negatives=policy)
    moco = MoCoState(query, cfg, total_steps=steps)
    opt = torch.optim.AdamW(query.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        if cut is not None and step == cut:
            saved = copy.deepcopy({"model": query.state_dict(), "opt": opt.state_dict(), "moco": moco.state_dict()})
            query = _model(num_classes=16, seed=99)
            moco = MoCoState(query, cfg, total_steps=steps)
            opt = torch.optim.AdamW(query.parameters(), lr=1e-2)
            query.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            moco.load_state_dict(saved["moco"])
        x = _clips(b=4, seed=step)
        noise = 0.1 * _clips(b=4, seed=1000 + step)
        out = moco.loss(query, x, x + noise, torch.tensor([step % 3, step % 3, 5, 6]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        moco.after_step(query, step)
        losses.append(float(out["loss"].detach()))
    return query, moco, losses


def test_moco_key_encoder_gets_no_gradient_and_follows_the_query() -> None:
    query, moco, losses = _moco_run(4)
    assert all(p.grad is None and not p.requires_grad for p in moco.key.parameters())
    assert all(np.isfinite(losses))
    assert int((moco.queue.vids != -1).sum()) == 10  # 4 batches of 4 keys into a queue of 10
    assert any(not torch.equal(pk, pq) for pk, pq in zip(moco.key.parameters(), query.parameters()))


@pytest.mark.parametrize("cut", [1, 3])
def test_moco_resume_is_exact(cut: int) -> None:
    q_ref, m_ref, l_ref = _moco_run(5)
    q_res, m_res, l_res = _moco_run(5, cut=cut)
    assert l_ref == l_res
    for a, b in zip(q_ref.state_dict().values(), q_res.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(m_ref.key.state_dict().values(), m_res.key.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(m_ref.queue.keys, m_res.queue.keys) and torch.equal(m_ref.queue.vids, m_res.queue.vids)
    assert m_ref.queue.ptr == m_res.queue.ptr


# --------------------------------------------------------------------------------------
# masked feature modelling
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,expect", [(0.5, 8), (0.75, 12), (0.9, 14)])
def test_tube_mask_counts(ratio: float, expect: int) -> None:
    m = tube_mask(6, 4, 4, ratio, torch.Generator().manual_seed(0))
    assert m.shape == (6, 4, 4) and m.view(6, -1).sum(1).tolist() == [expect] * 6
    assert len({tuple(r.flatten().tolist()) for r in m}) > 1  # a different mask per clip
    with pytest.raises(MaskError):
        tube_mask(1, 2, 2, 0.9)


@pytest.mark.parametrize("hide", ["token", "drop"])
def test_masked_positions_are_never_visible_to_the_student(hide: str) -> None:
    mfm = MaskedFeatureModel(_model(), decoder_hidden=16, hide=hide)
    mfm.train()
    x = _clips(b=3, t=5, h=4, w=4)
    z = mfm.prepare(x).requires_grad_(True)
    mask = tube_mask(3, 4, 4, 0.5, torch.Generator().manual_seed(1))
    pred = mfm.predict(z, mask)
    (grad,) = torch.autograd.grad(pred.pow(2).sum(), z)
    m = mask[:, None, None].expand_as(z)
    assert torch.all(grad[m] == 0) and torch.any(grad[~m] != 0)
    # perturbation: anything at masked positions leaves every prediction unchanged
    z2 = torch.where(m, 100 * torch.randn_like(z), z.detach())
    assert torch.equal(mfm.predict(z2, mask), pred.detach())
    z3 = torch.where(~m, z.detach() + 1.0, z.detach())
    assert not torch.allclose(mfm.predict(z3, mask), pred.detach())


def test_mfm_loss_counts_masked_positions_only() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    mask = torch.rand(2, 3, 4, generator=g) > 0.5
    base = masked_feature_loss(pred, target, mask)
    pred2 = torch.where(mask[..., None], pred, pred + 50.0)
    assert torch.equal(masked_feature_loss(pred2, target, mask), base)
    assert float(masked_feature_loss(pred, target, mask, "cosine")) == pytest.approx(
        float((1 - F.cosine_similarity(pred[mask], target[mask], dim=-1)).mean()), rel=1e-6)


def test_mfm_trains_and_target_is_layer_normalised() -> None:
    mfm = MaskedFeatureModel(_model(), decoder_hidden=16)
    opt = torch.optim.AdamW(mfm.parameters(), lr=1e-2)
    cfg = MFMConfig(mask_ratio=0.5)
    x = _clips(b=4, t=4, h=4, w=4)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(12):
        out = mfm_loss(mfm, x, tube_mask(4, 4, 4, cfg.mask_ratio, g), cfg)
        first = float(out["loss"].detach()) if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert float(out["loss"].detach()) < first
    assert float(out["masked"]) == pytest.approx(0.5)
    tmm_keys = {k for k in _model().state_dict() if k.startswith("tmm.")}
    assert tmm_keys <= set(mfm.state_dict()) and not any(k.startswith("head.") for k in mfm.state_dict())


def test_numpy_tube_mask() -> None:
    m = tube_mask_np(4, 4, 0.75, np.random.default_rng(0))
    assert m.shape == (4, 4) and m.sum() == 12
    assert np.array_equal(m, tube_mask_np(4, 4, 0.75, np.random.default_rng(0)))


# --------------------------------------------------------------------------------------
# distillation
# --------------------------------------------------------------------------------------
def test_distill_kl_matches_direct_formula() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    T = 3.0
    pt, ps = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    direct = (pt * (pt.log() - ps.log())).sum(1).mean() * T * T
    assert float(distill_kl(s, t, T)) == pytest.approx(float(direct), rel=1e-10)


def test_teacher_is_never_updated() -> None:
    teacher_model = _model(num_classes=8, seed=5)
    with torch.no_grad():  # non-trivial BN statistics
        for name, buf in teacher_model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
    teacher = FrozenTeacher(teacher_model)
    before = copy.deepcopy(teacher.state_dict())
    student = _model(num_classes=8, seed=6)
    opt = torch.optim.SGD(list(student.parameters()) + list(teacher.parameters()), lr=0.5)
    cfg = DistillConfig(teacher="run", loss="kl", temperature=2.0)
    teacher.train()  # a loop calling .train() on everything must not switch it
    assert not teacher.training and not teacher.model.training
    losses = []
    for step in range(5):
        x = _clips(b=4, seed=step)
        loss = distill_loss(student(x), teacher(x), cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert losses[-1] < losses[0]
    with pytest.raises(ConfigMismatchError, match="num_classes"):
        distill_loss(torch.zeros(2, 3), torch.zeros(2, 4), cfg)


def test_align_by_time() -> None:
    teacher_ts = np.arange(20) / 5.0  # 5 fps
    assert align_by_time(np.arange(10) / 5.0, teacher_ts).tolist() == list(range(10))
    assert align_by_time(np.array([0.39, 0.41, 1.0]), teacher_ts).tolist() == [2, 2, 5]
    with pytest.raises(ConfigMismatchError, match="no teacher frame"):
        align_by_time(np.array([10.0]), teacher_ts)


def test_store_teacher_targets_are_pooled_aligned_features(tmp_path) -> None:
    st = write_synthetic_store(tmp_path / "t.zarr", splits={"train": 2}, video_lengths=[30, 24], channels=8)
    teacher = StoreTeacher(open_store(st.path))
    assert teacher.dim == 8
    ts = np.arange(4, 10) / 10.0  # frames 4..9 at 10 fps
    got = teacher.target("train-001", ts)
    assert np.allclose(got, st.features["train-001"][4:10].mean(axis=(0, 1, 2)), atol=1e-6)
    with pytest.raises(ConfigMismatchError, match="not in the teacher store"):
        teacher.target("nope", ts)
