"""Typed configuration: one TOML file (optional) plus command-line overrides, validated at once.

No layers, no includes: a config file is a flat description of one job, and the resolved config
(every default filled in) is saved beside the store and every checkpoint. Each component's settings
dataclass is its own table, defaults and checks included: `[extract]` is `ExtractConfig` (the step's
`extract.step.StepSettings` plus where the job runs), `[extract.frames]` is `FrameSettings`,
`[extract.faces]` is `FaceSettings`, `[extract.encoders.<name>]` an `extract.encoders.EncoderTable`.
Their fields say whether they change feature values, which clips get them, or only where the work
runs (`extract.settings`): the feature-set keys follow from that, never from a hand list.

    [dataset]
    kind = "merr"                 # merr | mer2023 | dfew | folder
    root = "data/merr"
    options = { fold = 1 }        # adapter options (dfew: fold, frames_dir; folder: labels_csv)

    [extract]
    store = "stores/merr.zarr"    # a folder or any fsspec URL (s3://bucket/prefix)
    profile = "paper"             # paper (the default) | tiny (random tiny encoders: tests and the demo)
    workers = 1
    [extract.frames]
    global_frame = "peak"         # first | middle | peak
    [extract.faces]
    margin = 0.2
    [extract.encoders.audio]      # a view's weights: a hub id or a local folder
    model = "/models/chinese-hubert-large"
    [extract.encoders.global]     # or a weights file in its original layout (LAVIS eva_vit_g.pth, MAE, VideoMAE)
    model = "/models/eva_vit_g.pth"
    [extract.encoders.wav2vec2]   # a further encoder: a fifth feature set (wav2vec2.hf.mean)
    encoder = "hf"
    model = "facebook/wav2vec2-base"
    input = "waveform"
    [extract.asr]                 # subtitles from speech (--asr): the text set asr.whisper.text
    enabled = true
    task = "translate"            # translate (English) | transcribe (the spoken language)

The flat names of earlier versions (`local_frames`, `global_frame`, `max_side`, `crop_size`,
`face_margin`, `face_min_size` in `[extract]`, as the command-line flags set them) still work, and so
does `detect_on` (the flag `--detect-on`, for `[extract.faces] detect_on`); the flags `--asr`,
`--asr-model`, `--asr-task` and `--asr-language` set `[extract.asr]` the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from emollama.corpora import ADAPTERS
from emollama.extract.asr import ASR_VIEW, AsrSettings
from emollama.extract.encoders import PROFILES, EncoderTable, parse_encoders
from emollama.extract.settings import RUNTIME, build, names_of_kind, runtime, section, to_dict, value
from emollama.extract.settings import problems as settings_problems
from emollama.extract.step import StepSettings
from emollama.train.config import ConfigError, build_section, device_problems, read_toml


@dataclass
class DatasetConfig:
    kind: str = "merr"                          # the adapter: merr | mer2023 | dfew | emer | folder (`emollama datasets`)
    root: str = ""                              # the corpus folder
    options: dict[str, Any] = field(default_factory=dict)  # adapter options, e.g. {fold = 1} (`--option KEY=VALUE`)
    def problems(self) -> list[str]:
        out = []
        if self.kind not in ADAPTERS:
            out.append(f"dataset.kind = {self.kind!r}: choose one of {', '.join(ADAPTERS)}")
        if not self.root:
            out.append("dataset.root is empty: pass --data DIR (the corpus folder)")
        elif "://" not in self.root and not Path(self.root).is_dir():
            out.append(f"dataset.root = {self.root!r} is not a folder")
        return out


# flat [extract] names of earlier versions (and of the command-line flags) -> (table, field)
LEGACY_KEYS = {"local_frames": ("frames", "local_frames"), "global_frame": ("frames", "global_frame"),
               "max_side": ("frames", "max_side"), "crop_size": ("faces", "crop_size"),
               "face_margin": ("faces", "margin"), "face_min_size": ("faces", "min_face_size"),
               "detect_on": ("faces", "detect_on"),
               # the command line's --asr, --asr-model, --asr-task, --asr-language
               "asr_enabled": ("asr", "enabled"), "asr_model": ("asr", "model"), "asr_task": ("asr", "task"),
               "asr_language": ("asr", "language")}


@dataclass(frozen=True, kw_only=True)
class ExtractConfig(StepSettings):
    """[extract]: the step's settings (`StepSettings`: frames, faces, sample_rate, dtype, missing_audio,
    offline, device, batch sizes, max_pixels), the encoders, and where the job runs."""

    store: str = runtime("")         # a folder or an fsspec URL
    profile: str = value("paper", spec="encoder", choices=PROFILES)  # paper (real models) | tiny (random: tests, demo)
    encoders: dict[str, EncoderTable] = value(spec="encoder", default_factory=dict)   # name -> table
    asr: AsrSettings = section(AsrSettings)      # subtitles from speech: a text set per clip (extract.asr)
    workers: int = runtime(0, min=0)             # 0 = in this process (the fastest with a GPU); N: a local dask cluster (on a CPU, N workers use N x cpu_threads cores)
    scheduler: str | None = runtime(None)        # address of an existing dask scheduler
    batch_clips: int | None = runtime(None, min=1)   # clips per task (one store commit); unset: 4 per preparation process, at least 8
    preview: str | None = runtime(None)          # folder for contact sheets
    compact: bool = runtime(True)                # merge small segments at the end of a run
    storage_options: dict[str, Any] = runtime(default_factory=dict)  # fsspec options for a remote store (`--storage-option KEY=VALUE`)
    def extra_problems(self, where: str) -> list[str]:
        out = []
        if not self.store:
            out.append(f"{where}.store is empty: pass --store PATH_OR_URL")
        if self.asr.enabled and ASR_VIEW in self.encoders:
            out.append(f"{where}.encoders.{ASR_VIEW}: the name {ASR_VIEW!r} is the ASR entry's ([{where}.asr]); "
                       "name this encoder otherwise")
        return out + device_problems(f"{where}.device", self.device)

    def problems(self) -> list[str]:
        return settings_problems(self, "extract")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# the [extract] fields a job that redoes another's work sets for itself (eval: the store, workers, ...)
RUNTIME_FIELDS = tuple(names_of_kind(ExtractConfig, RUNTIME))


def _unflatten(extract: Mapping[str, Any]) -> dict[str, Any]:
    """Move the flat names of earlier versions into their tables (the flat name wins: the flags use it)."""
    out = dict(extract)
    for old, (table, name) in LEGACY_KEYS.items():
        if old in out:
            v = out.pop(old)
            given = out.get(table)
            out[table] = {**(dict(given) if isinstance(given, Mapping) else {}), name: v}
    return out


def build_extract(extract: Mapping[str, Any], problems: list[str]) -> ExtractConfig:
    """[extract] from a mapping (a TOML table, or a config recorded by any version); problems listed."""
    if not isinstance(extract, Mapping):
        problems.append(f"[extract] = {extract!r}: expected a table of settings ([extract] with key = value lines)")
        return ExtractConfig()
    built = build(ExtractConfig, _unflatten(extract), "extract", problems, parsers={"encoders": parse_encoders})
    return built if built is not None else ExtractConfig()


def job_settings(extract: Mapping[str, Any]) -> dict[str, Any]:
    """An [extract] table (e.g. one recorded with a feature set), normalised and without its runtime
    fields: the settings a job that extracts more clips into the same sets must keep."""
    problems: list[str] = []
    cfg = build_extract(extract, problems)
    if problems:
        raise ConfigError(problems)
    return {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_FIELDS}


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)

    def problems(self) -> list[str]:
        return self.dataset.problems() + self.extract.problems()

    def to_dict(self) -> dict:
        return {"dataset": asdict(self.dataset), "extract": self.extract.to_dict()}


def load_config(path: str | Path | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Config:
    """Read a TOML file (if any), apply overrides ({section: {key: value}}, None = keep), validate."""
    problems: list[str] = []
    data = read_toml(path, overrides, problems=problems)
    for section in data:
        if section not in ("dataset", "extract"):
            problems.append(f"[{section}]: unknown section (known: dataset, extract)")
    cfg = Config(
        dataset=build_section(DatasetConfig, data.get("dataset", {}), "dataset", problems),
        extract=build_extract(data.get("extract", {}) or {}, problems),
    )
    problems += cfg.problems()
    if problems:
        raise ConfigError(problems)
    return cfg
