"""Stage-1 commands: ``plan`` and ``extract``.

Each command resolves its config (:func:`extract.config.resolve_extract_config`), calls one
library function (:func:`extract.plan.plan_extraction`, :func:`extract.runner.run_extract`)
and renders the result. Imported only when one of its commands runs (it brings torch)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional


import typer
from rich.markup import escape
from rich.table import Table

from extract.config import ExtractConfig, resolve_extract_config
from extract.job import run_job
from extract.plan import Rate, device_hours, estimate_plan, measured_rate, plan_extraction, plan_shape
from extract.runner import ExtractSummary
from freezeframe.cli.common import STORAGE_OPTION, config_option, console, flag_overrides, new_app, out
from freezeframe.cli.store import print_failures
from pipeline.errors import FreezeframeError
from pipeline.store import failure_reasons, failure_verdict, store_status

app = new_app("Stage 1: plan and extract.")

_SET = typer.Option([], "--set", metavar="KEY=VALUE", show_default=False,
                    help="Override any config field (repeatable; e.g. --set codec=blosc).")
_DATASET = typer.Option(None, help="Dataset defaults: the [extract] table of manifests/configs/<name>.toml.")
_CONFIG = typer.Option(None, help="TOML config file ([extract] table or top level).")


def _opt(key: str, help: str, *decls: str):
    return config_option(ExtractConfig, key, help, *decls)


def _store_bytes(n: float) -> str:
    """Binary units, plus decimal terabytes from 1 GB on (disks and budgets are sold in TB)."""
    return _human_bytes(n) + (f" ({n / 1e12:.2f} TB)" if n >= 1e9 else "")


def _rate(x: float) -> str:
    """Three significant digits below 100 frames/s (a CPU's 0.0746), thousands separated above."""
    return f"{x:.3g}" if x < 100 else f"{x:,.0f}"


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@app.command()
def plan(
    manifest: Optional[Path] = typer.Option(None, help="JSONL manifest (default: the --dataset/--config's; or "
                                            "--videos/--seconds for an estimate without one).", show_default=False),
    dataset: Optional[str] = _DATASET,
    config: Optional[Path] = _CONFIG,
    backbone: Optional[str] = _opt("backbone", "Backbone name (extract.backbones.BACKBONES)."),
    image_size: Optional[int] = _opt("image_size", "Backbone input side in px (none: the backbone's)."),
    fps: Optional[float] = _opt("fps", "Frames per second to keep (none: every frame)."),
    dtype: Optional[str] = _opt("dtype", "float16 | float32 | int8."),
    spatial_pool: Optional[int] = _opt("spatial_pool", "Pool the grid to k x k at extraction."),
    channel_pool: Optional[int] = _opt("channel_pool", "Pool channels down to c at extraction."),
    videos_per_shard: Optional[int] = _opt("videos_per_shard", "Videos per store shard."),
    videos: Optional[int] = typer.Option(None, help="Estimate without a manifest: this many videos "
                                         "(with --seconds; e.g. Kinetics-400 train: 240000)."),
    seconds: Optional[float] = typer.Option(None, help="Estimate: seconds per video (Kinetics-400: 10)."),
    native_fps: float = typer.Option(30.0, help="Frame rate of the videos where it is not read from a header "
                                     "(estimates, manifest segments) and --fps keeps every frame."),
    frames_per_s: Optional[float] = typer.Option(None, "--frames-per-s", help="Frames/s of one device (GPU) "
                                                 "for the hours (default: the rate measured for this backbone, "
                                                 "docs/benchmarks.md)."),
    gpus: list[int] = typer.Option([1, 8, 64], "--gpus", help="Device counts to show hours for (repeatable)."),
    set_: list[str] = _SET,
) -> None:
    """Dry run: frames, bytes per dtype, shards and device-hours an extraction would take (headers
    only, no decoding; or an estimate from --videos and --seconds with no videos at hand)."""
    estimate = videos is not None or seconds is not None
    if estimate and manifest is not None:
        raise FreezeframeError("give either --manifest or --videos/--seconds, not both")
    if estimate and (videos is None or seconds is None):
        raise FreezeframeError("an estimate needs both --videos N and --seconds S (per video)")
    cfg = resolve_extract_config(dataset, config, flag_overrides(
        manifest=manifest, backbone=backbone, image_size=image_size, fps=fps, dtype=dtype,
        spatial_pool=spatial_pool, channel_pool=channel_pool, videos_per_shard=videos_per_shard) + list(set_))
    if estimate:
        p = estimate_plan(cfg, plan_shape(cfg), int(videos or 0), float(seconds or 0.0), native_fps)
        what = f"{videos:,} videos x {seconds:g} s"
    else:
        if not cfg.manifest:
            raise FreezeframeError("give --manifest (or --videos N --seconds S for an estimate without videos)")
        p = plan_extraction(cfg, native_fps)
        what = str(cfg.manifest)
    rate = Rate(frames_per_s, "given (--frames-per-s)") if frames_per_s else measured_rate(cfg.backbone)
    t = Table(title=escape(f"plan for {what}: {cfg.backbone}, fps {cfg.fps or 'every frame'}"))
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_row("videos", f"{p.videos:,}")
    t.add_row("store shards", f"{p.shards:,}")
    t.add_row("hours of video", f"{p.seconds_of_video / 3600:,.2f}")
    how = {"estimate": f"estimate at {cfg.fps or native_fps:g} fps", "headers": "estimate"}.get(
        p.source, f"estimate; {p.from_segments} from manifest segments")
    t.add_row(f"frames ({how})", f"{p.frames:,}")
    t.add_row("feature grid (H, W, C)", str(p.feature_shape))
    t.add_row(f"bytes per frame ({cfg.dtype}, uncompressed)", f"{p.bytes_per_frame:,}")
    t.add_row("store size (uncompressed)", _store_bytes(p.bytes))
    for dt in ("float16", "int8"):
        if dt != cfg.dtype:
            t.add_row(f"store size as {dt} (uncompressed)", _store_bytes(p.bytes_as(dt)))
    if rate is None:
        t.add_row("device-hours", f"no rate measured for {cfg.backbone}: pass --frames-per-s")
    else:
        t.add_row("frames/s per device", f"{_rate(rate.frames_per_s)} ({rate.source})")
        for n in gpus:
            t.add_row(f"hours on {n} device(s)", f"{device_hours(p.frames, rate.frames_per_s, n):,.1f}")
    if not estimate:
        t.add_row("unreadable headers", str(len(p.unreadable)))
    out.print(t)
    for vid, why in p.unreadable[:20]:
        out.print(f"[yellow]unreadable[/] {escape(vid)}: {escape(why)}")


@app.command()
def extract(
    manifest: Optional[Path] = typer.Option(None, help="JSONL manifest (see `freezeframe manifest`)."),
    store: Optional[str] = typer.Option(None, help="Output zarr store (created or resumed): a path or an fsspec "
                                        "URL such as s3://bucket/x.zarr."),
    dataset: Optional[str] = _DATASET,
    config: Optional[Path] = _CONFIG,
    backbone: Optional[str] = _opt("backbone", "Backbone name (extract.backbones.BACKBONES)."),
    weights: Optional[Path] = _opt("weights", "Local checkpoint file for the backbone (none: the library's "
                                   "pretrained tag or the weights cache)."),
    random_weights: Optional[bool] = typer.Option(None, "--random-weights", help="Random init (tests only).",
                                                  show_default=False),
    image_size: Optional[int] = _opt("image_size", "Backbone input side in px (none: the backbone's)."),
    fps: Optional[float] = _opt("fps", "Frames per second to keep (none: every frame)."),
    geometry: Optional[str] = _opt("geometry", "short_side_crop | squash."),
    dtype: Optional[str] = _opt("dtype", "float16 | float32 | int8 (int8: per-token scale)."),
    codec: Optional[str] = _opt("codec", "zstd | blosc | none."),
    spatial_pool: Optional[int] = _opt("spatial_pool", "Pool the grid to k x k at extraction."),
    channel_pool: Optional[int] = _opt("channel_pool", "Pool channels down to c at extraction."),
    videos_per_shard: Optional[int] = _opt("videos_per_shard", "Videos per store shard."),
    pea_views: Optional[int] = _opt("pea_views", "Co-Settle return views (PEA) stored per frame (open_clip and "
                                    "timm ViTs; each costs one more encoder forward)."),
    test_crops: Optional[int] = _opt("test_crops", "Spatial test crops: 1 (centre) or 3 (left/centre/right or "
                                     "top/centre/bottom, the 30-view test; 2 more forwards per frame of the "
                                     "test_crop_splits videos, default split test)."),
    batch_size: Optional[int] = _opt("batch_size", "Frames per backbone forward."),
    workers: Optional[int] = _opt("workers", "Decode worker processes (0 = auto: cores - 1)."),
    threads: Optional[int] = _opt("threads", "CPU threads of the backbone (0 = this rank's cores)."),
    streams: Optional[int] = _opt("streams", "Batches encoded at once (0 = auto: CPU one per thread up to 4, "
                                  "CUDA 2)."),
    decode_timeout: Optional[float] = _opt("decode_timeout", "Seconds before a stalled decode is killed."),
    device: Optional[str] = _opt("device", "auto | cpu | cuda | cuda:N."),
    shard_index: Optional[int] = _opt("shard_index", "This job's index (independent jobs, e.g. a Slurm array)."),
    num_shards: Optional[int] = _opt("num_shards", "Number of independent jobs."),
    retry_failed: Optional[bool] = typer.Option(None, "--retry-failed", help="Retry only recorded failures.",
                                                show_default=False),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    verbose: bool = typer.Option(False, "--verbose", help="Every rank of a torchrun/srun job logs its shards and "
                                 "shows its own bar (default: rank 0 only, with the job's bar and summary)."),
    storage_option: list[str] = STORAGE_OPTION,
    set_: list[str] = _SET,
) -> None:
    """Extract frozen-backbone patch features of every video into a sharded zarr v3 store."""
    cfg = resolve_extract_config(dataset, config, flag_overrides(
        manifest=manifest, store=store, backbone=backbone, weights=weights,
        random_weights=random_weights, image_size=image_size, fps=fps, geometry=geometry, dtype=dtype, codec=codec,
        spatial_pool=spatial_pool, channel_pool=channel_pool, videos_per_shard=videos_per_shard,
        pea_views=pea_views, test_crops=test_crops, batch_size=batch_size, workers=workers, threads=threads, streams=streams, decode_timeout=decode_timeout,
        device=device, shard_index=shard_index, num_shards=num_shards, retry_failed=retry_failed,
        progress=False if no_progress else None, verbose=True if verbose else None)
        + [f"storage_options.{o}" for o in storage_option] + list(set_))
    if not cfg.manifest or not cfg.store:
        raise FreezeframeError("give --manifest and --store (or a --dataset/--config that sets them)")
    r = run_job(cfg, console)
    s, rank = r.summary, r.rank
    if r.several and not rank.is_main:
        if cfg.verbose:
            _print_summary(f"rank {rank.rank} of {rank.world}: {cfg.store}", _rank_rows(s), [], [])
        return
    st = store_status(cfg.store)
    store_rows = [("store: videos stored / planned", f"{st.videos_stored} / {st.planned_videos}"),
                  ("store: shards complete / planned", f"{st.complete_shards} / {st.planned_shards}"),
                  ("store: failed videos", str(st.failures))]
    if r.totals is not None:
        t = r.totals
        rows = [("ranks", f"{rank.world} ({rank.launcher}); shards per rank: "
                          + ", ".join(str(t.shards_by_rank.get(k, 0)) for k in range(rank.world))),
                ("shards done now / skipped (already complete)", f"{len(t.shards)} / {r.skipped}"),
                ("videos done now", str(t.videos)), ("frames done now", f"{t.frames:,}"),
                ("frames/s (all ranks: first start to last end)", f"{t.frames_per_s:.1f}"),
                ("failures now", str(len(t.failures)))]
        failures = [(f.get("video_id", "?"), f.get("stage", "?"), f.get("error_type", "?"), f.get("message", ""))
                    for f in t.failures]
        reasons, done_videos = t.failure_reasons, t.videos
        title = f"extraction summary (job of {rank.world} ranks): {cfg.store}"
    else:
        rows = _rank_rows(s)
        failures = [(f.video_id, f.stage, f.error_type, f.message) for f in s.failures]
        reasons, done_videos = failure_reasons(asdict(f) for f in s.failures), s.videos_done
        title = f"extraction summary: {cfg.store}"
    rows += [(f"failed: {why}", str(n)) for why, n in reasons[:5]]
    _print_summary(title, rows + store_rows, failures, s.shards_busy)
    if r.missing:
        missing = r.missing
        out.print(f"[bold red]{len(missing)} shard(s) of this job are not complete[/] and nobody has been writing "
                  f"them for 2 min ({', '.join(missing[:5])}{'...' if len(missing) > 5 else ''}): a rank died or "
                  "never started; rerun the same command to finish them")
    # a run where every video failed is not a success, whatever the rate allowed in the store
    verdict = failure_verdict(len(failures), done_videos, reasons, max_rate=1.0)
    if verdict:
        out.print(f"[bold red]error[/]: {escape(verdict)}")
        raise typer.Exit(1)
    if r.missing:
        raise typer.Exit(1)


def _rank_rows(s: ExtractSummary) -> list[tuple[str, str]]:
    """Summary rows of what this process did."""
    rows = [("shards done now / skipped (already complete)", f"{s.shards_done} / {s.shards_skipped}")]
    if s.shards_busy:
        rows.append(("shards left to another running process", str(len(s.shards_busy))))
    rows += [("videos done now", str(s.videos_done)), ("frames done now", f"{s.frames_done:,}"),
             ("frames/s", f"{s.frames_per_s:.1f}")]
    if s.startup_seconds is not None:
        rows.append(("start-up s (workers ready) / frames/s after it",
                     f"{s.startup_seconds:.1f} / {s.steady_frames_per_s:.1f}"))
    rows.append(("failures now", str(len(s.failures))))
    if s.retries:
        rows.append(("input reads retried (transient network errors, not failures)", str(s.retries)))
    return rows


def _print_summary(title: str, rows: list[tuple[str, str]], failures: list[tuple[str, str, str, str]],
                   busy: list[str]) -> None:
    """The summary table, the failure table, and what to do about busy shards."""
    t = Table(title=escape(title))
    t.add_column("quantity")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(escape(k), escape(v))
    out.print(t)
    print_failures(failures)
    if busy:
        out.print(f"[yellow]{len(busy)} shard(s) were being written by another process[/] "
                  f"({', '.join(busy[:5])}{'...' if len(busy) > 5 else ''}); "
                  "rerun this command once it ends to finish anything it did not")
