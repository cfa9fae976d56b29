"""train/losses.py (Co-Settle part) and train/models/projection.py: the Co-Settle objective against plain
loops written out here, the KL anchor against its (1 - cos) / D approximation, and the projection."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.registry import RegistryError
from train.losses import (
    CosettleLossError,
    cosettle_loss,
    cycle_loss,
    kl_anchor,
    kl_anchor_unit,
    l2_normalize,
    pool_nodes,
)
from train.models.projection import BACKBONE_INIT, FastTanh, Projection, init_for_backbone


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _loop_pool(x: torch.Tensor) -> list[list[torch.Tensor]]:
    """(H, W, D) -> nodes, one 2x2 mean each, row-major, odd edges dropped."""
    h, w, _ = x.shape
    return [x[2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(4, -1).mean(0) for i in range(h // 2) for j in range(w // 2)]


def _loop_cycle(views: list[torch.Tensor], tau: float) -> tuple[float, float]:
    """The released loss written as loops: per sample, per node i of A, the walk probability
    P[i, k] = sum_j S_AB[i, j] S_BA'[j, k], then cross-entropy of log(P + 1e-6) with target i."""
    total, correct, count = 0.0, 0, 0
    for s in range(views[0].shape[0]):
        nodes = [_loop_pool(v[s]) for v in views]
        n = len(nodes[0])

        def trans(src, dst):
            rows = []
            for a in src:
                logits = [float(a @ b) / tau for b in dst]
                m = max(logits)
                e = [math.exp(v - m) for v in logits]
                rows.append([v / sum(e) for v in e])
            return rows

        s1, s2 = trans(nodes[0], nodes[1]), trans(nodes[1], nodes[2])
        for i in range(n):
            p = [sum(s1[i][j] * s2[j][k] for j in range(n)) for k in range(n)]
            logits = [math.log(v + 1e-6) for v in p]
            lse = math.log(sum(math.exp(v) for v in logits))
            total += lse - logits[i]
            correct += int(max(range(n), key=lambda k: logits[k]) == i)
            count += 1
    return total / count, correct / count


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (14, 14)])
def test_cycle_loss_matches_a_plain_loop(grid: tuple[int, int]) -> None:
    h, w = grid
    base = _unit(3, h, w, 6, seed=1)
    views = [base, F.normalize(base + 0.3 * _unit(3, h, w, 6, seed=2), dim=-1),
             F.normalize(base + 0.5 * _unit(3, h, w, 6, seed=3), dim=-1)]
    out = cycle_loss(views, tau=0.03)
    ref_loss, ref_acc = _loop_cycle(views, 0.03)
    assert out.walk.shape == (3, (h // 2) * (w // 2), (h // 2) * (w // 2))
    assert out.loss.item() == pytest.approx(ref_loss, rel=1e-9, abs=1e-12)
    assert out.acc.item() == pytest.approx(ref_acc)
    torch.testing.assert_close(out.walk.sum(-1), torch.ones(3, out.walk.shape[1], dtype=torch.float64))


def test_cycle_of_identical_views_is_perfect_and_pooling_is_the_released_avg_pool() -> None:
    x = _unit(2, 14, 14, 32, seed=4)
    nodes = pool_nodes(x)
    assert nodes.shape == (2, 49, 32)
    torch.testing.assert_close(nodes[1, 8], x[1, 2:4, 2:4].reshape(4, 32).mean(0))  # node (1, 1)
    sharp = cycle_loss([x, x, x], tau=0.001)
    assert sharp.acc.item() == 1.0
    assert sharp.loss.item() == pytest.approx(math.log(1 + 49 * 1e-6), abs=1e-6)  # the CE-on-log(P+eps) floor
    with pytest.raises(CosettleLossError, match="smaller than the 2x2"):
        pool_nodes(torch.zeros(1, 1, 1, 4))


@pytest.mark.parametrize("cos", [0.99, 0.95, 0.9])
def test_kl_anchor_is_about_one_minus_cos_over_d_per_token(cos: float) -> None:
    d, tokens = 768, 50
    z = _unit(tokens, d, seed=5)
    noise = _unit(tokens, d, seed=6)
    noise = F.normalize(noise - (noise * z).sum(-1, keepdim=True) * z, dim=-1)  # orthogonal to z
    p = cos * z + math.sqrt(1 - cos**2) * noise                                # unit, cos(z, p) = cos
    per_token = kl_anchor(z.unsqueeze(0), p.unsqueeze(0)).item() / tokens       # batchmean over B = 1
    assert per_token == pytest.approx((1 - cos) / d, rel=0.02)
    # batchmean: the sum over tokens and channels divided by the batch size
    b = kl_anchor(z.view(5, 10, d), p.view(5, 10, d)).item()
    assert b == pytest.approx(kl_anchor(z.unsqueeze(0), p.unsqueeze(0)).item() / 5, rel=1e-12)


def test_full_objective_is_cycle_plus_lambda_kl_on_normalised_views() -> None:
    frozen = torch.randn(2, 3, 4, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    proj = frozen + 0.1 * torch.randn(frozen.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    out = cosettle_loss(frozen, proj, tau=0.03, lam=3.0)
    zn, pn = F.normalize(frozen, dim=-1), F.normalize(proj, dim=-1)
    ref_cycle, _ = _loop_cycle(list(pn.unbind(1)), 0.03)
    ref_kl = sum(float((F.softmax(zn[b], -1) * (F.log_softmax(zn[b], -1) - F.log_softmax(pn[b], -1))).sum())
                 for b in range(2)) / 2
    assert out.cycle.item() == pytest.approx(ref_cycle, rel=1e-9)
    assert out.kl.item() == pytest.approx(ref_kl, rel=1e-9)
    assert out.loss.item() == pytest.approx(ref_cycle + 3 * ref_kl, rel=1e-9)
    with pytest.raises(CosettleLossError):
        cosettle_loss(frozen, proj[:, :2])


def test_projection_shapes_arches_inits_and_gradients() -> None:
    g = Projection(16, "linear", "xavier_uniform", generator=torch.Generator().manual_seed(0))
    assert len(g.linears) == 1 and sum(p.numel() for p in g.parameters()) == 16 * 16 + 16 + 2 * 16
    x = torch.randn(2, 3, 4, 4, 16)
    y = g(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 3, 4, 4), atol=1e-5, rtol=0)  # LayerNorm output
    ref = F.layer_norm(torch.tanh(x @ g.linears[0].weight.T + g.linears[0].bias), (16,))
    torch.testing.assert_close(y, ref)
    assert torch.equal(g.linears[0].bias, torch.zeros(16))
    bound = math.sqrt(6 / 32)
    assert g.linears[0].weight.abs().max() <= bound
    # seeded init is reproducible and does not touch the global RNG
    state = torch.random.get_rng_state()
    g2 = Projection(16, "linear", "xavier_uniform", generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(g.linears[0].weight, g2.linears[0].weight)
    tn = Projection(768, "mlp2", "trunc_normal", generator=torch.Generator().manual_seed(0))
    assert len(tn.linears) == 2 and abs(tn.linears[1].weight.std().item() - 0.02) < 1e-3
    assert torch.equal(tn.linears[1].bias, torch.zeros(768))
    x2 = torch.randn(3, 768)
    y2 = tn(x2)
    ref2 = F.layer_norm(tn.linears[1](torch.tanh(tn.linears[0](x2))), (768,))  # Linear-Tanh-Linear-LN
    torch.testing.assert_close(y2, ref2)
    y2.sum().backward()
    assert tn.linears[0].weight.grad is not None
    with pytest.raises(RegistryError, match="mlp2"):
        Projection(8, "mlp9")
    assert init_for_backbone("clip-vit-b16") == "torch_default"
    assert init_for_backbone("mae-vitb16") == "xavier_uniform"
    assert init_for_backbone("dinov2-vitb14") == "trunc_normal"
    assert set(BACKBONE_INIT) >= {"clip-vit-b16", "mae-vitb16", "dinov2-vitb14", "mobilenetv2-imagenet"}


def _released_objective(frozen: torch.Tensor, proj: torch.Tensor, tau: float, lam: float) -> torch.Tensor:
    """The objective with the released library calls: F.normalize, F.avg_pool2d per view, bmm
    softmaxes, CE on log(P + 1e-6), F.kl_div(log_softmax, softmax, batchmean)."""
    z, p = F.normalize(frozen, dim=-1), F.normalize(proj, dim=-1)
    nodes = [F.avg_pool2d(v.permute(0, 3, 1, 2), 2, 2).flatten(2).transpose(1, 2) for v in p.unbind(1)]
    s1 = F.softmax(nodes[0] @ nodes[1].transpose(1, 2) / tau, -1)
    s2 = F.softmax(nodes[1] @ nodes[2].transpose(1, 2) / tau, -1)
    walk = s1 @ s2
    b, n, _ = walk.shape
    cyc = F.cross_entropy(torch.log(walk + 1e-6).flatten(0, 1), torch.arange(n).repeat(b))
    return cyc + lam * F.kl_div(F.log_softmax(p, -1), F.softmax(z, -1), reduction="batchmean")


@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (14, 14)])
def test_fast_objective_equals_the_released_calls_in_value_and_gradient(grid: tuple[int, int]) -> None:
    """The step's fused pieces (strided pooling, closed-form normalise backward, KL as one dot
    product) change no value and no gradient: float64 against the library calls, rel 1e-10."""
    gen = torch.Generator().manual_seed(11)
    frozen = torch.randn(3, 3, *grid, 16, dtype=torch.float64, generator=gen)
    proj = (frozen + 0.2 * torch.randn(frozen.shape, dtype=torch.float64, generator=gen)).requires_grad_()
    ref = _released_objective(frozen, proj, 0.03, 3.0)
    (g_ref,) = torch.autograd.grad(ref, proj)
    out = cosettle_loss(frozen, proj, tau=0.03, lam=3.0)
    (g_out,) = torch.autograd.grad(out.loss, proj)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-10, atol=1e-14)
    # float32, as training runs: within float32 rounding of the library calls
    f32 = proj.detach().float().requires_grad_()
    ref32 = _released_objective(frozen.float(), f32, 0.03, 3.0)
    (g_ref32,) = torch.autograd.grad(ref32, f32)
    out32 = cosettle_loss(frozen.float(), f32, tau=0.03, lam=3.0)
    (g_out32,) = torch.autograd.grad(out32.loss, f32)
    assert out32.loss.item() == pytest.approx(ref32.item(), rel=1e-5)
    torch.testing.assert_close(g_out32, g_ref32, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 4, 4, 3), (2, 5, 7, 3), (1, 7, 7, 2), (3, 14, 14, 5)])
def test_pool_nodes_equals_avg_pool2d_with_its_gradient(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(12), requires_grad=True)
    ref = F.avg_pool2d(x.permute(0, 3, 1, 2), 2, 2).flatten(2).transpose(1, 2)
    out = pool_nodes(x)
    torch.testing.assert_close(out, ref, rtol=1e-15, atol=0)
    w = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    torch.testing.assert_close(torch.autograd.grad((out * w).sum(), x)[0],
                               torch.autograd.grad((ref * w).sum(), x)[0], rtol=1e-15, atol=0)
    assert torch.autograd.gradcheck(pool_nodes, (x,))
    x32 = x.detach().float()
    assert torch.equal(pool_nodes(x32), F.avg_pool2d(x32.permute(0, 3, 1, 2), 2, 2).flatten(2).transpose(1, 2))


def test_l2_normalize_and_kl_anchor_equal_the_library_calls() -> None:
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(4, 6, 9, dtype=torch.float64, generator=gen)
    x[0, 0] = 0.0  # a zero token: eps keeps it finite as in F.normalize
    x.requires_grad_()
    w = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    out, ref = l2_normalize(x), F.normalize(x, dim=-1)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad((out * w).sum(), x)[0],
                               torch.autograd.grad((ref * w).sum(), x)[0], rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(l2_normalize, (torch.randn(3, 5, dtype=torch.float64, requires_grad=True),))
    z = F.normalize(torch.randn(2, 5, 768, dtype=torch.float64, generator=gen), dim=-1)
    p = F.normalize(z + 0.1 * torch.randn(z.shape, dtype=torch.float64, generator=gen), dim=-1).requires_grad_()
    ref_kl = F.kl_div(F.log_softmax(p, -1), F.softmax(z, -1), reduction="batchmean")
    kl = kl_anchor(z, p)
    assert kl.item() == pytest.approx(ref_kl.item(), rel=1e-10)
    torch.testing.assert_close(torch.autograd.grad(kl, p)[0], torch.autograd.grad(ref_kl, p)[0], rtol=1e-10, atol=1e-16)


def _pair(cos: float, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit float64 tokens z and p with cos(z, p) = ``cos`` per token."""
    z = _unit(*shape, seed=seed)
    noise = _unit(*shape, seed=seed + 1)
    noise = F.normalize(noise - (noise * z).sum(-1, keepdim=True) * z, dim=-1)
    return z, cos * z + math.sqrt(1 - cos**2) * noise


def test_kl_anchor_unit_is_the_kl_anchor_in_value_and_gradient() -> None:
    """float64: equal to F.kl_div to 1e-10 with its gradient, and gradcheck; float32: within
    float32 rounding of the KL itself (rel 1e-4 of the float64 value at cos 0.999, where the
    released formula's float32 error is 1e-3), gradient within 1e-5 of its largest entry."""
    z, p = _pair(0.9, (3, 2, 5, 768), seed=20)
    p.requires_grad_()
    ref = F.kl_div(F.log_softmax(p, -1), F.softmax(z, -1), reduction="batchmean")
    out = kl_anchor_unit(z, p)
    assert out.item() == pytest.approx(ref.item(), rel=1e-10)
    torch.testing.assert_close(torch.autograd.grad(out, p)[0], torch.autograd.grad(ref, p)[0], rtol=1e-10, atol=1e-16)
    small = _unit(2, 3, 6, seed=22)
    q = F.normalize(small + 0.5 * _unit(2, 3, 6, seed=23), dim=-1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: kl_anchor_unit(small, x), (q,))
    for cos in (0.9, 0.99, 0.999):
        z, p = _pair(cos, (2, 3, 49, 768), seed=30)
        p64 = p.clone().requires_grad_()
        ref = kl_anchor(z, p64)
        (g_ref,) = torch.autograd.grad(ref, p64)
        p32 = p.float().requires_grad_()
        out = kl_anchor_unit(z.float(), p32)
        (g32,) = torch.autograd.grad(out, p32)
        assert out.item() == pytest.approx(ref.item(), rel=1e-4)
        assert (g32.double() - g_ref).abs().max() <= 1e-5 * g_ref.abs().max()
    # a target that needs a gradient goes to kl_anchor (both sides differentiated)
    zt = _unit(1, 4, 8, seed=40).requires_grad_()
    pt = _unit(1, 4, 8, seed=41)
    assert kl_anchor_unit(zt, pt).grad_fn is not None
    torch.testing.assert_close(torch.autograd.grad(kl_anchor_unit(zt, pt), zt)[0],
                               torch.autograd.grad(kl_anchor(zt, pt), zt)[0])
    with pytest.raises(CosettleLossError):
        kl_anchor_unit(zt, pt[..., :4])


def test_fast_tanh_is_tanh() -> None:
    """float64: gradcheck and tanh to 1e-15; float32: within 2 ulps of 1 (2.4e-7) of torch.tanh
    over [-12, 12] (saturation and 0 included), gradient within 5e-7 of tanh's."""
    x = torch.linspace(-3, 3, 13, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(FastTanh(), (x,))
    torch.testing.assert_close(FastTanh()(x), torch.tanh(x), rtol=0, atol=1e-15)
    x32 = torch.cat([torch.linspace(-12, 12, 100_001), torch.tensor([0.0, 1e-30, -1e-8, 88.0, -88.0])]).requires_grad_()
    y = FastTanh()(x32)
    ref = torch.tanh(x32)
    assert (y - ref).abs().max().item() <= 2 * 2.0**-23
    w = torch.randn(x32.shape, generator=torch.Generator().manual_seed(3))
    grads = [torch.autograd.grad((v * w).sum(), x32)[0] for v in (y, ref)]
    assert (grads[0] - grads[1]).abs().max() <= 5e-7 * w.abs().max()
