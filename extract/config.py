"""The extraction config (stage 1) and the parts of it that define a store's content."""
from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import ConfigError


@dataclass
class ExtractConfig:
    """Everything ``freezeframe extract`` needs.

    Fields marked *content* decide the stored values: a rerun into an existing store must
    match them exactly (see :func:`extract.runner.store_header`). The others are runtime
    knobs that may change between runs (batch size, workers, device...).
    """

    manifest: str = ""  # path of the JSONL manifest
    store: str = ""  # path of the zarr store to create or complete
    # backbone (content)
    backbone: str = "mobilenetv2-imagenet"
    weights: str | None = None  # local checkpoint file; None = library pretrained tag / cache
    random_weights: bool = False  # random init (tests, smoke runs)
    image_size: int | None = None  # input side in px; None = the backbone's default
    # decoding (content)
    fps: float | None = None  # frames per second to keep; None = every native frame
    geometry: str = "short_side_crop"  # short_side_crop | squash
    interpolation: str | None = None  # None = the backbone's own
    min_frames: int = 1  # fewer decoded frames -> failure "too_short"
    # storage (content)
    dtype: str = "float16"  # float16 | float32 | int8 (per-token scale)
    codec: str = "zstd"  # zstd | blosc | none
    spatial_pool: int | None = None  # average-pool the grid to k x k at extraction
    channel_pool: int | None = None  # average adjacent channels down to c
    videos_per_shard: int = 64  # videos per store shard (unit of work, one writer)
    frames_per_file: int = 256  # frames per zarr shard file
    # runtime
    batch_size: int = 32  # frames per backbone forward
    workers: int = 0  # decode worker processes; 0 = auto (this rank's cores - 1, at least 1)
    decode_threads: int = 0  # codec threads per worker; 0 = library default
    threads: int = 0  # CPU threads of the backbone; 0 = this rank's cores (cores / local ranks)
    streams: int = 0  # batches encoded at once (see extract.runner.ThreadPlan); 0 = auto
    decode_timeout: float = 120.0  # seconds a video may stall the pipeline before its worker is killed
    # at a set fps, a gap (seconds) between two frames longer than this quarantines the video
    # (stage too_long) instead of storing one frame for all of it; None: no limit
    max_gap: float | None = 60.0
    chunk_size: int = 32  # frames per decoded chunk sent from a worker
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # autocast on CUDA (features are stored in the declared dtype anyway)
    shard_index: int | None = None  # this job's index among independent jobs (Slurm array)
    num_shards: int | None = None  # number of independent jobs
    retry_failed: bool = False  # only retry videos recorded as failures
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_gap is not None and not (isinstance(self.max_gap, (int, float)) and math.isfinite(self.max_gap)
                                             and self.max_gap > 0):
            raise ConfigError(f"max_gap must be a positive number of seconds or None (no limit), "
                              f"got {self.max_gap!r}")
