"""Inspect a feature store: ``status`` (progress, also during a run) and ``verify``.

Kept apart from :mod:`freezeframe.cli.extract`, whose config brings torch: these two only
read zarr and JSON."""
from __future__ import annotations

import json
import sys
import time

import typer
from rich.markup import escape
from rich.table import Table

from freezeframe.cli.common import STORAGE_OPTION, new_app, out, storage_options
from pipeline.store import (
    FeatureStore,
    check_store,
    failure_reasons,
    failure_verdict,
    read_header,
    repair_store,
    store_fs,
    store_status,
)

app = new_app("Inspect a feature store: status, verify.")

_MAX_FAILURE_RATE = typer.Option(0.0, "--max-failure-rate", min=0.0, max=1.0, metavar="R",
                                 help="Failed videos / tried videos above which the store is not ok (exit 1). "
                                 "0: any failure fails. A store whose every video failed is never ok.")


def _failure_line(failed: int, tried: int, reasons: list[tuple[str, int]]) -> str:
    """``failed 2 of 5 videos (40.0%): 2 x open: FileNotFoundError``."""
    rate = 100.0 * failed / tried if tried else 0.0
    why = ", ".join(f"{n} x {r}" for r, n in reasons[:3]) + (", ..." if len(reasons) > 3 else "")
    return f"failed {failed} of {tried} videos ({rate:.1f}%)" + (f": {why}" if failed else "")


@app.command()
def status(
    store: str = typer.Argument(..., help="Store path or fsspec URL (s3://bucket/x.zarr)."),
    watch: float = typer.Option(0.0, help="Refresh every N seconds (0: print once)."),
    failures: bool = typer.Option(False, "--failures", help="List failed videos."),
    config: bool = typer.Option(False, "--config", help="Print the store's header (config, provenance)."),
    max_failure_rate: float = _MAX_FAILURE_RATE,
    storage_option: list[str] = STORAGE_OPTION,
) -> None:
    """Progress of a store (also while another process is writing it); exit 1 when its
    failure rate passes --max-failure-rate."""
    store_fs(store, storage_options(storage_option))  # a missing s3fs/gcsfs: one line, before any work
    while True:
        st = store_status(store)
        writing = f" ({len(st.writing_shards)} being written now)" if st.in_progress_shards else ""
        pct = 100.0 * st.complete_shards / st.planned_shards if st.planned_shards else 0.0
        out.print(f"{escape(str(store))}: shards {st.complete_shards}/{st.planned_shards} complete ({pct:.0f}%), "
                  f"{len(st.in_progress_shards)} in progress{writing}, videos {st.videos_stored}/{st.planned_videos}, "
                  f"frames {st.frames_stored:,}, failed {st.failures}"
                  + (f", {st.pea_views} PEA view(s) per frame" if st.pea_views else "")
                  + (f", {st.videos_with_crops} video(s) with {st.test_crops} test crops" if st.test_crops > 1 else ""))
        if st.failures:
            out.print(escape(_failure_line(st.failures, st.videos_stored + st.failures, st.failure_reasons)))
        if st.damaged_markers:
            out.print(f"[red]{len(st.damaged_markers)} unreadable marker(s)[/] "
                      f"({escape(', '.join(st.damaged_markers[:5]))}): run `freezeframe verify "
                      f"{escape(str(store))}` (then --repair)")
        if watch <= 0 or st.complete_shards >= st.planned_shards:
            break
        time.sleep(watch)
    if config:
        out.print_json(json.dumps(read_header(store)))
    if failures:
        print_failures([(f.video_id, f.stage, f.error_type, f.message) for f in FeatureStore(store).failures()])
    verdict = failure_verdict(st.failures, st.videos_stored, st.failure_reasons, max_failure_rate)
    if verdict:
        out.print(f"[bold red]not ok[/]: {escape(verdict)}")
        raise typer.Exit(1)


@app.command()
def verify(
    store: str = typer.Argument(..., help="Store path or fsspec URL (s3://bucket/x.zarr)."),
    quick: bool = typer.Option(False, "--quick", help="Skip what reads every byte: file SHA-256s, chunk "
                               "checksums, the NaN/inf scan."),
    repair: bool = typer.Option(False, "--repair", help="Remove the damaged shards (marker, then data) so a "
                                "rerun of the same extract command re-extracts exactly them; rewrite damaged "
                                "store metadata from its intact copy."),
    max_failure_rate: float = _MAX_FAILURE_RATE,
    storage_option: list[str] = STORAGE_OPTION,
) -> None:
    """Check a store's integrity against its header and markers, and its failed videos;
    exit 1 on any problem or when the failure rate passes --max-failure-rate."""
    store_fs(store, storage_options(storage_option))  # a missing s3fs/gcsfs: one line, before any work
    report = check_store(store, scan_values=not quick)
    for p in report.problems:
        out.print(f"[red]problem[/] {escape(str(p))}")
    for n in report.notes:
        out.print(f"[yellow]note[/] {escape(n)}")
    failed = len(report.failed)
    if failed:
        out.print(escape(_failure_line(failed, failed + report.videos_stored,
                                       failure_reasons(report.failed.values()))))
    verdict = report.failure_verdict(max_failure_rate)
    if not report.problems:
        if verdict:
            out.print(f"[bold red]not ok[/]: {escape(str(store))} is complete and consistent, but {escape(verdict)}")
            raise typer.Exit(1)
        out.print(f"[green]ok[/]: {escape(str(store))} is complete and consistent"
                  + (f" ({failed} failed video(s) within --max-failure-rate {max_failure_rate:g})" if failed else ""))
        return
    if verdict:
        out.print(f"[bold red]and[/]: {escape(verdict)}")
    out.print(f"[bold red]{len(report.problems)} problem(s)[/] in {escape(str(store))}")
    if not repair:
        for line in report.advice():
            out.print(escape(line))
        raise typer.Exit(1)
    for line in repair_store(store, report):
        out.print(f"[green]repaired[/] {escape(line)}")
    if report.damaged_shards or any(p.repair == "extract" for p in report.problems):
        retry = any(s.startswith("retry") for s in report.damaged_shards)
        out.print("now rerun the same `freezeframe extract` command" + (" (with --retry-failed for the retry "
                  "shards)" if retry else "") + ": it re-extracts exactly the removed (and any incomplete) shards")
    if report.unfixable:
        out.print(f"[bold red]{len(report.unfixable)} problem(s) --repair cannot fix[/]:")
        for p in report.unfixable:
            out.print(f"  {escape(str(p))}")
        raise typer.Exit(1)
    if verdict:  # --repair does not bring failed videos back (--retry-failed does)
        raise typer.Exit(1)


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
