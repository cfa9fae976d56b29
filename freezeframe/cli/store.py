"""Inspect a feature store: ``status`` (progress, also during a run) and ``verify``.

Kept apart from :mod:`freezeframe.cli.extract`, whose config brings torch: these two only
read zarr and JSON."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from freezeframe.cli.common import new_app, out
from pipeline.store import FeatureStore, read_header, store_status, verify_store

app = new_app("Inspect a feature store: status, verify.")


@app.command()
def status(
    store: Path = typer.Argument(..., help="Store path."),
    watch: float = typer.Option(0.0, help="Refresh every N seconds (0: print once)."),
    failures: bool = typer.Option(False, "--failures", help="List failed videos."),
    config: bool = typer.Option(False, "--config", help="Print the store's header (config, provenance)."),
) -> None:
    """Progress of a store (also while another process is writing it)."""
    while True:
        st = store_status(store)
        writing = f" ({len(st.writing_shards)} being written now)" if st.in_progress_shards else ""
        pct = 100.0 * st.complete_shards / st.planned_shards if st.planned_shards else 0.0
        out.print(f"{escape(str(store))}: shards {st.complete_shards}/{st.planned_shards} complete ({pct:.0f}%), "
                  f"{len(st.in_progress_shards)} in progress{writing}, videos {st.videos_stored}/{st.planned_videos}, "
                  f"frames {st.frames_stored:,}, failed {st.failures}")
        if watch <= 0 or st.complete_shards >= st.planned_shards:
            break
        time.sleep(watch)
    if config:
        out.print_json(json.dumps(read_header(store)))
    if failures:
        print_failures([(f.video_id, f.stage, f.error_type, f.message) for f in FeatureStore(store).failures()])


@app.command()
def verify(
    store: Path = typer.Argument(..., help="Store path."),
    quick: bool = typer.Option(False, "--quick", help="Skip the NaN/inf scan of every value."),
) -> None:
    """Check a store against its index and markers; exit 1 on any problem."""
    problems = verify_store(store, scan_values=not quick)
    if problems:
        for p in problems:
            out.print(f"[red]problem[/] {escape(p)}")
        out.print(f"[bold red]{len(problems)} problem(s)[/] in {escape(str(store))}")
        raise typer.Exit(1)
    out.print(f"[green]ok[/]: {escape(str(store))} is complete and consistent")


def print_failures(rows: list[tuple[str, str, str, str]]) -> None:
    """A table of failed videos (video_id, stage, error type, message), messages never cut."""
    if not rows:
        return
    t = Table(title=f"{len(rows)} failed video(s) (retry with --retry-failed)")
    for col in ("video_id", "stage", "error", "message"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(*[escape(str(x)) for x in r])  # messages end with what to do: never cut them
    out.print(t)
    sys.stdout.flush()
