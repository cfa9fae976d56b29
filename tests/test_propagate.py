"""Label propagation: exact on whole-cell translations, equal to a per-cell reference, bounded chunks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.dense.propagate import (
    PropagationConfig,
    context_indices,
    grid_to_labels,
    labels_to_grid,
    propagate,
    radius_mask,
)

CELL = 8  # pixels per feature cell in these tests


def torus_video(t_len: int, h: int, w: int, c: int, step: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Frame t = a random feature grid rolled by ``t * step`` cells: every frame is a whole-cell translation."""
    g = torch.Generator().manual_seed(seed)
    world = torch.randn(h, w, c, generator=g)
    return torch.stack([torch.roll(world, shifts=(t * step[0], t * step[1]), dims=(0, 1)) for t in range(t_len)])


def cell_mask(h: int, w: int) -> np.ndarray:
    """A pixel label map aligned with cells: background 0, objects 1 and 2 (ids 1, 3 in the map)."""
    m = np.zeros((h * CELL, w * CELL), np.uint8)
    m[1 * CELL : 3 * CELL, 2 * CELL : 5 * CELL] = 1
    m[3 * CELL : 5 * CELL, 6 * CELL : 8 * CELL] = 3
    m[0:CELL, 0:CELL] = 3
    return m


def test_context_indices_pad_with_the_first_frame():
    assert context_indices(1, 3) == [0, 0, 0, 0]
    assert context_indices(2, 3) == [0, 0, 0, 1]
    assert context_indices(5, 3) == [0, 2, 3, 4]
    assert len(context_indices(40, 20)) == 21


def test_radius_mask_is_strict_euclidean():
    m = radius_mask(3, 4, 2.0)
    assert m.shape == (12, 12)
    assert m[0, 0] and m[0, 1] and m[0, 4 + 1]  # distances 0, 1, sqrt(2)
    assert not m[0, 2] and not m[0, 8]  # distance 2 is excluded (strict)


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_whole_cell_translation_gives_the_shifted_mask(upsample):
    h, w, t_len, step = 6, 10, 30, (1, 1)
    feats = torus_video(t_len, h, w, 64, step)
    mask0 = cell_mask(h, w)
    values = [0, 1, 3]
    cfg = PropagationConfig(upsample=upsample)
    first = labels_to_grid(mask0, values, (h, w))
    assert torch.equal(first.sum(-1), torch.ones(h, w))  # cell-aligned: exact one-hot on the grid
    soft = propagate(feats, first, cfg)
    assert soft.shape == (t_len, h, w, 3)
    for t in range(t_len):
        shifted = torch.roll(first, shifts=(t * step[0], t * step[1]), dims=(0, 1))
        assert torch.allclose(soft[t], shifted, atol=1e-5), t
    pixels = grid_to_labels(soft, mask0.shape, values, mode=upsample)
    for t in range(t_len):
        want_grid = torch.roll(first, shifts=(t * step[0], t * step[1]), dims=(0, 1))
        if upsample == "nearest":
            want = np.roll(mask0, (t * step[0] * CELL, t * step[1] * CELL), axis=(0, 1))
        else:  # bilinear blurs cell corners; it must equal upsampling the shifted grid labels
            want = grid_to_labels(want_grid[None], mask0.shape, values, mode=upsample)[0]
        assert np.array_equal(pixels[t], want), t


def reference_propagate(feats: torch.Tensor, first: torch.Tensor, cfg: PropagationConfig) -> torch.Tensor:
    """Per query cell, written out loop by loop from the protocol's description."""
    t_len, h, w, c = feats.shape
    x = torch.nn.functional.normalize(feats.double(), dim=-1).reshape(t_len, h * w, c)
    labels = [first.double().reshape(h * w, -1)]
    for t in range(1, t_len):
        ctx = [0] + [max(0, s) for s in range(t - cfg.context, t)]
        pred = torch.zeros_like(labels[0])
        for q in range(h * w):
            qy, qx = divmod(q, w)
            cands = []  # (affinity, label vector)
            for slot, f in enumerate(ctx):
                for k in range(h * w):
                    ky, kx = divmod(k, w)
                    if (slot > 0 or cfg.radius_on_first) and ((qy - ky) ** 2 + (qx - kx) ** 2) ** 0.5 >= cfg.radius:
                        continue
                    cands.append((float(x[t, q] @ x[f, k]) / cfg.temperature, labels[f][k]))
            cands.sort(key=lambda a: -a[0])
            top = cands[: cfg.topk]
            wts = torch.softmax(torch.tensor([a for a, _ in top], dtype=torch.float64), 0)
            pred[q] = sum(wt * lab for wt, (_, lab) in zip(wts, top))
        labels.append(pred)
    return torch.stack(labels).reshape(t_len, h, w, -1)


@pytest.mark.parametrize("radius_on_first", [False, True])
def test_propagate_equals_the_per_cell_reference(radius_on_first):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(6, 4, 5, 8, generator=g)
    first = torch.softmax(torch.randn(4, 5, 3, generator=g) * 3, dim=-1)
    cfg = PropagationConfig(context=2, radius=2.0, topk=3, radius_on_first=radius_on_first)
    want = reference_propagate(feats, first, cfg)
    got = propagate(feats, first, cfg)
    assert torch.allclose(got.double(), want, atol=1e-5)
    # chunking (one query cell per block) changes nothing
    tiny = PropagationConfig(context=2, radius=2.0, topk=3, radius_on_first=radius_on_first, max_affinity_elements=1)
    assert torch.allclose(propagate(feats, first, tiny), got, atol=1e-6)


def test_radius_limits_the_short_term_context_only():
    # frame 1 = frame 0 shifted by 3 cells; with radius 2 only the unrestricted first
    # frame can supply the true match
    h, w = 5, 9
    feats = torus_video(2, h, w, 64, (0, 3))
    first = labels_to_grid(np.kron(np.arange(h * w).reshape(h, w) % 7, np.ones((CELL, CELL), int)), range(7), (h, w))
    exact = torch.roll(first, shifts=(0, 3), dims=(0, 1))
    free = propagate(feats, first, PropagationConfig(context=1, radius=2.0, topk=1))
    assert torch.equal(free[1], exact)
    bound = propagate(feats, first, PropagationConfig(context=1, radius=2.0, topk=1, radius_on_first=True))
    assert not torch.equal(bound[1], exact)


def test_config_refuses_bad_values():
    with pytest.raises(ValueError):
        PropagationConfig(topk=0)
    with pytest.raises(ValueError):
        PropagationConfig(temperature=0)
    with pytest.raises(ValueError):
        PropagationConfig(upsample="bicubic")  # type: ignore[arg-type]


@pytest.mark.parametrize("shape,band_cells", [((7, 4), 1), ((7, 4), 8), ((4, 9), 2), ((5, 5), 1000)])
def test_banded_affinities_equal_the_per_cell_reference(shape, band_cells):
    """Bands of 1 row .. the whole grid, tall and wide grids (transposed), a radius that is not an
    integer and a context padded with repeats of frame 0: the same labels as the reference."""
    g = torch.Generator().manual_seed(5)
    h, w = shape
    feats = torch.randn(7, h, w, 6, generator=g)
    first = torch.softmax(torch.randn(h, w, 4, generator=g) * 3, dim=-1)
    cfg = PropagationConfig(context=4, radius=2.5, topk=4, band_cells=band_cells)
    want = reference_propagate(feats, first, cfg)
    assert torch.allclose(propagate(feats, first, cfg).double(), want, atol=1e-5)
