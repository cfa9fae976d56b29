"""The demo's plug-in shape: one module per section (AdViSe, Co-Settle, dense, long-form), each
registered in :data:`SECTIONS` and run in registration order by :func:`freezeframe.demo.run_demo`.

A section writes only under ``ctx.section_dir(name)`` (and may read another section's folder
when it builds on it: e.g. dense evaluation of a trained projection), skips work whose output is
already complete (a rerun is cheap), and returns its part of ``report.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rich.console import Console

from pipeline.registry import Registry


@dataclass(frozen=True)
class DemoContext:
    out: Path  # the demo's root folder (report.md lives here)
    quick: bool  # the smoke-test size (``make demo ARGS=--quick``)
    console: Console

    def section_dir(self, name: str) -> Path:
        d = self.out / name
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclass
class SectionResult:
    """One section's part of the report.

    ``markdown`` is the body under the section's ``## title`` heading; image links in it are
    relative to ``ctx.out``. ``claim`` is the section's stated claim and whether it held
    (``None``: the section states none); ``seconds`` the wall time of its steps.
    """

    title: str
    markdown: str
    seconds: dict[str, float] = field(default_factory=dict)
    claim: tuple[str, bool] | None = None


DemoSection = Callable[[DemoContext], SectionResult]

#: the demo's sections, run in registration order (the import order in ``freezeframe/demo/__init__.py``)
SECTIONS: Registry[DemoSection] = Registry("demo section")


def section_order() -> list[str]:
    """Section names in the order they run (registration order, not alphabetical)."""
    return list(SECTIONS._items)
