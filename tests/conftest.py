"""Shared pytest fixtures: real videos (written with PyAV), the default tiny feature store,
one torch thread, an S3 server."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pytest

from tests.videos import make_lossless_video, pattern_frames

#: Real short H.264 clips beside the repo checkout (``<repo>/../shared/media``), may be absent.
SHARED_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"


class Clip(NamedTuple):
    """A written test video and what it holds: ``frames`` (T, H, W, 3) uint8 RGB at ``fps``."""

    path: Path
    frames: np.ndarray
    fps: int


@pytest.fixture
def shared_media() -> Path:
    """Folder of real short H.264 clips; the test is skipped when it is absent."""
    if not SHARED_MEDIA.is_dir() or not any(SHARED_MEDIA.glob("*.mp4")):
        pytest.skip(f"no real clips in {SHARED_MEDIA}")
    return SHARED_MEDIA


@pytest.fixture
def lossless_clip(tmp_path: Path) -> Clip:
    """1 s lossless video: 30 distinct 32x32 :func:`pattern_frames` at 30 fps (frame k at k/30 s)."""
    frames = pattern_frames(30, 32, 32, seed=0)
    return Clip(make_lossless_video(tmp_path / "lossless.mp4", frames, 30), frames, 30)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    import torch  # lazy: most test modules never import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_torch_thread():
    """Run the test on one torch intra-op thread and restore the caller's count afterwards
    (training results depend on the thread count; see docs/demo.md, Reproducibility)."""
    with _one_torch_thread():
        yield


@pytest.fixture(scope="module")
def one_torch_thread_per_module():
    """:func:`one_torch_thread` for a whole module, its module-scoped fixtures included (on the
    shared 2-core machine one thread also halves CPU time: no spin contention)."""
    with _one_torch_thread():
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """The default tiny synthetic store of the stage-2 tests (``tests.stores``): 3 classes,
    8 train and 4 test videos of 20..40 frames, 2 x 2 x 16 float32 tokens; one per module.
    A module that needs another store defines its own ``store`` fixture."""
    from tests.stores import write_synthetic_store  # lazy: most test modules never read a store

    return write_synthetic_store(tmp_path_factory.mktemp("store") / "s.zarr", num_classes=3)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API server (moto's server mode, tests/s3.py) for the whole session; the AWS
    environment variables point at it while it runs. Skipped without the dev extra."""
    pytest.importorskip("moto.server", reason="moto[server] is in the dev extra: pip install -e '.[dev]'")
    pytest.importorskip("s3fs", reason="s3fs is in the dev extra: pip install -e '.[dev]'")
    from tests.s3 import s3_server

    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """``s3://<fresh bucket>`` on the session's S3 server."""
    from tests.s3 import new_bucket

    return new_bucket()
