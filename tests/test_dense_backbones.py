"""Any-size (non-square) forwards: the PE is resampled as the library itself does it.

References are the libraries' own routes to another input size: for timm a model built at
``img_size=(H, W)`` whose checkpoint goes through timm's ``checkpoint_filter_fn`` (which
resamples ``pos_embed``), for open_clip a tower built at ``image_size=(H, W)`` whose state
dict goes through ``open_clip.model.resize_pos_embed`` (the loader's resampling). Random
weights, small inputs.
"""
from __future__ import annotations

import copy
import importlib
from types import SimpleNamespace

import pytest
import torch

from extract.backbones import BackboneError, create_backbone


def _images(h: int, w: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name,size", [("mae-vitb16", (64, 96)), ("dinov2-vits14-reg", (56, 84))])
def test_timm_dynamic_forward_equals_a_model_built_at_that_size(name, size):
    import timm

    bb = create_backbone(name, pretrained=False, dynamic_size=True)
    h, w = size
    step = bb.dense_step
    assert bb.dense_grid(h, w) == (h // step, w // step)
    x = _images(h, w)
    with torch.no_grad():
        got = bb.forward_dense(x)
    assert got.shape == (2, h // step, w // step, bb.channels)
    model = bb.model
    ref = timm.create_model(f"{model.pretrained_cfg['architecture']}.{model.pretrained_cfg['tag']}",
                            pretrained=False, num_classes=0, img_size=(h, w)).eval()
    filt = importlib.import_module(type(ref).__module__).checkpoint_filter_fn
    ref.load_state_dict(filt(copy.deepcopy(model.state_dict()), ref))
    with torch.no_grad():
        want = ref.forward_features(x)[:, model.num_prefix_tokens:].reshape(got.shape)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # at the native square size the dense forward is the ordinary one
    s = bb.preprocess.size
    xs = _images(s, s, n=1)
    with torch.no_grad():
        assert torch.allclose(bb.forward_dense(xs), bb(xs), atol=1e-5)


def test_open_clip_dense_forward_equals_the_loader_resampled_tower():
    import open_clip
    from open_clip.model import _build_vision_tower, resize_pos_embed

    bb = create_backbone("clip-vit-b16", pretrained=False)
    h, w = 48, 80
    x = _images(h, w)
    with torch.no_grad():
        got = bb.forward_dense(x)
    assert got.shape == (2, 3, 5, 768)
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-16"))
    ref = _build_vision_tower(cfg["embed_dim"], dict(cfg["vision_cfg"], image_size=(h, w), output_tokens=True),
                              quick_gelu=True).eval()
    sd = {f"visual.{k}": v for k, v in copy.deepcopy(bb.visual.state_dict()).items()}
    resize_pos_embed(sd, SimpleNamespace(visual=ref))
    ref.load_state_dict({k[len("visual."):]: v for k, v in sd.items()})
    with torch.no_grad():
        _, tokens = ref(x)
    assert torch.allclose(got, tokens.reshape(got.shape), atol=1e-4, rtol=1e-4)
    xs = _images(224, 224, n=1)
    with torch.no_grad():
        assert torch.allclose(bb.forward_dense(xs), bb(xs), atol=1e-5)


def test_cnn_dense_forward_and_size_refusals():
    bb = create_backbone("mobilenetv2-imagenet", pretrained=False)
    x = _images(64, 96)
    with torch.no_grad():
        out = bb.forward_dense(x)
        assert torch.equal(out, bb.model.forward_features(x).permute(0, 2, 3, 1))
    assert out.shape[1:3] == (2, 3) == bb.dense_grid(64, 96)
    with pytest.raises(BackboneError, match="multiples of 32"):
        bb.forward_dense(_images(60, 96))
    plain = create_backbone("mae-vitb16", pretrained=False, image_size=64)
    with pytest.raises(BackboneError, match="dynamic_size=True"):
        plain.forward_dense(_images(64, 96))
