"""Typed configuration: one TOML file (optional) plus command-line overrides, validated at once.

No layers, no includes: a config file is a flat description of one job, and the resolved config
(every default filled in) is saved beside the store and every checkpoint.

    [dataset]
    kind = "merr"                 # merr | mer2023 | dfew | folder
    root = "data/merr"
    options = { fold = 1 }        # adapter options (dfew: fold, frames_dir; folder: labels_csv)

    [extract]
    store = "stores/merr.zarr"    # a folder or any fsspec URL (s3://bucket/prefix)
    profile = "paper"             # paper | tiny
    workers = 1
    [extract.encoders.audio]      # per-view override of the profile: a hub id or a local folder
    model = "/models/chinese-hubert-large"
    [extract.encoders.global]     # or a weights file in its original layout (LAVIS eva_vit_g.pth, MAE, VideoMAE)
    model = "/models/eva_vit_g.pth"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from emollama.store.datasets import ADAPTERS
from emollama.train.config import ConfigError, build_section, device_problems, read_toml

GLOBAL_FRAMES = ("first", "middle", "peak")
DTYPES = ("float16", "float32")


@dataclass
class DatasetConfig:
    kind: str = "merr"
    root: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if self.kind not in ADAPTERS:
            out.append(f"dataset.kind = {self.kind!r}: choose one of {', '.join(ADAPTERS)}")
        if not self.root:
            out.append("dataset.root is empty: pass --data DIR (the corpus folder)")
        elif "://" not in self.root and not Path(self.root).is_dir():
            out.append(f"dataset.root = {self.root!r} is not a folder")
        return out


@dataclass
class ModelOverride:
    model: str                       # hub id, local folder, or a local weights file (.pth, .safetensors)
    revision: str | None = None
    config: str | None = None        # a weights file's architecture: a folder with config.json (optional)


@dataclass
class ExtractConfig:
    store: str = ""
    profile: str = "tiny"
    encoders: dict[str, ModelOverride] = field(default_factory=dict)   # view -> override
    local_frames: int = 16
    global_frame: str = "peak"
    max_side: int = 1280
    max_pixels: int = 8192 * 8192    # a clip whose frames are larger fails (checked from the header); 0: no limit
    face_margin: float = 0.2
    face_min_size: int = 20
    crop_size: int = 224
    dtype: str = "float16"
    missing_audio: str = "auto"      # fail | silence | auto (silence for frame folders, fail for videos)
    device: str = "auto"
    offline: bool | None = None      # None: HF_HUB_OFFLINE decides (tiny is always offline)
    workers: int = 1                 # 0 = in this process, no dask
    scheduler: str | None = None     # address of an existing dask scheduler
    batch_clips: int = 8             # clips per task (one store commit)
    micro_batch: int = 4             # clips encoded together
    batch_size: int = 32             # images per encoder forward
    preview: str | None = None       # folder for contact sheets
    compact: bool = True             # merge small segments at the end of a run
    storage_options: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if not self.store:
            out.append("extract.store is empty: pass --store PATH_OR_URL")
        if self.profile not in ("tiny", "paper"):
            out.append(f"extract.profile = {self.profile!r}: choose tiny or paper "
                       "(or override single encoders in [extract.encoders.<view>])")
        for view in self.encoders:
            if view not in ("audio", "local", "temporal", "global"):
                out.append(f"extract.encoders.{view}: unknown view; use audio, local, temporal or global")
        if self.global_frame not in GLOBAL_FRAMES:
            out.append(f"extract.global_frame = {self.global_frame!r}: choose one of {', '.join(GLOBAL_FRAMES)}")
        if self.missing_audio not in ("auto", "fail", "silence"):
            out.append(f"extract.missing_audio = {self.missing_audio!r}: choose auto, fail or silence")
        if self.dtype not in DTYPES:
            out.append(f"extract.dtype = {self.dtype!r}: choose float16 or float32")
        for name in ("local_frames", "max_side", "crop_size", "batch_clips", "micro_batch", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"extract.{name} = {getattr(self, name)} must be at least 1")
        if self.workers < 0:
            out.append(f"extract.workers = {self.workers} must be 0 (in process) or more")
        if self.max_pixels < 0:
            out.append(f"extract.max_pixels = {self.max_pixels} must be 0 (no limit) or more")
        if not 0 <= self.face_margin <= 1:
            out.append(f"extract.face_margin = {self.face_margin} must be within [0, 1]")
        out += device_problems("extract.device", self.device)
        return out


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)

    def problems(self) -> list[str]:
        return self.dataset.problems() + self.extract.problems()

    def to_dict(self) -> dict:
        return asdict(self)


def _encoders(value: Any, problems: list[str]) -> dict[str, ModelOverride]:
    enc = {}
    for view, spec in (value or {}).items():
        if isinstance(spec, str):
            spec = {"model": spec}
        if not isinstance(spec, Mapping) or "model" not in spec:
            problems.append(f"extract.encoders.{view}: expected a table with `model` (hub id, folder or weights file)")
            continue
        unknown = sorted(set(spec) - {"model", "revision", "config"})
        if unknown:
            problems.append(f"extract.encoders.{view}: unknown keys {unknown} (known: model, revision, config)")
            continue
        enc[view] = ModelOverride(str(spec["model"]), spec.get("revision"),
                                  None if spec.get("config") is None else str(spec["config"]))
    return enc


def load_config(path: str | Path | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """Read a TOML file (if any), apply overrides ({section: {key: value}}, None = keep), validate."""
    data = read_toml(path, overrides)
    problems: list[str] = []
    for section in data:
        if section not in ("dataset", "extract"):
            problems.append(f"[{section}]: unknown section (known: dataset, extract)")
    extract = dict(data.get("extract", {}))
    if "encoders" in extract:
        extract["encoders"] = _encoders(extract["encoders"], problems)
    cfg = Config(
        dataset=build_section(DatasetConfig, data.get("dataset", {}), "dataset", problems),
        extract=build_section(ExtractConfig, extract, "extract", problems),
    )
    problems += cfg.problems()
    if problems:
        raise ConfigError(problems)
    return cfg
