"""extract/decode.py on real PyAV-written videos: exact frames, times, segments, errors, cleanup."""
from __future__ import annotations

import gc
import math
import os
import pickle
import tarfile
import tracemalloc
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from extract import decode as D
from extract.decode import DecodeError, Geometry, decode_all, iter_frames, probe
from tests.conftest import Clip
from tests.videos import (
    frame_index,
    make_audio_only,
    make_h264_video,
    make_image_as_video,
    make_lossless_video,
    make_non_video,
    make_truncated_video,
    make_vfr_video,
    make_webm_video,
    make_zero_frame_video,
    pattern_frames,
)

NATIVE32 = Geometry(size=32, mode="squash")  # 32x32 sources: no resampling at all


def _indices(frames: np.ndarray) -> list[int]:
    return [frame_index(f) for f in frames]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def h264_clip(tmp_path_factory: pytest.TempPathFactory) -> Clip:
    """3 s lossy H.264 yuv420p, 90 pattern frames at 30 fps, keyframe every 12 frames."""
    frames = pattern_frames(90, 64, 64, seed=3)
    path = make_h264_video(tmp_path_factory.mktemp("h264") / "clip.mp4", frames, 30, gop=12)
    return Clip(path, frames, 30)


# ------------------------------------------------------------------ fixtures are what they claim


def test_fixtures_have_the_properties_they_claim(tmp_path: Path, h264_clip: Clip) -> None:
    # Lossless: raw PyAV gives back the exact pixels, even for a non-square frame.
    frames = pattern_frames(12, 24, 40, seed=5)
    path = make_lossless_video(tmp_path / "ll.mp4", frames, 12)
    with av.open(str(path)) as c:
        got = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    np.testing.assert_array_equal(got, frames)
    # Lossy H.264: every frame still identifies itself.
    with av.open(str(h264_clip.path)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert c.streams.video[0].format.name == "yuv420p"
        assert [frame_index(f.to_ndarray(format="rgb24")) for f in c.decode(video=0)] == list(range(90))
    # Truncated: opens, header promises 48 frames, single-threaded PyAV fails mid-decode.
    trunc = make_truncated_video(tmp_path / "trunc.mp4")
    decoded = 0
    with av.open(str(trunc)) as c:
        assert c.streams.video[0].frames == 48
        with pytest.raises(av.error.InvalidDataError):
            for _ in c.decode(video=0):
                decoded += 1
    assert 0 < decoded < 48
    # Zero frames: a real video stream, nothing to decode.
    zero = make_zero_frame_video(tmp_path / "zero.mp4")
    with av.open(str(zero)) as c:
        assert len(c.streams.video) == 1 and c.streams.video[0].width == 64
        assert list(c.decode(video=0)) == []
    # Audio only / image / text.
    with av.open(str(make_audio_only(tmp_path / "a.mp4"))) as c:
        assert [s.type for s in c.streams] == ["audio"]
    with av.open(str(make_image_as_video(tmp_path / "img.mp4"))) as c:
        assert c.format.name == "png_pipe"
    with pytest.raises(av.error.InvalidDataError):
        av.open(str(make_non_video(tmp_path / "t.mp4")))


# ------------------------------------------------------------------ exact content


def test_lossless_round_trip_is_exact(lossless_clip: Clip) -> None:
    out = decode_all(lossless_clip.path, geometry=NATIVE32)
    assert out.frames.shape == (30, 32, 32, 3) and out.frames.dtype == np.uint8
    np.testing.assert_array_equal(out.frames, lossless_clip.frames)
    np.testing.assert_allclose(out.timestamps, np.arange(30) / 30, atol=1e-9)
    assert out.timestamps.dtype == np.float64


def test_fps_selection_by_presentation_time(lossless_clip: Clip) -> None:
    out = decode_all(lossless_clip.path, geometry=NATIVE32, fps=10)
    assert _indices(out.frames) == list(range(0, 30, 3))
    np.testing.assert_array_equal(out.frames, lossless_clip.frames[::3])
    np.testing.assert_allclose(out.timestamps, np.arange(10) / 10, atol=1e-9)
    # A rate that does not divide 30: frame on screen at k/7 s is floor(30 k / 7).
    out7 = decode_all(lossless_clip.path, geometry=NATIVE32, fps=7)
    assert _indices(out7.frames) == [math.floor(30 * k / 7) for k in range(7)]
    # Above the native rate frames repeat (ffmpeg fps filter); timestamps are the real ones.
    out60 = decode_all(lossless_clip.path, geometry=NATIVE32, fps=60)
    assert _indices(out60.frames)[:8] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert np.all(np.diff(out60.timestamps) >= 0)
    np.testing.assert_allclose(out60.timestamps[:4], [0, 0, 1 / 30, 1 / 30], atol=1e-9)


def test_vfr_timestamps_and_selection(tmp_path: Path) -> None:
    times = [0.0, 0.1, 0.15, 0.5, 0.52, 1.3]
    path = make_vfr_video(tmp_path / "vfr.mp4", times, 32, 32)
    out = decode_all(path, geometry=NATIVE32)
    np.testing.assert_allclose(out.timestamps, times, atol=1e-6)
    assert _indices(out.frames) == list(range(6))
    # At 4 fps the frame on screen at 0, .25, .5, .75, 1.0, 1.25 s (none past the last frame).
    sel = decode_all(path, geometry=NATIVE32, fps=4)
    assert _indices(sel.frames) == [0, 2, 3, 4, 4, 4]
    np.testing.assert_allclose(sel.timestamps, [0.0, 0.15, 0.5, 0.52, 0.52, 0.52], atol=1e-6)


def test_webm_without_frame_count_in_header(tmp_path: Path) -> None:
    path = make_webm_video(tmp_path / "clip.webm", pattern_frames(30, 32, 32), 30)
    info = probe(path)
    assert info.num_frames_header == 0 and info.codec == "vp9"  # header has no frame count
    out = decode_all(path, geometry=NATIVE32)
    assert _indices(out.frames) == list(range(30)) and info.estimate_frames() == 30
    np.testing.assert_allclose(out.timestamps, np.round(np.arange(30) * 1000 / 30) / 1000, atol=1e-9)
    # Millisecond-rounded pts still land on the 10 fps grid.
    assert _indices(decode_all(path, geometry=NATIVE32, fps=10).frames) == list(range(0, 30, 3))


def test_trimmed_segment_keeps_source_timeline(h264_clip: Clip) -> None:
    out = decode_all(h264_clip.path, geometry=Geometry(size=64, mode="squash"), start=1.5, end=2.5)
    assert _indices(out.frames) == list(range(45, 75))
    assert out.timestamps[0] == pytest.approx(1.5) and out.timestamps[-1] < 2.5
    np.testing.assert_allclose(out.timestamps, np.arange(45, 75) / 30, atol=1e-6)
    sub = decode_all(h264_clip.path, geometry=Geometry(size=64, mode="squash"), fps=10, start=1.5, end=2.5)
    assert _indices(sub.frames) == list(range(45, 75, 3))
    assert np.all((sub.timestamps >= 1.5) & (sub.timestamps < 2.5))


def test_start_seeks_instead_of_decoding_from_the_beginning(h264_clip: Clip) -> None:
    with D.opened_video(h264_clip.path) as c:
        stream = D.video_stream(c)
        tl = D._Timeline(stream)
        first = next(D._decode_from(c, stream, 1.5, tl))
        first_t = tl.seconds(first)
    # Keyframes every 12 frames (0.4 s): the decode starts at the one at 1.2 s, not at 0.
    assert 0.0 < first_t <= 1.5
    assert first_t == pytest.approx(1.2)


def test_memory_is_bounded_even_for_a_long_gap(tmp_path: Path) -> None:
    # Two frames 1000 s apart at fps=10: 10001 outputs (120 MB at 64x64) must stream in chunks.
    path = make_vfr_video(tmp_path / "gap.mp4", [0.0, 1000.0], 32, 32)
    tracemalloc.start()
    try:
        count, last_index, last_t = 0, -1, -1.0
        for chunk in iter_frames(path, geometry=Geometry(size=64), fps=10, chunk_size=16):
            assert len(chunk.frames) <= 16
            count += len(chunk.frames)
            last_index, last_t = frame_index(chunk.frames[-1]), float(chunk.timestamps[-1])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 10001 and last_index == 1 and last_t == pytest.approx(1000.0)
    assert peak < 8 * 2**20  # a few chunks, not the 120 MB of the whole output


def test_chunks_are_bounded_and_concatenate(lossless_clip: Clip) -> None:
    chunks = list(iter_frames(lossless_clip.path, geometry=NATIVE32, chunk_size=7))
    assert [len(c.frames) for c in chunks] == [7, 7, 7, 7, 2]
    assert all(len(c.timestamps) == len(c.frames) for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks]), lossless_clip.frames)
    # Threading settings do not change the output.
    one = decode_all(lossless_clip.path, geometry=NATIVE32, threads=1)
    np.testing.assert_array_equal(one.frames, lossless_clip.frames)


# ------------------------------------------------------------------ geometry


def test_geometry_functions_and_validation() -> None:
    assert D.GEOMETRIES.get("short_side_crop")(1280, 720, 224) == (398, 224, (87, 0, 311, 224))
    assert D.GEOMETRIES.get("short_side_crop")(360, 640, 224) == (224, 398, (0, 87, 224, 311))
    assert D.GEOMETRIES.get("squash")(1280, 720, 224) == (224, 224, (0, 0, 224, 224))
    assert Geometry(size=112, interpolation="area").to_dict() == {
        "size": 112, "mode": "short_side_crop", "interpolation": "area", "display": True}
    with pytest.raises(D.GeometryError, match="squash"):
        Geometry(mode="letterbox")
    with pytest.raises(D.GeometryError, match="bicubic"):
        Geometry(interpolation="nearest-ish")


def _banded(T: int, H: int, W: int, vertical: bool = False) -> np.ndarray:
    """Frames with red / green / blue bands: outer quarters red and blue, middle half green."""
    f = np.zeros((T, H, W, 3), dtype=np.uint8)
    n = H if vertical else W
    q = n // 4
    sl = (lambda a, b: (slice(None), slice(a, b), slice(None))) if vertical else \
        (lambda a, b: (slice(None), slice(None), slice(a, b)))
    f[sl(0, q) + (0,)] = 255
    f[sl(q, n - q) + (1,)] = 255
    f[sl(n - q, n) + (2,)] = 255
    return f


@pytest.mark.parametrize("vertical", [False, True])
def test_centre_crop_keeps_the_middle(tmp_path: Path, vertical: bool) -> None:
    H, W = (64, 32) if vertical else (32, 64)
    path = make_lossless_video(tmp_path / "bands.mp4", _banded(3, H, W, vertical), 10)
    # Short side already 32: no scaling, the crop is exactly the green middle half.
    out = decode_all(path, geometry=Geometry(size=32))
    assert out.frames.shape == (3, 32, 32, 3)
    assert np.all(out.frames[..., 1] == 255) and np.all(out.frames[..., [0, 2]] == 0)
    # Downscaled x0.5 then cropped: still green (away from the blurred band edges).
    small = decode_all(path, geometry=Geometry(size=16, interpolation="bicubic")).frames
    assert small.shape == (3, 16, 16, 3)
    inner = small[:, 2:-2, :] if vertical else small[:, :, 2:-2]
    assert inner[..., 1].min() > 240 and inner[..., [0, 2]].max() < 15
    # Squash keeps everything: red and blue bands survive at the edges.
    sq = decode_all(path, geometry=Geometry(size=16, mode="squash")).frames
    first, last = (sq[:, 1, 8], sq[:, -2, 8]) if vertical else (sq[:, 8, 1], sq[:, 8, -2])
    assert np.all(first[:, 0] > 240) and np.all(last[:, 2] > 240)


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_display_rotation_is_applied(tmp_path: Path, rotation: int) -> None:
    """A phone video: landscape coded pixels plus a display matrix. Frames come out as a
    player shows them (rotated counter-clockwise by the matrix's angle), and the geometry
    applies to the shown picture: short side, centre crop of the *portrait* picture."""
    coded = _banded(3, 32, 64, vertical=False)  # 32 high, 64 wide: red | green | blue columns
    path = make_lossless_video(tmp_path / "phone.mp4", coded, 10, rotation=rotation)
    raw = decode_all(path, geometry=Geometry(size=32, mode="squash", display=False)).frames
    shown = decode_all(path, geometry=Geometry(size=32, mode="squash")).frames
    np.testing.assert_array_equal(shown, np.rot90(raw, k=rotation // 90, axes=(1, 2)))
    if rotation == 180:
        return
    # the shown picture is 32 wide and 64 high, its bands are rows: the crop is the green middle
    crop = decode_all(path, geometry=Geometry(size=32)).frames
    assert np.all(crop[..., 1] == 255) and np.all(crop[..., [0, 2]] == 0)
    top = decode_all(path, geometry=Geometry(size=16, mode="squash")).frames[:, 1, 8]
    assert np.all(top[:, 0 if rotation == -90 else 2] > 240)  # -90 = clockwise: red (left) goes on top


def test_sample_aspect_ratio_is_applied(tmp_path: Path) -> None:
    """Anamorphic video: 32x64 coded pixels twice as wide as high are shown 64x64, so the
    short-side crop keeps the whole picture (a square), as squash of the coded picture does."""
    coded = _banded(3, 64, 32, vertical=True)  # 64 high, 32 wide: red / green / blue rows
    path = make_lossless_video(tmp_path / "anamorphic.mp4", coded, 10, sample_aspect_ratio=Fraction(2, 1))
    shown = decode_all(path, geometry=Geometry(size=32)).frames
    as_coded = decode_all(path, geometry=Geometry(size=32, display=False)).frames
    squash = decode_all(path, geometry=Geometry(size=32, mode="squash", display=False)).frames
    np.testing.assert_array_equal(shown, squash)
    assert np.all(shown[:, 1, 16, 0] > 240) and np.all(shown[:, -2, 16, 2] > 240)  # all 3 bands kept
    assert np.all(as_coded[..., 1] == 255) and np.all(as_coded[..., [0, 2]] == 0)  # coded: crop = green only


# ------------------------------------------------------------------ probe


def test_probe_reads_headers_and_estimates(lossless_clip: Clip, h264_clip: Clip) -> None:
    p = probe(lossless_clip.path)
    assert (p.width, p.height, p.codec, p.num_frames_header) == (32, 32, "h264", 30)
    assert p.duration == pytest.approx(1.0) and p.fps == pytest.approx(30.0)
    cases = ({}, {"fps": 10}, {"fps": 7}, {"fps": 60}, {"start": 0.5, "end": 0.8}, {"fps": 4, "start": 0.3})
    for kwargs in cases:
        decoded = decode_all(lossless_clip.path, geometry=NATIVE32, **kwargs)
        assert p.estimate_frames(**kwargs) == len(decoded.frames), kwargs
    q = probe(h264_clip.path)
    assert q.estimate_frames(fps=10, start=1.5, end=2.5) == 10
    assert D.VideoProbe(None, None, 8, 8, "vp9", 0).estimate_frames() == 0


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "maker, stage, words",
    [
        (make_non_video, "open", "cannot open"),
        (make_audio_only, "open", "audio (aac)"),
        (make_image_as_video, "open", "still image (PNG"),
        (make_zero_frame_video, "empty", "no frames"),
    ],
)
def test_bad_files_raise_with_stage(tmp_path: Path, maker, stage: str, words: str) -> None:
    path = maker(tmp_path / "bad.mp4")
    with pytest.raises(DecodeError) as info:
        decode_all(path, geometry=NATIVE32)
    assert info.value.stage == stage and words in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file_and_probe_errors(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="not found") as info:
        probe(tmp_path / "nope.mp4")
    assert info.value.stage == "open"
    with pytest.raises(DecodeError) as info:
        probe(make_audio_only(tmp_path / "a.mp4"))
    assert info.value.stage == "open"


def test_truncated_file_fails_in_decode_after_partial_chunks(tmp_path: Path) -> None:
    path = make_truncated_video(tmp_path / "trunc.mp4")
    got = 0
    with pytest.raises(DecodeError) as info:
        for chunk in iter_frames(path, geometry=NATIVE32, chunk_size=4):
            got += len(chunk.frames)
    assert info.value.stage == "decode" and "truncated" in str(info.value)
    assert 0 < got < 48  # streamed chunks came before the error: the consumer discards them


def test_too_short_and_empty_segment(lossless_clip: Clip) -> None:
    got = []
    with pytest.raises(DecodeError) as info:
        for chunk in iter_frames(lossless_clip.path, geometry=NATIVE32, min_frames=31, chunk_size=4):
            got.append(chunk)
    assert info.value.stage == "too_short" and "30 frames" in str(info.value)
    assert got == []  # nothing is yielded before min_frames frames exist
    assert len(decode_all(lossless_clip.path, geometry=NATIVE32, min_frames=30, chunk_size=4).frames) == 30
    with pytest.raises(DecodeError) as info:
        decode_all(lossless_clip.path, geometry=NATIVE32, start=5.0, end=6.0)
    assert info.value.stage == "empty" and "segment" in str(info.value)
    with pytest.raises(ValueError):
        decode_all(lossless_clip.path, geometry=NATIVE32, start=2.0, end=1.0)


def test_decode_error_pickles() -> None:
    err = pickle.loads(pickle.dumps(DecodeError("decode", "/x.mp4", "boom")))
    assert (err.stage, err.path, err.reason) == ("decode", "/x.mp4", "boom")
    assert "re-encode" in str(err)


# ------------------------------------------------------------------ fsspec and cleanup


def _tar_with(tmp_path: Path, clip: Path) -> Path:
    tar = tmp_path / "shard.tar"
    other = make_non_video(tmp_path / "readme.txt")
    with tarfile.open(tar, "w") as tf:
        tf.add(other, arcname="000.txt")
        tf.add(clip, arcname="000.mp4")
    return tar


def test_tar_member_via_fsspec_decodes_same_frames(tmp_path: Path, h264_clip: Clip) -> None:
    tar = _tar_with(tmp_path, h264_clip.path)
    url = f"tar://000.mp4::{tar}"
    geo = Geometry(size=48)
    for kwargs in ({}, {"fps": 10, "start": 1.0, "end": 2.0}):
        a = decode_all(h264_clip.path, geometry=geo, **kwargs)
        b = decode_all(url, geometry=geo, **kwargs)
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.timestamps, b.timestamps)
    assert probe(url).num_frames_header == 90
    with pytest.raises(DecodeError) as info:
        probe(f"tar://000.txt::{tar}")
    assert info.value.stage == "open"


def test_containers_are_closed(tmp_path: Path, lossless_clip: Clip) -> None:
    tar = _tar_with(tmp_path, lossless_clip.path)
    trunc = make_truncated_video(tmp_path / "trunc.mp4")
    gc.collect()  # so no unrelated file is closed by the collector while we count
    before = _open_fds()
    for src in (lossless_clip.path, f"tar://000.mp4::{tar}"):
        gen = iter_frames(src, geometry=NATIVE32, chunk_size=4)
        next(gen)
        assert _open_fds() > before  # the video is open while the generator is suspended
        gen.close()  # consumer stops early
        assert _open_fds() == before
        with D.opened_video(src):
            pass
        assert _open_fds() == before
    with pytest.raises(DecodeError):
        decode_all(trunc, geometry=NATIVE32)
    with pytest.raises(DecodeError):
        decode_all(f"tar://000.txt::{tar}", geometry=NATIVE32)
    assert _open_fds() == before
    lossless_clip.path.unlink()  # nothing holds it


# ------------------------------------------------------------------ real clips


def test_real_clip_at_2_fps(shared_media: Path) -> None:
    clips = sorted(shared_media.glob("*.mp4"), key=lambda p: p.stat().st_size)
    path = clips[0]
    info = probe(path)
    out = decode_all(path, geometry=Geometry(size=64), fps=2, end=6.0)
    assert out.frames.shape[1:] == (64, 64, 3)
    assert len(out.frames) == info.estimate_frames(fps=2, end=6.0)
    steps = np.diff(out.timestamps)
    assert np.all(steps > 0)
    assert np.all(np.abs(steps - 0.5) <= 1.0 / info.fps + 1e-6)
    seg = decode_all(path, geometry=Geometry(size=64), fps=2, start=2.0, end=4.0)
    assert len(seg.frames) == 4 and np.all((seg.timestamps >= 2.0) & (seg.timestamps < 4.0))
    # The segment's frames are the same pictures as in the full decode at the same times.
    full = {round(t, 4): f for t, f in zip(out.timestamps, out.frames)}
    for t, f in zip(seg.timestamps, seg.frames):
        np.testing.assert_array_equal(f, full[round(t, 4)])
