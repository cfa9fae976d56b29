"""The on-the-fly feature source (extract/source.py) against a real store of the same videos.

The store is written by the real extraction (batches of 7 frames spanning videos, 2 videos per
shard); the source decodes the requested frames alone and runs the same backbone on them. A
float32 store must agree to 1e-6 (float reductions may differ with the batch a frame sits in);
a float16 store to half a float16 ulp of the value (its rounding) plus that float32 slack.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from extract.config import ExtractConfig
from extract.encode import build_backbone
from extract.source import OnlineFeatureSource
from pipeline.errors import ConfigMismatchError
from pipeline.store import open_store
from tests.stores import make_real_store
from tests.videos import frame_index

F32_ATOL = 1e-6


def _half_ulp16(x: np.ndarray) -> np.ndarray:
    """Largest float16 rounding error of float32 values ``x``: 2^-11 relative, 2^-25 for subnormals."""
    return np.abs(x) * 2.0**-11 + 2.0**-25


def _indices(n: int) -> np.ndarray:
    """Unordered frame indices with a repeat, first and last frame included."""
    return np.array([n - 1, 0, 3, 3, n // 2, 1])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_source_features_equal_stored_features(tmp_path: Path, dtype: str) -> None:
    real = make_real_store(tmp_path, dtype=dtype)
    store = open_store(real.path)
    source = OnlineFeatureSource.for_store(store)
    assert source.video_ids == store.video_ids
    for vid in store.video_ids:
        idx = _indices(store.num_frames(vid))
        frames = source.frames(vid, idx)
        assert frames.shape == (len(idx), real.image_size, real.image_size, 3) and frames.dtype == np.uint8
        assert [frame_index(f) for f in frames] == idx.tolist()  # the right frames, in the order asked
        stored = store.features(vid, idx)
        online = source.features(vid, idx)
        assert online.shape == stored.shape == (len(idx), *store.feature_shape)
        rounded = source.features(vid, idx, as_stored=True)
        if dtype == "float32":
            np.testing.assert_allclose(online, stored, rtol=0, atol=F32_ATOL)
            np.testing.assert_array_equal(rounded, online)  # float32 storage rounds nothing
        else:
            assert np.all(np.abs(online - stored) <= _half_ulp16(online) + F32_ATOL), vid
            # rounded like the store: equal unless float32 slack crossed a float16 rounding boundary
            # rounded like the store: equal, or one float16 ulp apart where the float32 slack
            # straddles a rounding boundary
            assert np.all(np.abs(rounded - stored) <= 2 * _half_ulp16(stored)), vid
            assert not np.array_equal(online, stored)  # the float16 rounding is real (the check is not vacuous)
    with pytest.raises(IndexError, match="out of range"):
        source.features(store.video_ids[0], [store.num_frames(store.video_ids[0])])


def test_source_refuses_another_backbone(tmp_path: Path) -> None:
    real = make_real_store(tmp_path, num_videos=1, frames=(12,))
    store = open_store(real.path)
    other = build_backbone(ExtractConfig(backbone=real.backbone, random_weights=True, image_size=real.image_size))
    with pytest.raises(ConfigMismatchError, match="weights_sha256"):
        OnlineFeatureSource.for_store(store, backbone=other)
