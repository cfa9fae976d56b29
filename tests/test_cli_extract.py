"""The stage-1 commands through typer (``plan``, ``extract``, ``status``, ``verify``): what they
print and their exit codes, on real videos, a random-init MobileNetV2 and a real zarr store."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import pytest
import typer
from typer.testing import CliRunner, Result

from pipeline.errors import ConfigError, ConfigMismatchError
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.store import marker_path, open_store, store_status
from tests.videos import make_h264_video, make_non_video, pattern_frames

FLAGS = ["--random-weights", "--image-size", "64", "--fps", "5", "--videos-per-shard", "2",
         "--batch-size", "8", "--workers", "1", "--device", "cpu"]


def cli_app() -> typer.Typer:
    """The ``freezeframe`` app (its commands are loaded on first use)."""
    from freezeframe.cli import app

    return app


def invoke(args: list[str]) -> Result:
    """``freezeframe --debug ARGS``: a FreezeframeError reaches ``Result.exception`` (without
    ``--debug`` it is printed as one ``error:`` line, see tests/test_cli_app.py)."""
    return CliRunner().invoke(cli_app(), ["--debug", *args])


def table_value(text: str, label: str) -> str:
    """The value cell of a rich table row whose label starts with ``label``."""
    m = re.search(re.escape(label) + r"[^│┃]*[│┃]\s*([^│┃]+?)\s*[│┃]", text)
    assert m, f"no row {label!r} in:\n{text}"
    return m.group(1)


def flatten(text: str) -> str:
    """Rich output as one line: table borders dropped, runs of whitespace (wrapping) made one space."""
    return " ".join(re.sub(r"[│┃]", " ", text).split())


class Extracted(NamedTuple):
    manifest: Path
    store: Path
    result: Result
    frames: int


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Extracted:
    """5 rows (3 good videos of 12..20 frames at 10 fps, a non-video, a missing file) extracted
    at 5 fps into 3 store shards by ``freezeframe extract`` (progress bar on, no terminal)."""
    d = tmp_path_factory.mktemp("cli")
    rows = []
    for i, n in enumerate((12, 20, 15)):
        p = make_h264_video(d / f"v{i}.mp4", pattern_frames(n, 48, 64, seed=i), 10, gop=5)
        rows.append(ManifestRow(f"v{i}", str(p), label=i))
    rows.insert(1, ManifestRow("notvideo", str(make_non_video(d / "notes.mp4"))))
    rows.append(ManifestRow("missing", str(d / "missing.mp4")))
    manifest = write_manifest(rows, d / "manifest.jsonl")
    store = d / "store"
    result = invoke(["extract", "--manifest", str(manifest), "--store", str(store), *FLAGS])
    assert result.exit_code == 0, result.output
    frames = store_status(store).frames_stored
    return Extracted(manifest, store, result, frames)


def test_extract_prints_the_summary_and_the_failure_table(extracted: Extracted) -> None:
    out = extracted.result.stdout
    assert table_value(out, "shards done now / skipped") == "3 / 0"
    assert table_value(out, "videos done now") == "3"
    assert table_value(out, "failures now") == "2"
    assert table_value(out, "store: videos stored / planned") == "3 / 5"
    assert table_value(out, "frames done now") == str(extracted.frames)
    assert "2 failed video(s) (retry with --retry-failed)" in out
    failure_rows = {m.group(1): m.group(2) for m in re.finditer(r"│ (notvideo|missing)\s*│ (\w+)\s*│", out)}
    assert failure_rows == {"notvideo": "open", "missing": "open"}
    # messages are shown whole, brackets included (not eaten as rich markup), ending with what to do
    flat = flatten(out)
    assert flat.count("[stage open]; check it is a video") == 2
    assert flat.count("fix or drop it from the manifest") == 2
    # 3 + 2 frames per second of video at 5 fps: 6 + 10 + 8
    assert extracted.frames == 24 and open_store(extracted.store).num_frames("v1") == 10


def test_progress_bar_without_a_terminal(extracted: Extracted) -> None:
    err = extracted.result.stderr
    assert "rank 0/1" in err and "5/5" in err and "failed 2" in err  # the final state, printed once
    assert "\x1b[" not in err  # no cursor movement / colour codes when not a terminal
    quiet = invoke(["extract", "--manifest", str(extracted.manifest), "--store", str(extracted.store),
                    *FLAGS, "--no-progress"])
    assert quiet.exit_code == 0, quiet.output
    assert "nothing to do" in quiet.stderr and "rank 0/1" not in quiet.stderr
    assert table_value(quiet.stdout, "shards done now / skipped") == "0 / 3"


def test_plan_is_close_to_the_real_extraction(extracted: Extracted) -> None:
    r = invoke(["plan", "--manifest", str(extracted.manifest), "--fps", "5",
                "--image-size", "64", "--videos-per-shard", "2", "--dtype", "float16"])
    assert r.exit_code == 0, r.output
    assert table_value(r.stdout, "videos") == "5"
    assert table_value(r.stdout, "store shards") == "3"
    assert table_value(r.stdout, "unreadable headers") == "2"
    planned = int(table_value(r.stdout, "frames (estimate)").replace(",", ""))
    assert abs(planned - extracted.frames) <= 3, (planned, extracted.frames)  # at most 1 per video
    assert table_value(r.stdout, "feature grid (H, W, C)") == "(2, 2, 1280)"
    per_frame = 2 * 2 * 1280 * 2 + 8  # float16 features + float64 timestamp
    assert table_value(r.stdout, "bytes per frame") == f"{per_frame:,}"
    assert table_value(r.stdout, "store size (uncompressed)") == f"{planned * per_frame / 1024:.1f} KiB"
    flat = flatten(r.stdout)
    assert "unreadable notvideo:" in flat and "unreadable missing: " in flat and "file not found" in flat
    assert flat.count("[stage open]") == 2


def test_status_and_verify_exit_codes(extracted: Extracted, tmp_path: Path) -> None:
    import shutil

    # 2 of 5 videos failed: not ok by default (any failure fails), ok when 40% is allowed
    accept = ["--max-failure-rate", "0.4"]
    r = invoke(["status", str(extracted.store), *accept])
    assert r.exit_code == 0, r.output
    assert "shards 3/3 complete (100%), 0 in progress, videos 3/5, frames 24, failed 2" in flatten(r.stdout)
    assert "failed 2 of 5 videos (40.0%): 2 x open: DecodeError" in flatten(r.stdout)
    r = invoke(["status", str(extracted.store), "--failures", "--config", *accept])
    assert r.exit_code == 0 and "notvideo" in r.stdout and '"dtype": "float16"' in r.stdout
    r = invoke(["verify", str(extracted.store), *accept])
    assert r.exit_code == 0 and "ok" in r.stdout, r.output
    assert "(2 failed video(s) within --max-failure-rate 0.4)" in flatten(r.stdout)
    for cmd in ("status", "verify"):
        for flags in ([], ["--max-failure-rate", "0.39"]):
            r = invoke([cmd, str(extracted.store), *flags])
            assert r.exit_code == 1, (cmd, flags, r.output)
            flat = flatten(r.stdout)
            assert "not ok" in flat and "2 of 5 videos failed (40.0% >" in flat, flat
            assert "most common: 2 x open: DecodeError" in flat and "--retry-failed" in flat

    broken = tmp_path / "broken"
    shutil.copytree(extracted.store, broken)
    marker_path(broken, "00001").unlink()  # as if the job writing shard 00001 had been killed
    r = invoke(["verify", str(broken)])
    assert r.exit_code == 1, r.output
    assert "shard 00001: incomplete" in r.stdout and "1 planned shard(s) not complete: [1]" in r.stdout
    assert "2 problem(s)" in r.stdout
    r = invoke(["status", str(broken), "--max-failure-rate", "1"])  # 2 of the 3 videos left failed
    assert r.exit_code == 0 and "shards 2/3 complete (67%), 1 in progress" in flatten(r.stdout)
    r = invoke(["verify", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "not a freezeframe store" in flatten(r.stdout)


def test_extract_into_a_store_made_with_other_settings_is_refused(extracted: Extracted) -> None:
    before = json.loads((extracted.store / "freezeframe.json").read_text())
    r = invoke(["extract", "--manifest", str(extracted.manifest), "--store", str(extracted.store),
                *FLAGS, "--dtype", "int8", "--no-progress"])
    assert r.exit_code != 0 and isinstance(r.exception, ConfigMismatchError)
    assert "dtype: store has 'float16', this run asks 'int8'" in str(r.exception)
    assert json.loads((extracted.store / "freezeframe.json").read_text()) == before


def test_extract_with_invalid_values_lists_them_all_and_creates_nothing(extracted: Extracted,
                                                                        tmp_path: Path) -> None:
    store = tmp_path / "new"
    r = invoke(["extract", "--manifest", str(extracted.manifest), "--store", str(store), *FLAGS,
                "--codec", "lz4", "--dtype", "bf16", "--set", "spatial_pool=0", "--no-progress"])
    assert r.exit_code != 0 and isinstance(r.exception, ConfigError)
    msg = str(r.exception)
    assert "codec: unknown codec 'lz4'" in msg and "dtype: unknown storage dtype 'bf16'" in msg
    assert "spatial_pool: must be an integer >= 1" in msg
    assert not store.exists()
