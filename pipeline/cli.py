"""The ``freezeframe`` command line: one typer app, commands registered by each stage."""
from __future__ import annotations

import sys

import typer
from rich.console import Console

from pipeline.errors import FreezeframeError

app = typer.Typer(
    name="freezeframe",
    help="Video SSL on cached features of frozen image models. Stage 1: manifest, synth, weights, "
    "plan, extract, status, verify. Stage 2: stats, pretrain, finetune, evaluate, report, demo. "
    "Dense evaluation: synth-davis, dense-extract, propagate, davis-eval, jhmdb-eval, vip-eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def flag_overrides(**flags: object) -> list[str]:
    """Turn CLI flags that were given (not None) into dotted ``key=value`` overrides."""
    out = []
    for key, value in flags.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{key}={text}")
    return out


def _register() -> None:
    from extract.cli import register as register_extract
    from manifests.cli import app as manifest_app
    from train.cli import register as register_train
    from train.dense.cli import register as register_dense

    app.add_typer(manifest_app, name="manifest", help="Build a JSONL manifest from a dataset's official annotation files.")
    register_extract(app)
    register_train(app)
    register_dense(app)


def main() -> None:
    _register()
    try:
        app()
    except FreezeframeError as e:
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(2)


if __name__ == "__main__":
    main()
