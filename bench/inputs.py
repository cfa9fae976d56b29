"""Videos the benchmarks run on: the real clips of ``../shared/media`` and the synthetic
motion task. Light imports only (the extraction benchmark's spawned workers import its
main module, which imports this one)."""
from __future__ import annotations

from pathlib import Path

from pipeline.manifest import ManifestRow, read_manifest

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


def have_media() -> bool:
    return MEDIA.is_dir() and any(MEDIA.glob("*.mp4"))


def media_rows() -> list[ManifestRow]:
    """The real clips (H.264, 320x180 to 1280x720), one train row each, sorted by name."""
    return [ManifestRow(p.stem, str(p), "train") for p in sorted(MEDIA.glob("*.mp4"))]


def synthetic_rows(tmp: Path, train_per_class: int) -> list[ManifestRow]:
    """``train_per_class`` x 4 synthetic 128x128 motion videos written under ``tmp``."""
    from synth.benchmark import SynthConfig, write_synthetic

    manifests = write_synthetic(tmp / "synth", SynthConfig(tasks=("motion",), train_per_class=train_per_class,
                                                           test_per_class=0), progress=False)
    return read_manifest(manifests["motion"])
