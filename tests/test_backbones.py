"""extract/backbones.py: every registered architecture with real (random-init) timm/open_clip
models, the exact tokens returned, preprocessing, frozen state, checkpoint files, offline hub
errors, and the real ImageNet MobileNetV2 weights on a real video (skipped if not cached)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from extract.backbones import (
    BACKBONES,
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_BACKBONE,
    Backbone,
    BackboneError,
    Preprocess,
    create_backbone,
)
from extract.weights import mobilenet_checkpoint
from pipeline.errors import FreezeframeError, WeightsError
from pipeline.provenance import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: name -> (grid at 224, channels, mean, std, interpolation)
EXPECTED = {
    "mobilenetv2-imagenet": ((7, 7), 1280, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
    "clip-vit-b16": ((14, 14), 768, CLIP_MEAN, CLIP_STD, "bicubic"),
    "clip-vit-l14": ((16, 16), 1024, CLIP_MEAN, CLIP_STD, "bicubic"),
    "dinov2-vits14": ((16, 16), 384, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
    "dinov2-vitb14": ((16, 16), 768, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
    "dinov2-vits14-reg": ((16, 16), 384, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
    "mae-vitb16": ((14, 14), 768, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
    "dinov2-vitl14": ((16, 16), 1024, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
    "mae-vitl16": ((14, 14), 1024, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
}

_CACHE: dict[str, Backbone] = {}


pytestmark = pytest.mark.usefixtures("one_torch_thread_per_module")


def random_backbone(name: str) -> Backbone:
    """One random-weight instance per name for the whole module (building ViTs takes seconds)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = create_backbone(name, pretrained=False)
    return _CACHE[name]


def random_frames(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def test_registry_holds_every_backbone_and_names_unknown_ones() -> None:
    assert set(BACKBONES.names()) == set(EXPECTED)
    assert DEFAULT_BACKBONE == "mobilenetv2-imagenet"
    with pytest.raises(KeyError, match="mobilenetv2-imagenet"):
        create_backbone("resnet-9000", pretrained=False)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_random_backbone_shapes_preprocess_and_frozen(name: str) -> None:
    grid, channels, mean, std, interp = EXPECTED[name]
    bb = random_backbone(name)
    assert bb.grid() == grid and bb.channels == channels
    assert bb.preprocess == Preprocess(224, mean, std, interp)
    assert bb.weights_source == "random" and bb.weights_sha256 is None
    # frozen: eval mode, no trainable parameter, and train() cannot switch it back
    assert not bb.training and all(not m.training for m in bb.modules())
    assert all(not p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and all(not m.training for m in bb.modules())
    n = 1 if name in ("clip-vit-l14", "clip-vit-b16", "dinov2-vitb14", "mae-vitb16", "dinov2-vitl14",
                      "mae-vitl16") else 2
    y = bb(bb.prepare(random_frames(n, 224)))
    assert y.shape == (n, *grid, channels) and y.dtype == torch.float32
    assert not y.requires_grad and torch.isfinite(y).all()
    if n == 2:  # different frames give different features (nothing is constant)
        assert not torch.allclose(y[0], y[1])
    d = bb.describe()
    json.dumps(d)
    assert d["name"] == name and d["grid"] == list(grid) and d["channels"] == channels
    assert d["weights_source"] == "random" and d["preprocess"]["interpolation"] == interp
    assert d["library"].split()[0] in ("timm", "open_clip") and d["model_name"]


def test_prepare_normalises_exactly() -> None:
    bb = random_backbone("mobilenetv2-imagenet")
    frames = random_frames(3, 224, seed=1)
    frames[0, 0, 0] = torch.tensor([0, 128, 255], dtype=torch.uint8)
    x = bb.prepare(frames)
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32 and x.device == frames.device
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    expect = (frames.numpy().astype(np.float64) / 255.0 - mean) / std  # (N, S, S, 3)
    np.testing.assert_allclose(x.permute(0, 2, 3, 1).numpy(), expect, atol=1e-5)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), (np.array([0, 128, 255]) / 255 - mean) / std, atol=1e-6)
    # numpy frames work too; the input is not modified in place
    before = frames.clone()
    torch.testing.assert_close(bb.prepare(frames.numpy()), x)
    assert torch.equal(frames, before)
    with pytest.raises(BackboneError, match=r"\(N, 224, 224, 3\)"):
        bb.prepare(random_frames(1, 112))
    with pytest.raises(BackboneError, match="uint8"):
        bb.prepare(frames.float())
    with pytest.raises(BackboneError, match=r"\(N, 3, 224, 224\)"):
        bb(torch.zeros(1, 3, 112, 112))


def test_preprocess_validates_and_serialises() -> None:
    p = Preprocess(224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    assert p.to_dict() == {"size": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                           "interpolation": "bilinear"}
    assert Preprocess(**{**p.to_dict(), "mean": tuple(p.mean), "std": tuple(p.std)}) == p
    with pytest.raises(BackboneError, match="interpolation"):
        Preprocess(224, IMAGENET_MEAN, IMAGENET_STD, "nearest")


def test_mobilenet_grid_follows_image_size() -> None:
    for size, grid in ((112, (4, 4)), (160, (5, 5))):
        bb = create_backbone("mobilenetv2-imagenet", pretrained=False, image_size=size)
        assert bb.grid() == grid and bb.preprocess.size == size
        assert bb(bb.prepare(random_frames(2, size))).shape == (2, *grid, 1280)
    with pytest.raises(BackboneError, match="multiple of 16"):
        create_backbone("mobilenetv2-imagenet", pretrained=False, image_size=100)


def test_dinov2_image_size_resizes_the_grid() -> None:
    bb = create_backbone("dinov2-vits14", pretrained=False, image_size=112)
    assert bb.grid() == (8, 8) and bb.preprocess.size == 112
    assert bb(bb.prepare(random_frames(1, 112))).shape == (1, 8, 8, 384)
    assert random_backbone("dinov2-vits14").grid() == (16, 16)
    with pytest.raises(BackboneError, match="multiple of 14"):
        create_backbone("dinov2-vits14", pretrained=False, image_size=200)


def test_open_clip_refuses_non_native_size() -> None:
    with pytest.raises(BackboneError, match="native 224"):
        create_backbone("clip-vit-b16", pretrained=False, image_size=336)


@pytest.mark.parametrize("name,prefix", [("dinov2-vits14", 1), ("dinov2-vits14-reg", 5), ("dinov2-vitl14", 1),
                                         ("mae-vitl16", 1)])
def test_timm_vit_drops_exactly_the_prefix_tokens(name: str, prefix: int) -> None:
    bb = random_backbone(name)
    assert bb.num_prefix_tokens == prefix == bb.model.num_prefix_tokens
    x = bb.prepare(random_frames(1, 224, seed=2))
    with torch.no_grad():
        tokens = bb.model.forward_features(x)  # (1, prefix + H*W, C), after the final norm
    h, w = bb.grid()
    assert tokens.shape[1] == prefix + h * w
    y = bb(x)
    torch.testing.assert_close(y.reshape(1, h * w, -1), tokens[:, prefix:])
    # row-major: grid cell (r, c) is patch token r * W + c
    torch.testing.assert_close(y[0, 1, 2], tokens[0, prefix + 1 * w + 2])
    assert not torch.allclose(y[0, 0, 0], tokens[0, 0])  # the CLS token is not in the grid


def test_clip_tokens_are_ln_post_of_last_block_without_cls_or_proj() -> None:
    bb = random_backbone("clip-vit-b16")
    v = bb.visual
    g = torch.Generator().manual_seed(3)  # non-trivial ln_post affine (init is weight 1, bias 0)
    ln_weight = 1 + 0.5 * torch.randn(v.ln_post.weight.shape, generator=g)
    ln_bias = 0.5 * torch.randn(v.ln_post.bias.shape, generator=g)
    saved = {k: t.clone() for k, t in v.ln_post.state_dict().items()}
    v.ln_post.load_state_dict({"weight": ln_weight, "bias": ln_bias})
    try:
        _check_clip_tokens(bb)
    finally:
        v.ln_post.load_state_dict(saved)


def _check_clip_tokens(bb: Backbone) -> None:
    v = bb.visual
    x = bb.prepare(random_frames(1, 224, seed=4))
    with torch.no_grad():  # by hand through the module's layers
        t = v.conv1(x)  # (1, 768, 14, 14)
        t = t.reshape(1, t.shape[1], -1).permute(0, 2, 1)  # (1, 196, 768), row-major patches
        t = torch.cat([v.class_embedding.view(1, 1, -1), t], dim=1) + v.positional_embedding
        t = v.ln_pre(t)
        for block in v.transformer.resblocks:
            t = block(t)
        last = t
        expect = v.ln_post(last)[:, 1:]
    y = bb(x)
    assert y.shape == (1, 14, 14, 768)  # width 768, not the 512-d projection
    torch.testing.assert_close(y.reshape(1, 196, 768), expect, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y.reshape(1, 196, 768), last[:, 1:], atol=1e-3)  # ln_post was applied


def _roundtrip(name: str, path: Path, compare_outputs: bool = True) -> None:
    """Load ``path`` (saved from the cached random instance) and check it is the same model."""
    src = random_backbone(name)
    loaded = create_backbone(name, weights=path)
    assert loaded.weights_source == f"file:{path.resolve()}"
    assert loaded.weights_sha256 == sha256_file(path)
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training
    want = src.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    if compare_outputs:
        x = src.prepare(random_frames(1, 224, seed=5))
        torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)


def test_checkpoint_roundtrip_mobilenet_plain_state_dict_with_head(tmp_path: Path) -> None:
    sd = dict(random_backbone("mobilenetv2-imagenet").model.state_dict())
    sd["classifier.weight"] = torch.randn(1000, 1280)  # a classifier head in the file is ignored
    sd["classifier.bias"] = torch.randn(1000)
    torch.save(sd, tmp_path / "mnv2.pth")
    _roundtrip("mobilenetv2-imagenet", tmp_path / "mnv2.pth")


def test_checkpoint_roundtrip_dinov2_wrapped_ddp_checkpoint(tmp_path: Path) -> None:
    sd = random_backbone("dinov2-vits14").model.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ck.pt")
    _roundtrip("dinov2-vits14", tmp_path / "ck.pt")


def test_checkpoint_roundtrip_clip_full_open_clip_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = {f"visual.{k}": v.contiguous() for k, v in random_backbone("clip-vit-b16").visual.state_dict().items()}
    sd["text_projection"] = torch.randn(512, 512)  # text tower of a full CLIP checkpoint: ignored
    sd["logit_scale"] = torch.tensor(4.6)
    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))
    # equal tensors in the same architecture (outputs are compared for the timm models above)
    _roundtrip("clip-vit-b16", tmp_path / "open_clip_model.safetensors", compare_outputs=False)


def test_wrong_checkpoints_give_clear_errors(tmp_path: Path) -> None:
    mnv2 = random_backbone("mobilenetv2-imagenet").model.state_dict()
    torch.save(mnv2, tmp_path / "mnv2.pth")
    with pytest.raises(WeightsError) as err:
        create_backbone("dinov2-vits14", weights=tmp_path / "mnv2.pth")
    msg = str(err.value)
    assert "missing keys" in msg and "cls_token" in msg and "unexpected keys" in msg and "conv_stem" in msg
    assert "--weights" in msg

    bad = dict(mnv2)
    bad["conv_head.weight"] = torch.zeros(10, 320, 1, 1)
    torch.save(bad, tmp_path / "bad_shape.pth")
    with pytest.raises(WeightsError, match=r"shape mismatches.*conv_head\.weight \(10, 320, 1, 1\)"):
        create_backbone("mobilenetv2-imagenet", weights=tmp_path / "bad_shape.pth")

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="cannot read"):
        create_backbone("mobilenetv2-imagenet", weights=tmp_path / "garbage.pth")
    with pytest.raises(WeightsError, match="does not exist"):
        create_backbone("clip-vit-b16", weights=tmp_path / "nope.pt")
    with pytest.raises(WeightsError, match="exclude each other"):
        create_backbone("mobilenetv2-imagenet", weights=tmp_path / "mnv2.pth", pretrained=False)
    assert issubclass(WeightsError, FreezeframeError)


@pytest.mark.parametrize("name", ["dinov2-vits14", "clip-vit-b16"])
def test_hub_weights_offline_fail_fast_naming_the_flags(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = hf_constants.HF_HUB_OFFLINE
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as err:
        create_backbone(name)
    assert time.monotonic() - t0 < 20  # no network retries (the hub client alone retries ~50 s)
    assert "--weights PATH" in str(err.value) and "--random-weights" in str(err.value)
    assert hf_constants.HF_HUB_OFFLINE == saved  # the offline switch is restored


def test_mobilenet_without_cached_weights_says_how_to_get_them(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FREEZEFRAME_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsError) as err:
        create_backbone("mobilenetv2-imagenet")
    msg = str(err.value)
    assert "make weights" in msg and "freezeframe weights" in msg and "--weights" in msg


# --------------------------------------------------------------------------------------
# real ImageNet weights on a real clip
# --------------------------------------------------------------------------------------
def _clip_frames(path: Path, n: int, size: int) -> np.ndarray:
    """``n`` frames spread over the clip, short side resized (bilinear) and centre-cropped."""
    out = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        assert stream.frames > n, "the clip's header should give its frame count"
        picks = set(np.linspace(0, stream.frames - 1, n + 2).round().astype(int)[1:-1].tolist())
        for i, f in enumerate(container.decode(stream)):
            if i not in picks:
                continue
            scale = size / min(f.width, f.height)
            w, h = max(size, round(f.width * scale)), max(size, round(f.height * scale))
            a = f.reformat(width=w, height=h, format="rgb24", interpolation="BILINEAR").to_ndarray()
            y0, x0 = (h - size) // 2, (w - size) // 2
            out.append(a[y0:y0 + size, x0:x0 + size])
            if len(out) == len(picks):
                break
    return np.stack(out)


def test_real_mobilenet_weights_recognise_the_cockatoo(shared_media: Path) -> None:
    import timm

    ckpt = mobilenet_checkpoint()
    if ckpt is None:
        pytest.skip("MobileNetV2 weights not cached (run `make weights`)")
    clip = shared_media / "cockatoo.mp4"
    if not clip.is_file():
        pytest.skip(f"{clip} absent")
    bb = create_backbone("mobilenetv2-imagenet")
    assert bb.weights_source == f"cache:{ckpt}" and bb.weights_sha256 == sha256_file(ckpt)
    frames = _clip_frames(clip, 8, bb.preprocess.size)
    feats = bb(bb.prepare(frames))  # (8, 7, 7, 1280)
    assert feats.shape == (8, 7, 7, 1280)
    # timm's own classifier with the same converted checkpoint, fed the backbone's features
    clf = timm.create_model("mobilenetv2_100", pretrained=False)
    clf.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    clf.eval()
    with torch.no_grad():
        x = bb.prepare(frames)
        torch.testing.assert_close(feats, clf.forward_features(x).permute(0, 2, 3, 1))
        probs = clf.forward_head(feats.permute(0, 3, 1, 2)).softmax(-1).mean(0)
    top3 = probs.topk(3).indices.tolist()
    assert 89 in top3, f"sulphur-crested cockatoo (89) not in top-3 {top3}"
