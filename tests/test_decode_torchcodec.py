"""The optional torchcodec decoder picks the same frames as the PyAV path (issue 12, deliverable 4).

Runs on torchcodec's CPU device wherever torchcodec and FFmpeg's shared libraries load (else
skipped with the reason), and on NVDEC where a CUDA GPU exists. Frames are compared by
presentation time (exactly: both read the same stream's timestamps) and by pixels:

* CPU device at the native size: both convert YUV/RGB to RGB24 with swscale -> equal.
* NVDEC: YUV 4:2:0 -> RGB on the GPU. Each 8-bit output is the rounding of a real value, so
  two correct implementations with different fixed-point coefficients differ by 1 level where
  they round to opposite sides; chroma upsampling (nearest vs bilinear) adds up to a few
  levels on chroma edges only. Tolerance: median difference <= 1 level, 99th percentile <= 4.
* Scaled frames: torchcodec resizes with antialiasing, swscale without, so pixels differ
  near edges (2.7 levels on average on the 8x8 random blocks scaled 48 -> 32 px): that is a
  filter difference, not a rounding one, so the test is the frame identity (the pattern's
  index) and the timestamps, with a mean difference under 4 levels as a sanity bound.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from extract.decode import DecodeError, Geometry, decode_all
from extract.decode_torchcodec import TorchCodecDecoder, torchcodec_problem
from extract.decoders import make_decoder
from extract.workers import ChunkEvent, DecodeJob, DecodePool, DoneEvent
from pipeline.errors import ConfigError
from tests.videos import frame_index, make_h264_video, make_lossless_video, pattern_frames

CPU_PROBLEM = torchcodec_problem("cpu")
needs_torchcodec = pytest.mark.skipif(CPU_PROBLEM is not None, reason=f"torchcodec unusable here: {CPU_PROBLEM}")
CUDA_PROBLEM = torchcodec_problem("cuda")

CASES = [  # (clip, geometry, kwargs, native size: no scaling)
    ("lossless", Geometry(size=32, mode="squash"), {}, True),
    ("lossless", Geometry(size=32, mode="squash"), dict(fps=7.0), True),
    ("h264", Geometry(size=48), dict(fps=12.0, start=0.9, end=2.6), True),  # 64x48: crop only
    ("h264", Geometry(size=48), dict(fps=45.0, min_frames=3), True),
    ("h264", Geometry(size=32), dict(fps=10.0), False),  # scaled to 43x32, then cropped
    # the whole short-side-scaled frame (test videos with 3 test crops): the same rule in both decoders
    ("h264", Geometry(size=48, mode="short_side"), dict(fps=12.0), True),  # 64x48 as it is
    ("h264", Geometry(size=32, mode="short_side"), dict(fps=10.0), False),  # 43x32, not cropped
]


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tc")
    return {"lossless": make_lossless_video(d / "lossless.mp4", pattern_frames(40, 32, 32, seed=4), 20),
            "h264": make_h264_video(d / "h264.mp4", pattern_frames(90, 48, 64, seed=5), 30, gop=12)}


def _decode(decoder: TorchCodecDecoder, path: Path, geometry: Geometry, **kw: object) -> tuple[np.ndarray, np.ndarray]:
    chunks = list(decoder.iter_frames(path, geometry=geometry, chunk_size=8, **kw))
    assert all(len(c) <= 8 for c in chunks)
    return np.concatenate([c.frames for c in chunks]), np.concatenate([c.timestamps for c in chunks])


def _same_frames(got: tuple[np.ndarray, np.ndarray], want: object, *, exact: bool, gpu: bool = False) -> None:
    frames, times = got
    np.testing.assert_array_equal(times, want.timestamps)  # the same frames chosen, by time
    assert [frame_index(f) for f in frames] == [frame_index(f) for f in want.frames]
    diff = np.abs(frames.astype(np.int16) - want.frames.astype(np.int16))
    if exact:
        assert diff.max() == 0
    elif gpu:
        assert np.median(diff) <= 1 and np.percentile(diff, 99) <= 4
    else:  # a different resampling filter: a sanity bound, the identity checks above are the test
        assert diff.mean() < 4.0


@needs_torchcodec
@pytest.mark.parametrize("clip,geometry,kw,native", CASES, ids=lambda c: str(c))
def test_cpu_device_picks_the_same_frames_as_pyav(clips: dict[str, Path], clip: str, geometry: Geometry,
                                                  kw: dict, native: bool) -> None:
    want = decode_all(clips[clip], geometry=geometry, **kw)
    got = _decode(TorchCodecDecoder("cpu"), clips[clip], geometry, **kw)
    _same_frames(got, want, exact=native)


@needs_torchcodec
def test_cpu_device_errors_keep_their_stage(clips: dict[str, Path], tmp_path: Path) -> None:
    dec = TorchCodecDecoder("cpu")
    with pytest.raises(DecodeError) as e:
        list(dec.iter_frames(clips["lossless"], geometry=Geometry(size=32), min_frames=41))
    assert e.value.stage == "too_short"
    rotated = make_lossless_video(tmp_path / "rot.mp4", pattern_frames(4, 32, 48), 10, rotation=90)
    with pytest.raises(DecodeError) as e:
        list(dec.iter_frames(rotated, geometry=Geometry(size=32)))
    assert e.value.stage == "open" and "decoder=pyav" in str(e.value)


@needs_torchcodec
def test_torchcodec_runs_in_the_decode_pool(clips: dict[str, Path]) -> None:
    """The decoder object is sent to spawned workers (picklable) and gives PyAV's frames."""
    kwargs = dict(geometry=Geometry(size=32, mode="squash"), fps=None, chunk_size=8, threads=1, min_frames=1)
    with DecodePool(1, kwargs, decoder=make_decoder("torchcodec-cpu"), timeout_s=120.0) as pool:
        events = list(pool.run([DecodeJob(0, "a", str(clips["lossless"]))]))
    assert isinstance(events[-1], DoneEvent)
    frames = np.concatenate([e.frames for e in events if isinstance(e, ChunkEvent)])
    np.testing.assert_array_equal(frames, decode_all(clips["lossless"], **{k: v for k, v in kwargs.items()
                                                                            if k != "threads"}).frames)


@pytest.mark.skipif(CUDA_PROBLEM is not None, reason=f"NVDEC unusable here: {CUDA_PROBLEM}")
@pytest.mark.parametrize("kw", [{}, dict(fps=12.0, start=0.9, end=2.6)], ids=str)
def test_nvdec_picks_the_same_frames_as_pyav(clips: dict[str, Path], kw: dict) -> None:
    geometry = Geometry(size=48)  # 64x48 yuv420p H.264: short side 48, centre crop, no scaling
    _same_frames(_decode(TorchCodecDecoder("cuda"), clips["h264"], geometry, **kw),
                 decode_all(clips["h264"], geometry=geometry, **kw), exact=False, gpu=True)


@pytest.mark.skipif(CUDA_PROBLEM is None, reason="a CUDA GPU is available here")
def test_nvdec_without_a_gpu_is_refused_before_any_work_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match="torchcodec-cuda") as e:
        make_decoder("torchcodec-cuda")
    assert ("CUDA GPU" in str(e.value) and "decoder=pyav" in str(e.value)) or "pip install" in str(e.value)
