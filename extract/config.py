"""The extraction config (stage 1): its fields, which of them are runtime knobs, its checks,
and the one way to build it from a dataset's defaults, a TOML file and ``key=value`` overrides.

Every field not declared ``runtime(...)`` decides the stored values (through the store
header's ``content``, see :func:`extract.runner.store_header`): a rerun into an existing store
must match them. Runtime knobs (batch size, workers, device, this job's shard index, the
manifest and store *paths*: the manifest is identified by its sha256) may change between runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from extract.backbones import BACKBONES
from extract.decode import GEOMETRIES, INTERPOLATIONS
from extract.decoders import DECODERS
from manifests import dataset_config as dataset_file
from pipeline.config import load_toml, resolve, runtime
from pipeline.errors import ConfigError
from pipeline.registry import Registry
from pipeline.paths import root_keys
from pipeline.store import CODECS, STORAGE_DTYPES


@dataclass
class ExtractConfig:
    """Everything ``freezeframe extract`` needs.

    Invalid values (unknown names, sizes below 1...) are refused at construction with one
    :class:`~pipeline.errors.ConfigError` listing every problem, before any store is touched.
    """

    manifest: str = runtime("")  # path of the JSONL manifest (its rows' sha256 is content)
    store: str = runtime("")  # path of the zarr store to create or complete
    # backbone (content)
    backbone: str = "mobilenetv2-imagenet"  # a name of extract.backbones.BACKBONES
    weights: str | None = None  # local checkpoint file; None = library pretrained tag / cache
    random_weights: bool = False  # random init (tests, smoke runs)
    image_size: int | None = None  # input side in px; None = the backbone's default
    # decoding (content)
    fps: float | None = None  # frames per second to keep; None = every native frame
    geometry: str = "short_side_crop"  # short_side_crop | squash
    interpolation: str | None = None  # None = the backbone's own
    min_frames: int = 1  # fewer decoded frames -> failure "too_short"
    # an extract.decoders.DECODERS name: pyav (CPU, default) | torchcodec-cuda (NVDEC) | torchcodec-cpu
    decoder: str = "pyav"
    # at a set fps, two consecutive frames further apart (seconds) -> failure "too_long" instead
    # of storing one frame for the whole gap; None: no limit
    max_gap: float | None = 60.0
    # storage (content)
    dtype: str = "float16"  # float16 | float32 | int8 (per-token scale)
    codec: str = "zstd"  # zstd | blosc | none
    spatial_pool: int | None = None  # average-pool the grid to k x k at extraction
    channel_pool: int | None = None  # average adjacent channels down to c
    # Co-Settle's return view (content): K PEA views per frame (extract.pea), 0 = none
    pea_views: int = 0  # open_clip and timm ViTs only
    pea_ratio: float = 10.0  # the PE grid is upsampled by 1 + pea_ratio before a window is cut
    pea_seed: int = 0  # window offsets of frame j of video v: seeded by (pea_seed, v, j)
    # the 30-view test (AdViSe: 10 clips x 3 spatial crops): 3 also stores, for the videos of
    # ``test_crop_splits``, the two side crops (left/right, or top/bottom for portrait) of the
    # short-side-scaled frame next to the centre crop (the main features); 1 = the centre only
    test_crops: int = 1  # 1 | 3; needs geometry short_side_crop
    test_crop_splits: list[str] = field(default_factory=lambda: ["test"])  # manifest splits; ["all"]: every video
    videos_per_shard: int = 64  # videos per store shard (unit of work, one writer)
    frames_per_file: int = 256  # frames per zarr shard file
    # runtime
    batch_size: int = runtime(32)  # frames per backbone forward
    workers: int = runtime(0)  # decode worker processes; 0 = auto (this rank's cores - 1, at least 1)
    decode_threads: int = runtime(0)  # codec threads per worker; 0 = library default
    threads: int = runtime(0)  # CPU threads of the backbone; 0 = this rank's cores (cores / local ranks)
    streams: int = runtime(0)  # batches encoded at once (see extract.encode.ThreadPlan); 0 = auto
    decode_timeout: float = runtime(120.0)  # seconds a video may stall the pipeline before its worker is killed
    chunk_size: int = runtime(32)  # frames per decoded chunk sent from a worker
    # MB of decoded frames held for videos decoded ahead of the one being encoded (reorder buffer)
    decode_buffer_mb: int = runtime(512)
    device: str = runtime("auto")  # auto | cpu | cuda | cuda:N
    amp: bool = runtime(True)  # autocast on CUDA (features are stored in the declared dtype anyway)
    shard_index: int | None = runtime(None)  # this job's index among independent jobs (Slurm array)
    num_shards: int | None = runtime(None)  # number of independent jobs
    retry_failed: bool = runtime(False)  # only retry videos recorded as failures
    # fsspec options of a remote store (s3fs: endpoint_url, key, secret, anon, ...); the
    # environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) fills in the rest; never recorded
    storage_options: dict[str, Any] = runtime(default_factory=dict)
    # seconds a remote shard claim lasts without a heartbeat before another rank takes the
    # shard over (docs/storage.md); local stores use flock, which needs none
    lease_seconds: float = runtime(60.0)
    progress: bool = runtime(True)
    verbose: bool = runtime(False)  # ranks other than 0 also log and show their own progress bar

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise one :class:`ConfigError` listing every invalid value (fields may have been
        assigned since construction: the runner checks again before touching a store)."""
        problems = self.problems()
        if len(problems) == 1:
            raise ConfigError(f"extract config: {problems[0]}")
        if problems:
            raise ConfigError(f"extract config has {len(problems)} problems:\n"
                              + "\n".join(f"  - {p}" for p in problems))

    def problems(self) -> list[str]:
        """Every invalid value, one line each (empty: valid)."""
        out: list[str] = []
        names: list[tuple[str, Registry, Any]] = [
            ("backbone", BACKBONES, self.backbone), ("dtype", STORAGE_DTYPES, self.dtype),
            ("codec", CODECS, self.codec), ("geometry", GEOMETRIES, self.geometry),
            ("decoder", DECODERS, self.decoder),
            ("interpolation", INTERPOLATIONS, self.interpolation),
        ]
        for key, registry, value in names:
            if value is not None and value not in registry:
                out.append(f"{key}: unknown {registry.kind} {value!r}; choose one of: {', '.join(registry.names())}")
        at_least = [
            ("image_size", self.image_size, 1, True), ("spatial_pool", self.spatial_pool, 1, True),
            ("channel_pool", self.channel_pool, 1, True), ("min_frames", self.min_frames, 1, False),
            ("videos_per_shard", self.videos_per_shard, 1, False),
            ("frames_per_file", self.frames_per_file, 1, False), ("batch_size", self.batch_size, 1, False),
            ("chunk_size", self.chunk_size, 1, False), ("workers", self.workers, 0, False),
            ("decode_buffer_mb", self.decode_buffer_mb, 1, False),
            ("decode_threads", self.decode_threads, 0, False), ("threads", self.threads, 0, False),
            ("streams", self.streams, 0, False), ("pea_views", self.pea_views, 0, False),
            ("pea_seed", self.pea_seed, 0, False),
        ]
        for key, value, low, optional in at_least:
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                hint = " or unset (null)" if optional else ""
                out.append(f"{key}: must be an integer >= {low}{hint}, got {value!r}")
        if isinstance(self.pea_ratio, bool) or not isinstance(self.pea_ratio, (int, float)) or not self.pea_ratio >= 0:
            out.append(f"pea_ratio: must be a number >= 0 (10 in Co-Settle's recipe), got {self.pea_ratio!r}")
        if self.test_crops not in (1, 3) or isinstance(self.test_crops, bool):
            out.append(f"test_crops: must be 1 (the centre crop only) or 3 (left/centre/right, top/centre/bottom "
                       f"for portrait: the 30-view test), got {self.test_crops!r}")
        elif self.test_crops == 3 and self.geometry != "short_side_crop":
            out.append(f"test_crops=3 needs geometry=short_side_crop (the crops are cut from the short-side-scaled "
                       f"frame), got geometry={self.geometry!r}; set geometry=short_side_crop or test_crops=1")
        if (not isinstance(self.test_crop_splits, (list, tuple)) or not self.test_crop_splits
                or not all(isinstance(x, str) and x for x in self.test_crop_splits)):
            out.append(f"test_crop_splits: must be a non-empty list of manifest split names (or [\"all\"]), "
                       f"got {self.test_crop_splits!r}")
        if self.geometry == "short_side":
            out.append("geometry: 'short_side' keeps whole frames and is how test crops are decoded; choose "
                       "short_side_crop (with test_crops=3 for the 3 test crops) or squash")
        positive = [("fps", self.fps, " or unset (null: every native frame)"),
                    ("decode_timeout", self.decode_timeout, None), ("lease_seconds", self.lease_seconds, None),
                    ("max_gap", self.max_gap, " or unset (null: no limit)")]
        for key, value, unset in positive:
            if value is None and unset is not None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                out.append(f"{key}: must be a number > 0{unset or ''}, got {value!r}")
        return out


#: ExtractConfig fields that hold paths (rooted when they come from a shipped dataset file)
PATH_KEYS = ("manifest", "store")


def dataset_config(name: str) -> dict:
    """The ``[extract]`` table of ``manifests/configs/<name>.toml`` (the dataset's defaults), its
    relative paths under the data root (:func:`pipeline.paths.data_root`), not the current directory."""
    return root_keys(dataset_file(name).get("extract", {}), PATH_KEYS)


def resolve_extract_config(dataset: str | None = None, config_file: str | Path | None = None,
                           overrides: Sequence[str] = ()) -> ExtractConfig:
    """Defaults <- the dataset's ``[extract]`` table <- ``config_file`` (its ``[extract]``
    table, or its top level) <- dotted ``key=value`` overrides; type-checked and validated
    (one :class:`~pipeline.errors.ConfigError` listing every problem)."""
    layers: list[dict] = []
    if dataset:
        layers.append(dataset_config(dataset))
    if config_file:
        table = load_toml(config_file)
        layers.append(table.get("extract", table))
    return resolve(ExtractConfig, layers, overrides)


def wants_test_crops(cfg: ExtractConfig, split: str) -> bool:
    """Whether a manifest row of ``split`` gets the spatial test crops under ``cfg``."""
    return cfg.test_crops > 1 and ("all" in cfg.test_crop_splits or split in cfg.test_crop_splits)
