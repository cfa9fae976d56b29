"""The ``freezeframe`` application layer (freezeframe/cli): a user's mistakes end as one line
``error: <message>`` with exit status 2 (a traceback only with ``--debug`` or
``FREEZEFRAME_DEBUG=1``), help text that keeps square brackets and shows defaults, and a
library that never imports the application."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from freezeframe.cli import COMMANDS, app
from pipeline.errors import ConfigError, ManifestError, StoreError
from pipeline.manifest import ManifestRow, write_manifest
from pipeline.registry import RegistryError
from tests.stores import write_synthetic_store
from tests.videos import make_h264_video, pattern_frames

REPO = Path(__file__).resolve().parent.parent
FREEZEFRAME = str(Path(sys.executable).parent / "freezeframe")
FAST = ["--random-weights", "--image-size", "64", "--workers", "1", "--device", "cpu", "--no-progress"]


def invoke(args: list[str], **kwargs) -> Result:
    return CliRunner().invoke(app, args, **kwargs)


def one_error_line(r: Result) -> str:
    """The message of a clean user error: exit 2, a single ``error:`` line on stderr, no traceback."""
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception  # handled, not crashed
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    return lines[0][len("error: "):]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid one-video manifest (a real 8-frame H.264 file)."""
    d = tmp_path_factory.mktemp("app")
    video = make_h264_video(d / "v.mp4", pattern_frames(8, 32, 32), fps=8)
    return write_manifest([ManifestRow(video_id="v", path=str(video), split="train", label=0)], d / "m.jsonl")


# --------------------------------------------------------------------------------------
# user mistakes: one line, exit 2, nothing created
# --------------------------------------------------------------------------------------
def test_missing_manifest(tmp_path: Path) -> None:
    msg = one_error_line(invoke(["extract", "--manifest", str(tmp_path / "missing.jsonl"),
                                 "--store", str(tmp_path / "s.zarr"), *FAST]))
    assert "missing.jsonl does not exist" in msg and "freezeframe manifest" in msg
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--backbone", "clip-b16"], "unknown backbone 'clip-b16'; choose one of: clip-vit-b16"),
    (["--dtype", "bf16"], "unknown storage dtype 'bf16'; choose one of: float16, float32, int8"),
    (["--set", "fps=four"], "fps: expected float or none, got 'four'"),
])
def test_bad_extract_values(manifest: Path, tmp_path: Path, flags: list[str], expected: str) -> None:
    store = tmp_path / "s.zarr"
    msg = one_error_line(invoke(["extract", "--manifest", str(manifest), "--store", str(store), *FAST, *flags]))
    assert expected in msg
    assert not store.exists()


def test_bad_extract_values_raise_the_library_errors_with_debug(manifest: Path, tmp_path: Path) -> None:
    """The line above is the message of the library's own error (a ConfigError; a value of the
    wrong type is reported once, not checked again by ExtractConfig's validation)."""
    base = ["--debug", "extract", "--manifest", str(manifest), "--store", str(tmp_path / "s.zarr"), *FAST]
    r = invoke([*base, "--backbone", "clip-b16"])
    assert isinstance(r.exception, ConfigError) and "unknown backbone 'clip-b16'" in str(r.exception)
    r = invoke([*base, "--set", "fps=four"])
    assert str(r.exception) == "invalid config: fps: expected float or none, got 'four'"


def test_unknown_model_arch_in_training(tmp_path: Path) -> None:
    """An unknown name in a registry of stage 2 (MODELS, through --arch): one line, nothing written."""
    store = write_synthetic_store(tmp_path / "s.zarr").path
    args = ["pretrain", "--store", str(store), "--run-dir", str(tmp_path / "run"), "--arch", "transformer",
            "--set", "model.tmm.in_channels=16", "--set", "data.workers=0", "--set", "optim.batch_size=2"]
    msg = one_error_line(invoke(args))
    assert msg == "unknown model.arch 'transformer'; choose one of: avgpool, tmm"
    assert not (tmp_path / "run").exists()


def test_registry_error_is_one_line_unquoted() -> None:
    """A RegistryError (a KeyError too, whose str() would quote the message) from a real registry,
    raised in any command of an app made by ``new_app``."""
    from extract.backbones import BACKBONES
    from freezeframe.cli.common import new_app

    tool = new_app("test app")

    @tool.command()
    def look(name: str) -> None:
        BACKBONES.get(name)

    @tool.command()
    def other() -> None:
        pass

    msg = one_error_line(CliRunner().invoke(tool, ["look", "clip-b16"]))
    assert msg == f"unknown backbone 'clip-b16'; choose one of: {', '.join(BACKBONES.names())}"
    assert isinstance(CliRunner().invoke(tool, ["look", "clip-b16"], env={"FREEZEFRAME_DEBUG": "1"}).exception,
                      RegistryError)


def test_missing_store_and_run_dir(tmp_path: Path) -> None:
    msg = one_error_line(invoke(["finetune", "--store", str(tmp_path / "missing.zarr"),
                                 "--run-dir", str(tmp_path / "run")]))
    assert "missing.zarr is not a freezeframe store" in msg and "freezeframe extract" in msg
    assert not (tmp_path / "run").exists()
    msg = one_error_line(invoke(["status", str(tmp_path / "nowhere.zarr")]))
    assert "nowhere.zarr is not a freezeframe store" in msg
    msg = one_error_line(invoke(["evaluate", str(tmp_path / "not-a-run")]))
    assert "not-a-run" in msg


def test_unknown_dataset_config() -> None:
    msg = one_error_line(invoke(["pretrain", "--dataset", "nope"]))
    assert "nope" in msg and "synth-motion" in msg  # names the known ones


def test_manifest_problems_keep_their_list(tmp_path: Path) -> None:
    """A ManifestError prints its summary on the error line and every problem below it."""
    r = invoke(["manifest", "ucf101", "--root", str(tmp_path), "--annotations", str(tmp_path / "ann"),
                "--out", str(tmp_path / "m.jsonl")])
    assert r.exit_code == 2 and r.stderr.startswith("error: ucf101 manifest") and "Traceback" not in r.output
    assert "  - missing UCF101 class index" in r.stderr
    assert not (tmp_path / "m.jsonl").exists()


def test_an_unusable_output_path_is_one_line(tmp_path: Path) -> None:
    """An OSError about a path the user gave (here: a folder under a regular file; root ignores
    permission bits, so those cannot be tested here) is a user error, not a traceback."""
    (tmp_path / "file").write_text("x")
    msg = one_error_line(invoke(["synth", str(tmp_path / "file" / "synth")]))
    assert str(tmp_path / "file") in msg and "check the path" in msg
    r = invoke(["--debug", "synth", str(tmp_path / "file" / "synth")])
    assert isinstance(r.exception, OSError)


def test_debug_shows_the_error_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = invoke(["--debug", "status", str(tmp_path / "nowhere.zarr")])
    assert isinstance(r.exception, StoreError) and "error:" not in r.stderr
    monkeypatch.setenv("FREEZEFRAME_DEBUG", "1")
    r = invoke(["extract", "--manifest", str(tmp_path / "missing.jsonl"), "--store", str(tmp_path / "s.zarr")])
    assert isinstance(r.exception, ManifestError)
    monkeypatch.setenv("FREEZEFRAME_DEBUG", "0")
    one_error_line(invoke(["status", str(tmp_path / "nowhere.zarr")]))


def test_the_installed_script_prints_one_line(tmp_path: Path) -> None:
    """As a user runs it: the console script, in a fresh process."""
    cmd = [FREEZEFRAME, "extract", "--manifest", "missing.jsonl", "--store", "s.zarr"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == ["error: manifest missing.jsonl does not exist; build one with "
                                     "`freezeframe manifest FORMAT ... --out missing.jsonl`"]
    assert r.stdout == "" and not (tmp_path / "s.zarr").exists()
    r = subprocess.run([FREEZEFRAME, "--debug", *cmd[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ManifestError" in r.stderr


# --------------------------------------------------------------------------------------
# help
# --------------------------------------------------------------------------------------
def test_extract_help_keeps_brackets_shows_defaults_and_flags() -> None:
    from extract.config import ExtractConfig

    r = invoke(["extract", "--help"])
    assert r.exit_code == 0, r.output
    flat = " ".join(r.stdout.split())  # wrapping undone
    assert "--config <path> TOML config file ([extract] table or top level)." in flat  # not eaten as markup
    dtype_help = "float16 | float32 | int8 (int8: per-token scale)."
    assert f"--dtype <str> {dtype_help} [default: ({ExtractConfig().dtype})]" in flat
    assert f"--batch-size <int> Frames per backbone forward. [default: ({ExtractConfig().batch_size})]" in flat
    for flag, text in (("--random-weights", "Random init"), ("--retry-failed", "Retry only"), ("--no-progress", "No")):
        assert f"{flag} {text}" in flat  # a flag: no value type between the flag and its help
    assert "bool" not in flat.lower()


def test_every_command_has_help_with_its_options() -> None:
    r = invoke(["--help"])
    assert r.exit_code == 0 and "--debug" in r.stdout
    assert [ln.split()[0] for ln in r.stdout.split("Commands:")[1].splitlines() if ln.strip()] == list(COMMANDS)
    r = invoke(["status", "--help"])
    assert "[default: 0.0]" in r.stdout  # --watch
    r = invoke(["stats", "--help"])
    assert "[default: 1280]" in r.stdout  # --in-channels


# --------------------------------------------------------------------------------------
# layering
# --------------------------------------------------------------------------------------
def test_the_library_never_imports_the_application() -> None:
    offenders = []
    for pkg in ("pipeline", "manifests", "synth", "extract", "train"):
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == "freezeframe"]
    assert offenders == []
