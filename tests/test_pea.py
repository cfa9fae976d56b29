"""extract/pea.py: the PEA return view on random-weight open_clip and timm ViTs at small sizes.

* ratio 0 (window = the original grid) equals the normal forward bit for bit;
* with a window, it equals the library's own forward of a copy of the ViT whose PE parameter
  was overwritten by hand with that window (one copy per sample, since offsets are per sample);
* the window itself equals a bicubic upsample written out with torch's ``interpolate``;
* offsets are seeded and in range; the CNN is refused.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from extract.backbones import OpenClipViTBackbone, Preprocess, TimmViTBackbone
from extract.pea import (
    PEAError,
    draw_offsets,
    patch_pe,
    pea_forward,
    pea_patch_pe,
    pea_supported,
    upsampled_size,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def _clip(size: int = 48, patch: int = 16) -> OpenClipViTBackbone:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=size, patch_size=patch, width=64, layers=2, heads=4, mlp_ratio=2.0,
                               output_dim=32, output_tokens=True)
    with torch.no_grad():  # make the PE large enough that a changed window changes the tokens visibly
        visual.positional_embedding.mul_(8)
    return OpenClipViTBackbone(visual, name="tiny-clip", preprocess=Preprocess(size, MEAN, STD, "bicubic"),
                               weights_source="random", weights_sha256=None, library="open_clip",
                               model_name="tiny")


def _timm(arch: str, size: int) -> TimmViTBackbone:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, img_size=size, depth=2, embed_dim=64,
                              num_heads=4)
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.5)
    return TimmViTBackbone(model, name=f"tiny-{arch}", preprocess=Preprocess(size, MEAN, STD, "bicubic"),
                           weights_source="random", weights_sha256=None, library="timm", model_name=arch)


BUILDERS = {
    "clip-b16": lambda: _clip(48, 16),                                   # 3x3 grid, CLS PE
    "timm-mae-b16": lambda: _timm("vit_base_patch16_224", 64),          # 4x4 grid, CLS with PE
    "timm-dinov2-14": lambda: _timm("vit_small_patch14_dinov2", 42),    # 3x3 grid, patch 14
    "timm-dinov2-reg": lambda: _timm("vit_small_patch14_reg4_dinov2", 56),  # 4 registers, no_embed_class
}


def _images(bb, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = bb.preprocess.size
    return bb.prepare(torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8, generator=g))


def _with_pe(bb, window):
    """A deep copy of ``bb`` whose PE parameter holds ``window`` ``(H*W, D)`` in its patch entries."""
    other = copy.deepcopy(bb)
    with torch.no_grad():
        if isinstance(other, OpenClipViTBackbone):
            other.visual.positional_embedding[1:] = window
        else:
            m = other.model
            start = 0 if m.no_embed_class else m.num_prefix_tokens
            m.pos_embed[0, start:] = window
    return other


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_ratio_zero_equals_the_normal_forward_exactly(name: str) -> None:
    bb = BUILDERS[name]()
    x = _images(bb, 3)
    with torch.no_grad():
        ref = bb(x)
        got = pea_forward(bb, x, torch.zeros(3, 2, dtype=torch.long), ratio=0.0)
    assert got.shape == ref.shape == (3, *bb.grid(), bb.channels)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_window_equals_a_forward_with_the_pe_replaced(name: str) -> None:
    bb = BUILDERS[name]()
    h, w = bb.grid()
    ratio = 10.0
    x = _images(bb, 3)
    offsets = draw_offsets(3, (h, w), ratio, torch.Generator().manual_seed(5))
    # the window written out: bicubic upsample of the (1, D, H, W) PE grid, then a crop
    pe = patch_pe(bb).detach()
    up = F.interpolate(pe.T.reshape(1, -1, h, w), size=upsampled_size((h, w), ratio), mode="bicubic",
                       align_corners=False)[0]
    with torch.no_grad():
        got = pea_forward(bb, x, offsets, ratio=ratio)
        plain = bb(x)
        for n, (oy, ox) in enumerate(offsets.tolist()):
            window = up[:, oy:oy + h, ox:ox + w].reshape(up.shape[0], h * w).T
            ref = _with_pe(bb, window)(x[n:n + 1])
            torch.testing.assert_close(got[n:n + 1], ref, rtol=0, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-2)  # the PE really changed the tokens


def test_upsampled_size_and_offsets_follow_the_released_code() -> None:
    assert upsampled_size((14, 14), 10) == (154, 154)
    assert upsampled_size((14, 14), 0.5) == (21, 21)
    assert upsampled_size((16, 16), 10) == (176, 176)
    a = draw_offsets(500, (14, 14), 10, torch.Generator().manual_seed(3))
    b = draw_offsets(500, (14, 14), 10, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (500, 2)
    assert a.min() >= 0 and a.max() <= 140 and a.max() > 120  # inclusive range [0, 154 - 14]
    assert not torch.equal(a, draw_offsets(500, (14, 14), 10, torch.Generator().manual_seed(4)))


def test_window_at_offset_zero_ratio_zero_is_the_pe_itself() -> None:
    pe = torch.randn(12, 5)
    out = pea_patch_pe(pe, (3, 4), 0.0, torch.zeros(2, 2, dtype=torch.long))
    assert torch.equal(out, pe.expand(2, -1, -1))
    with pytest.raises(PEAError, match="offsets must lie"):
        pea_patch_pe(pe, (3, 4), 1.0, torch.tensor([[4, 0]]))


def test_the_cnn_is_refused_with_the_plain_return_view_named() -> None:
    from extract.backbones import create_backbone

    cnn = create_backbone("mobilenetv2-imagenet", pretrained=False, image_size=64)
    assert not pea_supported(cnn)
    assert pea_supported(_clip())
    x = torch.zeros(1, 3, 64, 64)
    with pytest.raises(PEAError, match=r"no positional embedding.*A' = A"):
        pea_forward(cnn, x, torch.zeros(1, 2, dtype=torch.long))


def test_frame_offsets_are_seeded_per_video_and_frame() -> None:
    from extract.pea import frame_offsets

    a = frame_offsets(3, "vid-a", [0, 1, 2, 7], 4, (14, 14), 10.0)
    assert a.shape == (4, 4, 2) and a.min() >= 0 and a.max() <= 140
    assert torch.equal(frame_offsets(3, "vid-a", [7], 4, (14, 14), 10.0)[0], a[3])  # independent of batching
    assert not torch.equal(frame_offsets(3, "vid-b", [0, 1, 2, 7], 4, (14, 14), 10.0), a)
    assert not torch.equal(frame_offsets(4, "vid-a", [0, 1, 2, 7], 4, (14, 14), 10.0), a)
