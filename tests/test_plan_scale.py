"""``freezeframe plan`` at dataset scale without the videos (issue 12): a ``--videos N
--seconds S`` estimate, manifest segments of videos not on this machine, bytes per dtype for
the real CLIP grids, and device-hours from a given or measured frames/s."""
from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from extract.config import ExtractConfig
from extract.plan import bytes_per_frame, device_hours, estimate_plan, make_plan, measured_rate
from pipeline.manifest import ManifestRow, write_manifest
from tests.videos import make_h264_video, pattern_frames


def invoke(args: list[str]):
    from freezeframe.cli import app

    return CliRunner().invoke(app, args)


def cell(text: str, label: str) -> str:
    m = re.search("[│┃] " + re.escape(label) + r"[^│┃]*[│┃]\s*([^│┃]+?)\s*[│┃]", text)
    assert m, (label, text)
    return m.group(1)


def test_kinetics400_estimate_for_both_clip_backbones() -> None:
    for backbone, grid in (("clip-vit-b16", (14, 14, 768)), ("clip-vit-l14", (16, 16, 1024))):
        r = invoke(["plan", "--dataset", "kinetics400", "--backbone", backbone, "--videos", "240000",
                    "--seconds", "10", "--frames-per-s", "1000", "--gpus", "1", "--gpus", "64"])
        assert r.exit_code == 0, r.output
        h, w, c = grid
        frames = 240_000 * 10 * 30  # every frame at the default 30 fps
        assert cell(r.stdout, "frames (estimate at 30 fps)") == f"{frames:,}"
        assert cell(r.stdout, "feature grid") == str(grid)
        assert cell(r.stdout, "store shards") == f"{240_000 // 64:,}"
        f16 = h * w * c * 2 + 8  # float16 tokens + a float64 timestamp
        assert cell(r.stdout, "bytes per frame (float16") == f"{f16:,}"
        i8 = bytes_per_frame(grid, "int8")
        assert i8 == h * w * c + h * w * 4 + 8  # int8 tokens + a float32 scale per token + timestamp
        assert cell(r.stdout, "store size as int8") == f"{frames * i8 / 1024 ** 4:.1f} TiB ({frames * i8 / 1e12:.2f} TB)"
        assert cell(r.stdout, "hours on 1 device") == f"{frames / 1000 / 3600:,.1f}"
        assert cell(r.stdout, "hours on 64 device") == f"{frames / 1000 / 64 / 3600:,.1f}"


def test_estimate_with_pooling_and_a_lower_frame_rate() -> None:
    cfg = ExtractConfig(backbone="clip-vit-b16", fps=10.0, spatial_pool=7, dtype="int8", videos_per_shard=100)
    p = estimate_plan(cfg, (7, 7, 768), videos=250, seconds=10.0)
    assert (p.frames, p.shards, p.seconds_of_video) == (25_000, 3, 2500.0)
    assert p.bytes == 25_000 * (49 * 768 + 49 * 4 + 8) and p.bytes_as("float16") == 25_000 * (49 * 768 * 2 + 8)
    assert device_hours(36_000, 10.0, 1) == 1.0 and device_hours(36_000, 10.0, 4) == 0.25


def test_manifest_segments_count_for_videos_not_here(tmp_path: Path) -> None:
    here = make_h264_video(tmp_path / "here.mp4", pattern_frames(20, 48, 64), 10, gop=5)
    rows = [ManifestRow("here", str(here)),
            ManifestRow("away", str(tmp_path / "elsewhere" / "away.mp4"), start=2.0, end=12.0),
            ManifestRow("lost", str(tmp_path / "lost.mp4"))]  # no segment: cannot be planned
    cfg = ExtractConfig(backbone="mobilenetv2-imagenet", fps=5.0, videos_per_shard=2)
    p = make_plan(rows, cfg, (7, 7, 1280))
    assert p.from_segments == 1 and [v for v, _ in p.unreadable] == ["lost"]
    assert p.frames == 10 + 50  # 2 s of the local video at 5 fps + the 10-s segment at 5 fps
    manifest = write_manifest(rows, tmp_path / "m.jsonl")
    r = invoke(["plan", "--manifest", str(manifest), "--fps", "5", "--frames-per-s", "30"])
    assert r.exit_code == 0, r.output
    assert cell(r.stdout, "frames (estimate; 1 from manifest segments)") == "60"


def test_the_default_rate_is_the_measured_one(tmp_path: Path) -> None:
    rates = tmp_path / "bench.json"
    rates.write_text(json.dumps({"machine": "x86_64, 2 cores, no GPU", "date": "2026-12-01",
                                 "backbones": {"clip-vit-b16": {"frames_per_s": 4.5, "weights": "random"}}}))
    r = measured_rate("clip-vit-b16", rates)
    assert r is not None and r.frames_per_s == 4.5 and "measured: x86_64, 2 cores" in r.source
    assert measured_rate("clip-vit-l14", rates) is None and measured_rate("clip-vit-b16", tmp_path / "no") is None
    # the repository's own record (docs/bench-backbones.json) has both CLIP backbones
    for name in ("clip-vit-b16", "clip-vit-l14"):
        rec = measured_rate(name)
        assert rec is not None and rec.frames_per_s > 0, name
        out = invoke(["plan", "--videos", "10", "--seconds", "10", "--backbone", name]).stdout
        assert f"{rec.frames_per_s:.3g} (measured" in " ".join(out.split())


def test_plan_refuses_half_an_estimate() -> None:
    r = invoke(["plan", "--videos", "10"])
    assert r.exit_code == 2 and "needs both --videos N and --seconds S" in r.output  # one error line
