"""``make demo``: the whole product end to end on embedded synthetic benchmarks.

Each section is a plug-in module registered in :data:`~freezeframe.demo.section.SECTIONS`
(run in the import order below); every section skips work whose output is already complete,
so a rerun is cheap. ``report.md`` gathers the sections' tables, plots, claims and timings.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from rich.console import Console

from pipeline.errors import FreezeframeError
from pipeline.fileio import atomic_write_text

# section modules, in the order they run (importing registers them)
from freezeframe.demo import advise  # noqa: F401  (registers "advise")
from freezeframe.demo import cosettle  # noqa: F401  (registers "cosettle")
from freezeframe.demo import dense  # noqa: F401  (registers "dense"; uses cosettle's projection)
from freezeframe.demo import longform  # noqa: F401  (registers "longform")
from freezeframe.demo.section import SECTIONS, DemoContext, SectionResult, section_order


def run_demo(out: Path, *, quick: bool = False, console: Console | None = None,
             only: Sequence[str] | None = None) -> Path:
    """Run the demo's sections (all, or ``only`` these) into ``out``; returns ``out/report.md``."""
    con = console or Console(stderr=True)
    names = section_order()
    if only:
        unknown = [n for n in only if n not in SECTIONS]
        if unknown:
            raise FreezeframeError(f"unknown demo section(s) {unknown}; choose from {names}")
        names = [n for n in names if n in only]
    ctx = DemoContext(out=Path(out), quick=quick, console=con)
    ctx.out.mkdir(parents=True, exist_ok=True)
    results: list[tuple[str, SectionResult, float]] = []
    for name in names:
        con.rule(f"[bold]demo section: {name}")
        t0 = time.monotonic()
        results.append((name, SECTIONS.get(name)(ctx), time.monotonic() - t0))
    report = ctx.out / "report.md"
    atomic_write_text(report, render_report(results, quick))
    con.print(f"[bold green]demo done[/]: report {report}")
    return report


def render_report(results: list[tuple[str, SectionResult, float]], quick: bool) -> str:
    """The Markdown report: a summary of every section's claim, then each section, then timings."""
    lines = ["# freezeframe demo report\n"]
    if quick:
        lines.append("**Quick (smoke-test) size: the numbers below are not evidence of anything.**\n")
    claims = [(name, r.claim) for name, r, _ in results if r.claim is not None]
    if claims:
        lines.append("## Claims\n")
        lines += [f"- {name}: {'holds' if held else 'does NOT hold'}: {text}" for name, (text, held) in claims]
        lines.append("")
    for name, r, _ in results:
        lines += [f"## {r.title}\n", r.markdown, ""]
    lines.append("## Timings\n")
    for name, r, total in results:
        steps = ", ".join(f"{k} {v:.0f} s" for k, v in r.seconds.items())
        lines.append(f"- {name}: {total:.0f} s" + (f" ({steps})" if steps else ""))
    return "\n".join(lines) + "\n"


__all__ = ["run_demo", "render_report"]
