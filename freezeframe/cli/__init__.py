"""The ``freezeframe`` command line: the root app, its ``--debug`` option and ``main``.

Each command group lives in its own module (``freezeframe/cli/<group>.py``, a typer app) and
is imported only when one of its commands runs or ``--help`` lists them: ``freezeframe`` is
also the main module of every spawned decode worker, so its import must stay light (the
training commands import torch through their configs).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from freezeframe.cli.common import AppGroup, new_app
from pipeline.paths import DATA_ROOT_ENV

# command -> module whose typer app holds it, in the order of the root help
COMMANDS: dict[str, str] = {
    "manifest": "freezeframe.cli.manifest",
    "synth": "freezeframe.cli.data",
    "weights": "freezeframe.cli.data",
    "plan": "freezeframe.cli.extract",
    "extract": "freezeframe.cli.extract",
    "status": "freezeframe.cli.store",
    "verify": "freezeframe.cli.store",
    "stats": "freezeframe.cli.train",
    "pretrain": "freezeframe.cli.train",
    "finetune": "freezeframe.cli.train",
    "evaluate": "freezeframe.cli.train",
    "represent": "freezeframe.cli.train",
    "project": "freezeframe.cli.train",
    "report": "freezeframe.cli.train",
    "sweep": "freezeframe.cli.train",
    "synth-longform": "freezeframe.cli.longform",
    "pretext": "freezeframe.cli.longform",
    "pretext-online": "freezeframe.cli.longform",
    "longform-experiment": "freezeframe.cli.longform",
    "demo": "freezeframe.cli.demo",
    "synth-davis": "freezeframe.cli.dense",
    "dense-extract": "freezeframe.cli.dense",
    "propagate": "freezeframe.cli.dense",
    "davis-eval": "freezeframe.cli.dense",
    "jhmdb-eval": "freezeframe.cli.dense",
    "vip-eval": "freezeframe.cli.dense",
}
# commands that are a whole module's app (a group of subcommands), not one command in it
GROUPS = {"manifest"}


class RootGroup(AppGroup):
    """The root group: commands of :data:`COMMANDS`, each module imported on first use."""

    _loaded: dict[str, Any] = {}

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        if module not in self._loaded:
            self._loaded[module] = typer.main.get_command(importlib.import_module(module).app)
        cmd = self._loaded[module]
        if cmd_name in GROUPS:
            cmd.name = cmd_name
            return cmd
        return cmd.get_command(ctx, cmd_name) if isinstance(cmd, TyperGroup) else cmd


app = new_app(
    "Video SSL on cached features of frozen image models. Stage 1: manifest, synth, weights, plan, "
    "extract, status, verify. Stage 2: stats, pretrain, finetune, evaluate, represent, project, report. Long-form "
    "pre-training: synth-longform, pretext, pretext-online, longform-experiment. Both: demo. "
    "Dense evaluation: synth-davis, dense-extract, propagate, davis-eval, jhmdb-eval, vip-eval. "
    "Options left out take their value from --dataset / --config files, else the default shown "
    "in parentheses (the config dataclass's). Errors a user can fix are printed as one line "
    "'error: ...' with exit status 2.",
    name="freezeframe",
    cls=RootGroup,
)


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error "
                               "(also: environment variable FREEZEFRAME_DEBUG=1)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Where the relative paths of the shipped "
                                             "dataset configs point (stores/, data/, runs/); also: environment "
                                             "variable FREEZEFRAME_DATA_ROOT; default: the project root.",
                                             show_default=False),
) -> None:
    """--debug is read where errors are caught (freezeframe.cli.common.AppGroup); --data-root is
    handed to every command (and its worker processes) through the environment (pipeline.paths)."""
    if data_root is not None:
        os.environ[DATA_ROOT_ENV] = str(data_root.expanduser().resolve())


def main() -> None:
    """Entry point of the ``freezeframe`` console script."""
    app(prog_name="freezeframe")


if __name__ == "__main__":
    main()
