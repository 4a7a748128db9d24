"""The encoders of stage one: an open set of registered classes, configured by name.

A run's encoders are named entries (`EncoderEntry`): the name (the "view") starts the names of the
entry's feature sets (`<name>.<encoder>.<output>`, e.g. `audio.hubert.mean`) and is their modality;
the encoder is a registered class (`extract.registry`), with its weights (`ModelSource`) and options.

    [extract]
    profile = "paper"                      # the paper's four views: audio, local, temporal, global
    [extract.encoders.audio]               # a view's weights: a hub id, a local folder or a weights file
    model = "/models/chinese-hubert-large"
    [extract.encoders.wav2vec2]            # a further entry: any registered encoder, here the generic one
    encoder = "hf"
    model = "facebook/wav2vec2-base"
    input = "waveform"
    layer = -1
    pooling = "mean"

- The profile gives the paper's views, each served by its encoder (`VIEW_ENCODERS`: audio hubert,
  local vit_mae, temporal videomae, global eva): `paper` with the hub ids in `PAPER`, `tiny` with
  random tiny models built locally (`extract.models.ensure_tiny`; tests and the demo only).
- A table named after a view replaces that view's weights (and, with `encoder = ...`, its encoder);
  any other name adds an entry, which must name its `encoder`. Keys: model, revision (hub ids),
  config (weights files), encoder, and the encoder's own options (`Options`, e.g. `HfOptions`).
- The built-in encoders are imported here, explicitly: `paper_encoders` (hubert, vit_mae, videomae,
  eva), `hf_encoder` (hf), `asr` (whisper: speech to a text set, the `[extract.asr]` entry) and `slow_device` (a sleep standing in for a busy GPU: benchmarks and tests
  of the overlap). A new encoder is one class with `@register_encoder` in its own file, plus its
  import below.

`check_available` checks every entry before anything loads: offline (HF_HUB_OFFLINE=1 or
`offline=True`), or when the hub does not answer one quick probe, a hub id missing from the local HF
cache is missing, and one `MissingWeightsError` lists every missing entry with one download hint
(`extract.sources`).

Torch, transformers, timm and huggingface_hub are imported inside functions: `import
extract.encoders` is cheap and sets nothing global.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from emollama.extract import asr, hf_encoder, paper_encoders, slow_device
from emollama.extract import settings as S
from emollama.extract.hf_encoder import HfEncoder, HfOptions
from emollama.extract.models import WeightsFileError, build_model, ensure_tiny
from emollama.store.cache import default_home
from emollama.extract.paper_encoders import (EVA_CLIP_MEAN, EVA_CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, EvaEncoder,
                                             HubertEncoder, MaeEncoder, VideoMaeEncoder)
from emollama.extract.registry import (ENCODERS, INPUTS, Encoder, EncoderInfo, OutputInfo, encoder_class,
                                       register_encoder)
from emollama.extract.sources import (DOWNLOAD_HINT, MissingModel, MissingWeightsError, ModelSource, cached_snapshot,
                                      config_identity, file_hash, file_sha256, folder_hash, hf_cache_dir, is_offline,
                                      local_only_reason, missing_models, source_name, weights_identity,
                                      write_json_atomic)

__all__ = [
    "ModelSource", "EncoderEntry", "EncoderTable", "EncodersConfig", "OutputInfo", "MissingWeightsError",
    "WeightsFileError", "PROFILES", "PAPER", "VIEWS", "VIEW_ENCODERS", "INPUTS", "ENCODERS", "profile",
    "parse_encoders", "resolve_encoders", "weights_identity", "file_hash", "folder_hash", "file_sha256",
    "is_offline", "hf_cache_dir", "cached_snapshot", "Encoder", "register_encoder", "encoder_class",
    "HubertEncoder", "MaeEncoder", "VideoMaeEncoder", "EvaEncoder", "HfEncoder", "HfOptions",
    "IMAGENET_MEAN", "IMAGENET_STD", "EVA_CLIP_MEAN", "EVA_CLIP_STD", "check_available", "missing_encoders",
    "MissingModel", "missing_models", "DOWNLOAD_HINT", "local_only_reason", "load_encoders",
    "load_encoder", "random_model", "random_encoder", "wrap_model", "EncoderInfo", "KnownOutputs",
    "known_outputs", "remember_outputs",
]

log = logging.getLogger(__name__)

# The built-in encoders: importing a module registers its classes (@register_encoder). A new
# encoder's module joins this tuple.
BUILTIN_MODULES = (paper_encoders, hf_encoder, asr, slow_device)

PROFILES = ("paper", "tiny")

# The paper's four views, each served by its encoder (the order of the tiny/paper profiles).
VIEW_ENCODERS = {"audio": "hubert", "local": "vit_mae", "temporal": "videomae", "global": "eva"}
VIEWS = tuple(VIEW_ENCODERS)

# The paper's public models, or the best public stand-ins.
PAPER = {
    # the paper's own checkpoint (Chinese HuBERT-large, fairseq-converted to transformers)
    "audio": "TencentGameMate/chinese-hubert-large",
    # stand-in: the paper's MAE was self-pretrained on MER2023 and is not public
    "local": "facebook/vit-mae-large",
    # stand-in: the paper's VideoMAE was self-pretrained on MER2023 and is not public
    "temporal": "MCG-NJU/videomae-large",
    # EVA01-CLIP-g/14 visual tower trained on LAION-400M: the same weights as BLIP-2/LAVIS's
    # `eva_vit_g.pth`, which MiniGPT-v2 (hence Emotion-LLaMA) loads. 40 blocks, 1408-d, patch 14,
    # trained at 224: the position embedding is resampled to 448 as MiniGPT-v2's interpolate_pos_embed
    # does (`extract.models.resample_pos_embed`, not timm's antialiased resample). The `.merged2b` tag is a later EVA-CLIP-g+ training (not
    # MiniGPT-v2's); `eva_giant_patch14_*.clip_ft_in1k` / `m30m_*` are ImageNet fine-tunes.
    "global": "timm/eva_giant_patch14_clip_224.laion400m",
}

SOURCE_KEYS = ("model", "revision", "config")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


# --- entries --------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncoderEntry:
    """One named encoder of a run: `name` (the view: its sets' first name part and modality), the
    registered `encoder`, its weights (`source`) and `options` (its class's Options, or None)."""

    name: str
    encoder: str
    source: ModelSource
    options: Any = None

    @property
    def cls(self) -> type[Encoder]:
        return encoder_class(self.encoder)

    @property
    def input(self) -> str:
        """The input kind the extraction step hands this encoder."""
        return self.cls.input_of(self.options)

    def to_dict(self) -> dict[str, Any]:
        """The entry as its config table: encoder, model (revision, config) and options."""
        return {"encoder": self.encoder, **self.source.to_dict(),
                **(S.to_dict(self.options) if self.options is not None else {})}

    def load(self, *, device: str = "auto", offline: bool | None = None, batch_size: int = 32,
             home: Path | None = None) -> Encoder:
        """The encoder, loaded (frozen, eval, fp16 on GPU), its modality set to this entry's name."""
        enc = self.cls.load(self.source, self.options, device=device, offline=offline, batch_size=batch_size,
                            home=home)
        enc.modality = self.name
        return enc


@dataclass(frozen=True)
class EncoderTable:
    """One `[extract.encoders.<name>]` table as written: the weights, the encoder (None: the profile's
    encoder of a paper view) and the encoder's options (checked)."""

    model: str                                  # a hub id, a local folder, or a weights file (.pth/.bin/.safetensors)
    revision: str | None = None                 # a hub revision (commit, tag or branch); part of the key
    config: str | None = None                   # a config folder for a weights file in the authors' layout
    encoder: str | None = None                  # a registered encoder (e.g. hf); unset: the profile's encoder of a paper view
    options: Any = None

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model, "revision": self.revision, "config": self.config}
        if self.encoder is not None:
            out["encoder"] = self.encoder
        if self.options is not None:
            out.update(S.to_dict(self.options))
        return out

    def source(self, base: Path | None = None) -> ModelSource:
        return ModelSource.from_value({k: v for k, v in (("model", self.model), ("revision", self.revision),
                                                         ("config", self.config)) if v is not None}, base=base)


def parse_table(name: str, value: Any, where: str, problems: list[str]) -> EncoderTable | None:
    """An `[extract.encoders.<name>]` table (or a bare model string), every problem added to `problems`."""
    if isinstance(value, EncoderTable):
        return value
    if isinstance(value, str):
        value = {"model": value}
    if not isinstance(value, Mapping) or value.get("model") is None:
        problems.append(f"{where}: expected a table with `model` (hub id, folder or weights file)")
        return None
    n = len(problems)
    for key in ("model", "encoder"):
        if value.get(key) is not None and not isinstance(value[key], str):
            problems.append(f"{where}.{key} = {value[key]!r}: expected a string")
    if len(problems) > n:
        return None
    if not _NAME.match(name):
        problems.append(f"{where}: the name {name!r} starts its feature sets' names: use letters, digits, _ and - "
                        "(starting with a letter)")
    encoder = value.get("encoder") or VIEW_ENCODERS.get(name)
    if encoder is None:
        problems.append(f"{where}: {name!r} is not one of the profile's views ({', '.join(VIEWS)}): set `encoder` "
                        f"(one of {', '.join(sorted(ENCODERS))})")
        return None
    if encoder not in ENCODERS:
        problems.append(f"{where}.encoder = {encoder!r}: unknown encoder; choose one of {', '.join(sorted(ENCODERS))}")
        return None
    cls = ENCODERS[encoder]
    rest = {k: v for k, v in value.items() if k not in SOURCE_KEYS and k != "encoder"}
    options = None
    if cls.Options is None:
        if rest:
            problems.append(f"{where}: unknown keys {sorted(rest)} (known: model, revision, config, encoder)")
    else:
        options = S.build(cls.Options, rest, where, problems)
        if options is not None:
            problems += S.problems(options, where)
    for key in ("revision", "config"):
        if value.get(key) is not None and not isinstance(value[key], str):
            problems.append(f"{where}.{key} = {value[key]!r}: expected a string")
    if len(problems) > n:
        return None
    return EncoderTable(str(value["model"]), value.get("revision"), value.get("config"),
                        value.get("encoder"), options)


def parse_encoders(value: Any, where: str, problems: list[str]) -> dict[str, EncoderTable]:
    """The `[extract.encoders]` tables by name (problems listed, bad tables left out)."""
    if not isinstance(value, Mapping):
        problems.append(f"{where}: expected tables [{where}.<name>]")
        return {}
    out = {}
    for name, table in value.items():
        parsed = parse_table(str(name), table, f"{where}.{name}", problems)
        if parsed is not None:
            out[str(name)] = parsed
    return out


# --- the encoders of a run -------------------------------------------------------------------

@dataclass(frozen=True)
class EncodersConfig:
    """The encoders of a run, in order: the profile's four views, then the further named entries."""

    entries: tuple[EncoderEntry, ...]

    def __post_init__(self) -> None:
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise ValueError(f"two encoders share a name: {names}")

    def __iter__(self) -> Iterator[EncoderEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entries)

    def entry(self, name: str) -> EncoderEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise ValueError(f"no encoder named {name!r}: the run has {', '.join(self.names)}")

    def source(self, name: str) -> ModelSource:
        return self.entry(name).source

    def to_dict(self) -> dict[str, Any]:
        return {e.name: e.to_dict() for e in self.entries}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, base: Path | None = None,
                  home: Path | None = None) -> "EncodersConfig":
        """From {"profile": "paper"|"tiny" (optional), "<name>": table or model string, ...}.

        Paper views not given come from the profile (default "paper"); a relative folder or file is
        taken relative to `base` when it exists there. Every problem is listed at once (ValueError)."""
        problems: list[str] = []
        tables = parse_encoders({("global" if k == "global_" else k): v for k, v in d.items() if k != "profile"},
                                "encoders", problems)
        if problems:
            raise ValueError("invalid encoders config:\n" + "\n".join(f"  - {p}" for p in problems))
        return resolve_encoders(d.get("profile", "paper"), tables, base=base, home=home)


def profile(name: str, *, home: Path | None = None) -> EncodersConfig:
    """The named set of encoder sources for the paper's views.

    "paper": the hub ids in `PAPER`. "tiny": tiny random models, built on first use under
    `<home>/models/tiny/<view>` (home: env EMOLLAMA_HOME or ~/.cache/emollama); tests and demo only.
    """
    if name not in PROFILES:
        raise ValueError(f"unknown encoders profile {name!r}: choose one of {', '.join(PROFILES)}")
    def source(view: str) -> ModelSource:
        return ModelSource(PAPER[view] if name == "paper" else str(ensure_tiny(view, home)))

    return EncodersConfig(tuple(EncoderEntry(v, enc, source(v)) for v, enc in VIEW_ENCODERS.items()))


def resolve_encoders(profile_name: str, tables: Mapping[str, EncoderTable], *, base: Path | None = None,
                     home: Path | None = None) -> EncodersConfig:
    """The profile's views, each replaced by its table when given, then the other tables in order."""
    if profile_name not in PROFILES:
        raise ValueError(f"unknown encoders profile {profile_name!r}: choose one of {', '.join(PROFILES)}")
    base_cfg = profile(profile_name, home=home) if any(v not in tables for v in VIEWS) else None
    entries = []
    for view in VIEWS:
        t = tables.get(view)
        entries.append(base_cfg.entry(view) if t is None else
                       EncoderEntry(view, t.encoder or VIEW_ENCODERS[view], t.source(base), t.options))
    for name, t in tables.items():
        if name not in VIEW_ENCODERS:
            entries.append(EncoderEntry(name, t.encoder, t.source(base), t.options))
    return EncodersConfig(tuple(entries))


# --- loading ---------------------------------------------------------------------------------

def _entry(view: str | EncoderEntry, source: ModelSource | None, options: Any = None) -> EncoderEntry:
    if isinstance(view, EncoderEntry):
        return view
    if view not in VIEW_ENCODERS:
        raise ValueError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)} (or pass an EncoderEntry)")
    if source is None:
        raise ValueError(f"load_encoder({view!r}) needs a ModelSource")
    return EncoderEntry(view, VIEW_ENCODERS[view], source, options)


def load_encoder(view: str | EncoderEntry, source: ModelSource | None = None, *, device: str = "auto",
                 offline: bool | None = None, batch_size: int = 32, home: Path | None = None) -> Encoder:
    """Load one encoder: an EncoderEntry, or a paper view's encoder from `source` (a hub id, local
    folder or weights file); frozen, eval, fp16 on GPU."""
    return _entry(view, source).load(device=device, offline=offline, batch_size=batch_size, home=home)


def config_problem(folder: Path) -> str | None:
    """What is wrong with a model folder's config.json (None: nothing, or there is none: loading says so).
    It must be a JSON object that names its model (transformers' `model_type`, timm's `architecture`):
    a config of `{}` would build the class's default geometry and fail on the weights' shapes."""
    file = folder / "config.json"
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        return f"{file} is not readable JSON ({e})"
    if not isinstance(meta, dict) or not (meta.get("model_type") or meta.get("architecture")):
        return f"{file} names no model (neither transformers' model_type nor timm's architecture)"
    return None


def missing_encoders(cfg: EncodersConfig, reason: str | None) -> list[MissingModel]:
    """The entries of `cfg` whose weights are not here: a path that does not exist, or, when models must
    come from local files (`reason`, from `sources.local_only_reason`), a hub id not in the HF cache."""
    out = []
    for entry in cfg:
        source = entry.source
        role = entry.cls.role or f"the {entry.name} encoder ({entry.encoder})"
        setting = f"[{entry.cls.table or f'extract.encoders.{entry.name}'}] model = DIR"
        try:
            local = source.local_path()
        except FileNotFoundError:
            out.append(MissingModel(source_name(source), role, setting, "no such folder or weights file"))
            continue
        except ValueError:
            out.append(MissingModel(source_name(source), role, setting, "a file, but not a weights file"))
            continue
        folder = local if local is not None else cached_snapshot(source.model, source.revision)
        if folder is None and reason is not None:
            out.append(MissingModel(source_name(source), role, setting))
        elif folder is not None and folder.is_dir() and (why := config_problem(folder)):
            out.append(MissingModel(source_name(source), role, setting, f"{why}: restore the model's own "
                                    "config.json (download the model again) or point the setting at a complete folder"))
    return out


def check_available(cfg: EncodersConfig, *, offline: bool | None = None) -> bool:
    """Check every encoder's weights before anything is loaded or written: one MissingWeightsError lists
    all the missing ones. Offline, or when the hub does not answer one quick probe, hub ids must be in the
    HF cache. Returns True when the encoders must then load from local files only."""
    reason = local_only_reason(offline) if any(e.source.on_hub() for e in cfg) else None
    missing = missing_encoders(cfg, reason)
    if missing:
        raise missing_models(missing, reason)
    return reason is not None


def load_encoders(cfg: EncodersConfig, *, device: str = "auto", offline: bool | None = None,
                  batch_size: int = 32, home: Path | None = None) -> dict[str, Encoder]:
    """Every encoder of `cfg`, keyed by entry name ("audio", "local", "temporal", "global", ...).

    Every source is checked before any model loads, so missing checkpoints fail at once, all named.
    """
    offline = check_available(cfg, offline=offline) or is_offline(offline)
    return {e.name: e.load(device=device, offline=offline, batch_size=batch_size, home=home) for e in cfg}


# --- what a run's encoders produce, known without loading them ------------------------------------
#
# A rerun with nothing to do still needs its feature-set keys, and a key holds what the encoder says of
# itself once loaded (output shapes, params, layer...). `EncoderInfo`s are cached in
# `<home>/encoder_outputs.json`, keyed by everything that decides them: the encoder class, the weights
# identity (local files hashed once per path/size/mtime, `sources._HashCache`; hub ids by commit), the
# config a weights file names, the options, the device and the code (extract/*.py by size and mtime, and
# the torch / transformers / timm versions). Anything new is a miss: the encoder is loaded once and its
# description stored. A damaged file or entry is a miss too, and is rewritten.

OUTPUTS_FILE = "encoder_outputs.json"
OUTPUTS_FORMAT = 1
OUTPUTS_KEEP = 256        # entries kept (the newest); older weights and code versions fall out
GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")   # NVIDIA, ROCm, WSL


def device_key(device: str) -> str:
    """What decides the device (hence the compute dtype) of `device`, read without importing torch:
    the name itself, or for "auto" the GPU device nodes present and the visible-device variables."""
    if device != "auto":
        return device
    nodes = [n for n in GPU_NODES if os.path.exists(n)]
    env = {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES") if k in os.environ}
    try:   # a driver installed or updated since: another entry (torch may see the GPU now)
        driver = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        driver = None
    return "auto:" + json.dumps({"nodes": nodes, "driver": driver, **env}, sort_keys=True)


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("emollama", "torch", "transformers", "timm"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def code_identity(cls: type[Encoder]) -> str:
    """The code that describes an encoder: this package's extract modules and the class's own module
    (by path, size and mtime: an edited file is a new identity), and the library versions."""
    files = sorted(Path(__file__).resolve().parent.glob("*.py"))
    own = sys.modules.get(cls.__module__)
    if own is not None and getattr(own, "__file__", None):
        files.append(Path(own.__file__).resolve())
    stats = []
    for f in files:
        try:
            st = f.stat()
            stats.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((str(f), None, None))
    blob = json.dumps({"files": stats, "versions": _versions()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass
class KnownOutputs:
    """The cached descriptions of a run's encoders (`known_outputs`): `infos` holds the hits; `complete`
    when every entry has one, so the feature-set keys need no model."""

    keys: dict[str, str]                 # entry name -> its cache key (absent: its identity could not be read)
    identities: dict[str, str]           # entry name -> weights identity
    infos: dict[str, EncoderInfo]        # entry name -> cached description
    file: Path
    names: tuple[str, ...] = ()          # every entry of the run, in order

    @property
    def complete(self) -> bool:
        return bool(self.names) and all(n in self.infos for n in self.names)

    @property
    def missing(self) -> list[str]:
        return [n for n in self.names if n not in self.infos]


def _read_outputs(file: Path) -> dict[str, Any]:
    """The cache's entries, or {} when the file is absent, damaged or of another format."""
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != OUTPUTS_FORMAT or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _outputs_key(entry: EncoderEntry, identity: str, config_id: str | None, device: str) -> str:
    cls = entry.cls
    key = {"class": f"{cls.__module__}.{cls.__qualname__}", "encoder": entry.encoder, "weights": identity,
           "config": config_id, "options": S.to_dict(entry.options) if entry.options is not None else None,
           "device": device_key(device), "code": code_identity(cls)}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def known_outputs(cfg: EncodersConfig, *, device: str = "auto", offline: bool | None = None,
                  home: Path | None = None) -> KnownOutputs:
    """What each encoder of `cfg` outputs, from the cache, without building any model. Never raises: an
    entry whose identity cannot be read here (a path only workers see, a hub that cannot be asked) or
    that has no valid cached description is a miss, and the caller loads it (`remember_outputs`)."""
    offline = is_offline(offline)
    file = (Path(home) if home is not None else default_home()) / OUTPUTS_FILE
    entries = _read_outputs(file)
    known = KnownOutputs({}, {}, {}, file, cfg.names)
    for e in cfg:
        try:
            identity = weights_identity(e.source, offline=offline, home=home)
            key = _outputs_key(e, identity, config_identity(e.source, home=home), device)
        except Exception as err:  # noqa: BLE001 - a miss: loading the encoder reports what is wrong
            log.debug("no cached outputs for %s: %s: %s", e.name, type(err).__name__, err)
            continue
        known.keys[e.name], known.identities[e.name] = key, identity
        hit = entries.get(key)
        if not isinstance(hit, dict):
            continue
        try:
            info = EncoderInfo.from_dict(hit.get("info"))
        except ValueError as err:
            log.warning("ignoring a damaged entry for %s in %s (%s): the encoder is loaded and the entry rewritten",
                        e.name, file, err)
            continue
        if info.weights == identity and info.name == e.encoder:
            known.infos[e.name] = info
    return known


def remember_outputs(known: KnownOutputs, infos: Mapping[str, EncoderInfo]) -> None:
    """Store the descriptions of loaded encoders (`infos`, e.g. `extract.step.describe_encoders`) under
    the keys `known_outputs` computed; an info whose weights differ from the identity of its key (the
    hub moved in between) is not stored."""
    new, stored = {}, {}
    for name, key in known.keys.items():
        info = infos.get(name)
        if info is None or info.weights != known.identities[name]:
            continue
        stored[name] = info
        cached = known.infos.get(name)
        if cached is None or _canonical(cached) != _canonical(info):
            new[key] = {"info": info.to_dict(), "saved_ns": time.time_ns()}
    known.infos.update(stored)
    if not new:
        return
    entries = {k: v for k, v in _read_outputs(known.file).items() if isinstance(v, dict)}
    entries.update(new)
    if len(entries) > OUTPUTS_KEEP:
        newest = sorted(entries, key=lambda k: entries[k].get("saved_ns") or 0)[-OUTPUTS_KEEP:]
        entries = {k: entries[k] for k in newest}
    write_json_atomic(known.file, {"format": OUTPUTS_FORMAT, "entries": entries}, what="the encoder outputs cache")


def _canonical(info: EncoderInfo) -> str:
    return json.dumps(info.to_dict(), sort_keys=True, default=str)


# --- random models (benchmarks) ---------------------------------------------------------------

def random_model(view: str, size: str = "large"):
    """A randomly initialised model of real size (no download): "large" for audio/local/temporal
    (HuBERT-large, ViT-MAE-large, VideoMAE-large), "giant" for global (EVA-g, 40 blocks), or "tiny"."""
    return build_model(view, size)


def wrap_model(view: str, model, *, weights: str, device: str = "auto", batch_size: int = 32) -> Encoder:
    """Wrap an in-memory model as a paper view's Encoder (defaults: normalised audio, ImageNet stats)."""
    if view not in VIEW_ENCODERS:
        raise ValueError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)}")
    enc = encoder_class(VIEW_ENCODERS[view])(model, weights=weights, device=device, batch_size=batch_size)
    enc.modality = view
    return enc


def random_encoder(view: str, size: str = "large", *, device: str = "auto", batch_size: int = 32) -> Encoder:
    """`random_model` wrapped as an Encoder; weights identity "random:<view>-<size>"."""
    return wrap_model(view, random_model(view, size), weights=f"random:{view}-{size}", device=device,
                      batch_size=batch_size)
