"""extract/config.py: the one config path of stage 1 (dataset defaults <- TOML <- overrides),
the runtime knobs declared on the fields, and invalid values refused all at once before any
store is created."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from extract.config import ExtractConfig, dataset_config, resolve_extract_config
from extract.runner import run_extract
from pipeline.config import content_dict, runtime_keys, to_dict
from pipeline.errors import ConfigError, FreezeframeError
from pipeline.manifest import ManifestRow, write_manifest
from tests.videos import make_lossless_video, pattern_frames

RUNTIME = {"manifest", "store", "batch_size", "workers", "decode_threads", "threads", "streams",
           "decode_timeout", "chunk_size", "device", "amp", "shard_index", "num_shards",
           "retry_failed", "progress", "verbose", "storage_options", "lease_seconds", "decode_buffer_mb"}
BAD = dict(codec="lz4", spatial_pool=0, frames_per_file=0, dtype="bf16", backbone="resnet-nope")


def test_runtime_knobs_are_declared_on_the_fields() -> None:
    assert set(runtime_keys(ExtractConfig)) == RUNTIME
    cfg = ExtractConfig(batch_size=3, workers=2, device="cpu", store="/x", manifest="/m.jsonl")
    assert content_dict(cfg) == content_dict(ExtractConfig())  # only runtime knobs changed
    assert content_dict(dataclasses.replace(cfg, fps=2.0)) != content_dict(ExtractConfig())
    # the store header keeps the *full* config as provenance, runtime knobs included
    assert to_dict(cfg)["batch_size"] == 3 and to_dict(cfg)["store"] == "/x"


def test_every_invalid_value_is_refused_in_one_error() -> None:
    with pytest.raises(ConfigError) as info:
        ExtractConfig(**BAD)
    msg = str(info.value)
    assert isinstance(info.value, FreezeframeError)
    assert msg.startswith("extract config has 5 problems:"), msg
    for line in ("codec: unknown codec 'lz4'; choose one of: blosc, none, zstd",
                 "dtype: unknown storage dtype 'bf16'; choose one of: float16, float32, int8",
                 "backbone: unknown backbone 'resnet-nope'; choose one of: ",
                 "spatial_pool: must be an integer >= 1 or unset (null), got 0",
                 "frames_per_file: must be an integer >= 1, got 0"):
        assert f"  - {line}" in msg, msg
    with pytest.raises(ConfigError, match=r"^extract config: fps: must be a number > 0"):
        ExtractConfig(fps=0.0)
    with pytest.raises(ConfigError, match="geometry: unknown geometry 'stretch'"):
        ExtractConfig(geometry="stretch")
    with pytest.raises(ConfigError, match="interpolation: unknown interpolation 'lanczos'"):
        ExtractConfig(interpolation="lanczos")
    assert ExtractConfig(spatial_pool=None, channel_pool=64, fps=2.5).problems() == []


def test_resolve_layers_dataset_file_then_overrides(tmp_path: Path) -> None:
    ucf = dataset_config("ucf101")
    assert "fps" not in ucf and dataset_config("ava")["fps"] == 7.5  # long-form pre-training (was 1.0)
    toml = tmp_path / "run.toml"
    toml.write_text('[extract]\nfps = 2.0\ndtype = "int8"\nbatch_size = 4\n')
    cfg = resolve_extract_config("ava", toml, ["batch_size=9", "store=/tmp/s"])
    assert (cfg.fps, cfg.dtype, cfg.batch_size, cfg.store) == (2.0, "int8", 9, "/tmp/s")
    top = tmp_path / "top.toml"  # a file without an [extract] table is read from its top level
    top.write_text('codec = "blosc"\n')
    assert resolve_extract_config(None, top, []).codec == "blosc"
    with pytest.raises(FreezeframeError, match="no dataset config 'nope'; choose one of: .*ucf101"):
        resolve_extract_config("nope", None, [])


def test_resolve_reports_type_errors_and_invalid_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_extract_config(None, None, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                            for k, v in BAD.items()])
    msg = str(info.value)
    assert msg.count("\n  - ") == 5 and "codec: unknown codec 'lz4'" in msg, msg
    with pytest.raises(ConfigError, match="batch_size: expected an integer, got 'many'") as info:
        resolve_extract_config(None, None, ["batch_size=many", "bogus=1"])
    assert "unknown config key(s) ['bogus']" in str(info.value)


def test_run_refuses_invalid_values_before_creating_the_store(tmp_path: Path) -> None:
    video = make_lossless_video(tmp_path / "v.mkv", pattern_frames(4, 32, 32), fps=10)
    manifest = write_manifest([ManifestRow("v", str(video))], tmp_path / "m.jsonl")
    cfg = ExtractConfig(manifest=str(manifest), store=str(tmp_path / "store"), random_weights=True,
                        image_size=32, workers=1, device="cpu", progress=False)
    cfg.codec, cfg.spatial_pool = "lz4", 0  # assigned after construction: checked again by the run
    with pytest.raises(ConfigError) as info:
        run_extract(cfg)
    assert "codec: unknown codec 'lz4'" in str(info.value) and "spatial_pool" in str(info.value)
    assert not (tmp_path / "store").exists()
    with pytest.raises(ConfigError, match="device 'gpu0' is not a torch device"):
        run_extract(dataclasses.replace(cfg, codec="zstd", spatial_pool=None, device="gpu0"))
    assert not (tmp_path / "store").exists()
