"""``freezeframe demo``: the whole method on the embedded benchmark (:mod:`freezeframe.demo`)."""
from __future__ import annotations

from pathlib import Path

import typer

from freezeframe.cli.common import console, new_app
from freezeframe.demo import run_demo

app = new_app("The whole method end to end on the embedded synthetic benchmark.")


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("demo_out"), "--out", help="Output folder (reused: finished steps are skipped)."),
    quick: bool = typer.Option(False, "--quick", help="A much smaller run (smoke test, ~2 min)."),
) -> None:
    """The whole method on the embedded synthetic benchmark, with a Markdown report and plots."""
    run_demo(out_dir, quick=quick, console=console)
