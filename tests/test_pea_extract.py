"""PEA views stored at extraction (``--pea-views K``): they equal a direct forward of the same ViT
with the same PE window on the same decoded pixels; offsets are the seeded ones; the header,
``verify`` and ``status`` cover them; the CNN and stores without them are refused."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from extract.config import ExtractConfig
from extract.decode import Geometry, decode_all
from extract.encode import build_backbone
from extract.pea import PEAError, frame_offsets, pea_forward
from extract.runner import run_extract
from pipeline.errors import ConfigMismatchError, StoreError
from pipeline.manifest import ManifestRow, read_manifest, write_manifest
from pipeline.store import open_store, store_status, verify_store
from tests.videos import make_lossless_video, pattern_frames

#: float16 storage: round-to-nearest keeps 11 significant bits, |error| <= 2^-11 |x| (plus
#: the direct forward's own float32 noise across batch sizes)
F16_RTOL = 2.0**-11


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("videos")
    rows = []
    for i, n in enumerate((5, 7, 4)):
        p = make_lossless_video(tmp / f"v{i}.mp4", pattern_frames(n, 48, 64, seed=10 + i), 10)
        rows.append(ManifestRow(f"v{i}", str(p), "train", None, None))
    return write_manifest(rows, tmp / "m.jsonl")


def _cfg(manifest: Path, store: Path, **kw) -> ExtractConfig:
    base = dict(manifest=str(manifest), store=str(store), random_weights=True, dtype="float16", pea_views=2,
                pea_seed=11, videos_per_shard=2, batch_size=3, chunk_size=2, workers=1, device="cpu", progress=False)
    return ExtractConfig(**{**base, **kw})


CASES = {  # backbone, image size, PEA views
    "clip-vit-b16": ("clip-vit-b16", None, 1),           # open_clip, 14 x 14 at its native 224 px
    "dinov2-vits14": ("dinov2-vits14", 42, 2),           # timm, CLS with its own PE
    "dinov2-vits14-reg": ("dinov2-vits14-reg", 42, 2),   # timm, 4 registers without PE
}


@pytest.mark.parametrize("case", [pytest.param("clip-vit-b16", marks=pytest.mark.slow), "dinov2-vits14",
                                  "dinov2-vits14-reg"])
def test_stored_pea_views_equal_a_direct_forward(case: str, videos: Path, tmp_path: Path) -> None:
    backbone, size, views = CASES[case]
    manifest = videos
    if case == "clip-vit-b16":  # ViT-B at 224 px on a loaded 2-core machine: one 4-frame video is enough
        manifest = write_manifest(read_manifest(videos)[2:], tmp_path / "one.jsonl")
    cfg = _cfg(manifest, tmp_path / "s.zarr", backbone=backbone, image_size=size, pea_views=views)
    run_extract(cfg)
    store = open_store(cfg.store)
    bb = build_backbone(cfg)
    grid = bb.grid()
    assert store.pea_views_count == views
    assert store.content["pea"] == {"views": views, "ratio": 10.0, "seed": 11,
                                    "max_offset": [10 * grid[0], 10 * grid[1]]}
    for row in read_manifest(manifest):
        frames = decode_all(row.path, geometry=Geometry(**store.content["geometry"]), fps=None).frames
        t = store.num_frames(row.video_id)
        assert len(frames) == t
        offsets = store.pea_offsets(row.video_id)
        assert offsets.shape == (t, views, 2)
        np.testing.assert_array_equal(offsets, frame_offsets(11, row.video_id, range(t), views, grid, 10.0).numpy())
        x = bb.prepare(frames)
        with torch.no_grad():
            plain = bb(x).numpy()
            for k in range(views):
                direct = pea_forward(bb, x, torch.from_numpy(offsets[:, k]), 10.0).numpy()
                stored = store.pea_features(row.video_id, list(range(t)), [k] * t)
                np.testing.assert_allclose(stored, direct, rtol=F16_RTOL, atol=1e-4)
                assert not np.allclose(stored, plain, rtol=1e-2, atol=1e-2)  # a window really changed them
        np.testing.assert_allclose(store.features(row.video_id), plain, rtol=F16_RTOL, atol=1e-4)
    assert verify_store(cfg.store) == []


def test_header_status_verify_and_resume_cover_pea_views(videos: Path, tmp_path: Path) -> None:
    cfg = _cfg(videos, tmp_path / "s.zarr", backbone="dinov2-vits14-reg", image_size=28, dtype="int8")
    run_extract(cfg)
    st = store_status(cfg.store)
    assert st.pea_views == 2 and st.videos_stored == 3
    store = open_store(cfg.store)
    assert store.header["content"]["pea"]["views"] == 2
    g = zarr.open_group(str(Path(cfg.store) / "shards" / "00000"), mode="r")
    assert set(g.array_keys()) == {"features", "scales", "timestamps", "pea_features", "pea_scales", "pea_offsets"}
    assert g["pea_features"].shape == (12, 2, 2, 2, 384) and g["pea_offsets"].shape == (12, 2, 2)
    # a different number of views is another store: refused before any work
    with pytest.raises(ConfigMismatchError, match="pea"):
        run_extract(dataclasses.replace(cfg, pea_views=1))
    # verify reads the PEA arrays too
    a = zarr.open_array(str(Path(cfg.store) / "shards" / "00001" / "pea_scales"), mode="r+")
    a[0, 1, 0, 0] = np.nan
    o = zarr.open_array(str(Path(cfg.store) / "shards" / "00000" / "pea_offsets"), mode="r+")
    o[3, 0, 0] = 999
    problems = verify_store(cfg.store)
    # a file rewritten behind the store's back is caught by the marker's SHA-256 file table
    # (the store is checksummed; the NaN scan covers what the writer itself wrote)
    assert any("shards/00001/pea_scales/" in p and "SHA-256" in p for p in problems)
    assert any("pea_offsets" in p and "outside" in p for p in problems)


def test_cnn_and_missing_views_are_refused(videos: Path, tmp_path: Path) -> None:
    cfg = _cfg(videos, tmp_path / "cnn.zarr", backbone="mobilenetv2-imagenet", image_size=64)
    with pytest.raises(PEAError, match=r"no positional embedding.*A' = A"):
        run_extract(cfg)
    assert not (tmp_path / "cnn.zarr").exists()  # refused before the store is created
    run_extract(dataclasses.replace(cfg, pea_views=0))
    store = open_store(cfg.store)
    assert store.pea_views_count == 0 and "pea" not in store.content
    with pytest.raises(StoreError, match="extracted without PEA views.*--pea-views"):
        store.pea_features("v0", [0], [0])
    with pytest.raises(StoreError, match="extracted without PEA views"):
        store.pea_offsets("v0")
