"""``freezeframe demo``: the whole product on the embedded benchmarks (:mod:`freezeframe.demo`)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from freezeframe.cli.common import console, new_app
from freezeframe.demo import run_demo
from freezeframe.demo.section import section_order

app = new_app("The whole product end to end on the embedded synthetic benchmarks.")


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("demo_out"), "--out", help="Output folder (reused: finished steps are skipped)."),
    quick: bool = typer.Option(False, "--quick", help="A much smaller run (smoke test, a few minutes)."),
    only: Optional[List[str]] = typer.Option(None, "--only", help=f"Run only these sections (repeatable): {', '.join(section_order())}."),
) -> None:
    """The whole product on the embedded synthetic benchmarks, with a Markdown report and plots."""
    run_demo(out_dir, quick=quick, console=console, only=only)
