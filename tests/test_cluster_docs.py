"""The README's cluster commands are copy-pasteable: every flag they give ``freezeframe
extract``/``verify`` and ``torchrun`` exists, and every ``--dataset`` they name has a config."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]


def _section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("## Extraction on a cluster")[1].split("\n## ")[0]


def _commands(block: str, program: str) -> list[str]:
    """The ``program ...`` commands of shell code blocks (backslash continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line[line.index(program):] for line in joined.splitlines() if program in line and "#SBATCH" not in line]


def _help(args: list[str]) -> str:
    from freezeframe.cli import app

    r = CliRunner().invoke(app, [*args, "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    return r.stdout


def test_readme_cluster_commands_use_existing_flags() -> None:
    code = "\n".join(re.findall(r"```bash\n(.*?)```", _section(), re.S))
    seen = 0
    for sub in ("extract", "verify"):
        flags_known = set(re.findall(r"--[a-z][a-z0-9-]*", _help([sub])))
        for cmd in _commands(code, f"freezeframe {sub}") + _commands(code, f"freezeframe) {sub}"):
            seen += 1
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cmd):
                assert flag in flags_known, (sub, flag, cmd)
            for name in re.findall(r"--dataset (\S+)", cmd):
                assert (REPO / "manifests" / "configs" / f"{name}.toml").exists(), name
    assert seen >= 3  # srun extract, verify, torchrun extract
    torchrun_help = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--help"], capture_output=True,
                                   text=True).stdout
    (cmd,) = [c.split("$(which")[0] for c in _commands(code, "torchrun ")]
    for flag in re.findall(r"--[a-z][a-z0-9-]*", cmd):
        assert flag in torchrun_help, flag
