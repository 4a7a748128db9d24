"""The four frozen encoders of Emotion-LLaMA, their sources (profiles), and weight identities.

One small class per view, each declaring its name, modality, output dim, outputs (with pooling and
per-clip shape), layer and value-determining params, and the identity of its weights:

| view     | class             | model                         | input per clip                  | outputs                          |
|----------|-------------------|-------------------------------|---------------------------------|----------------------------------|
| audio    | `HubertEncoder`   | transformers HubertModel      | float32 mono 16 kHz waveform    | frames [T, D] (50/s), mean [D]   |
| local    | `MaeEncoder`      | transformers ViTMAEModel      | uint8 face crops [N, 224, 224, 3] | mean [D]                       |
| temporal | `VideoMaeEncoder` | transformers VideoMAEModel    | uint8 face frames [16, 224, 224, 3] | mean [D]                     |
| global   | `EvaEncoder`      | timm Eva (EVA-CLIP-g/14)      | one uint8 frame [H, W, 3]       | tokens [1025, D] (CLS first)     |

Choices (documented here because they change values):
- local: per frame, the mean of ViT-MAE's final-norm *patch* tokens (CLS excluded: MAE's CLS token
  is never trained by a loss, so it carries little), then the mean over frames. No masking
  (mask_ratio 0) and a fixed increasing `noise` ramp, so the patches stay in their natural order and
  the output is deterministic (ViTMAE shuffles patches on every call otherwise).
- global: MiniGPT-v2 builds EVA-CLIP-g with its last block dropped (39 of 40) and applies its own
  `ln_vision` afterwards, on the projector side. So this encoder keeps all blocks but the last,
  without the final norm, at 448x448 (the whole frame resized, bicubic, as MiniGPT-v2 does, with
  the EVA-CLIP normalisation). The rule is "all blocks but the last" (`params["blocks"]`), which
  is 39 for the real 40-block model and 2 for the 3-block tiny one.
- audio: waveforms are normalised to zero mean / unit variance per clip (as Wav2Vec2FeatureExtractor
  does when the folder's `preprocessor_config.json` says `do_normalize`, or has none), then cut into
  windows of 30 s that overlap by the conv stack's receptive field minus its hop (80 samples), so
  the concatenated frames are exactly those of the whole clip's conv grid (frame i starts at sample
  320 i) while attention stays within a window. Audio shorter than the receptive field (400
  samples = 25 ms) is zero-padded to it (one frame).

- global position embedding: a checkpoint trained at 224 (16x16 patches) is resized to 32x32 as the
  released model does (LAVIS `interpolate_pos_embed`): fp32, bicubic, align_corners False, no
  antialias, CLS position kept (`extract.models.resample_pos_embed`), for weights files and timm
  folders/hub ids alike (timm's own resample uses antialias, which gives other values).

Sources (`ModelSource`): a hub id, a local transformers/timm folder, or, for the local, temporal
and global views, one local weights FILE in its authors' original key layout, converted on load:

    [extract.encoders.global]
    model = "/ckpt/eva_vit_g.pth"
    [extract.encoders.local]
    model = "/ckpt/mae_340.pth"
    config = "/models/vit-mae-large"     # optional: a folder with a HF/timm config.json (or the json)

- .pth/.pt/.bin are read with torch.load(weights_only=True) (an argparse `args` Namespace, as the
  MAE/VideoMAE training scripts save, is allowed; any other pickled code is refused), .safetensors
  with safetensors. A top-level "model" / "module" / "state_dict" dict is unwrapped.
- global: EVA's original layout (LAVIS `eva_vit_g.pth`: `cls_token`, `pos_embed`,
  `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.q_bias,attn.v_bias,attn.proj,norm2,mlp.fc1,
  mlp.fc2}.*`, fp16) -> timm Eva at 448 with depth = the blocks in the file, fp32; the encoder then
  keeps all blocks but the last (39 of 40). Dropped: final norm, heads, mask token.
- local: the MAE repository's `{"model": {...}}` (timm ViT names, fused qkv weight+bias, `norm.*`)
  -> transformers ViTMAEModel. Dropped: the decoder (`decoder_*`), `mask_token`, a `head`.
- temporal: the VideoMAE repository's `encoder.*` (Conv3d patch_embed, qkv weight + q_bias/v_bias,
  `encoder.norm.*`; or a fine-tuned file with `fc_norm`) -> transformers VideoMAEModel. Dropped:
  the decoder (`decoder.*`, `encoder_to_decoder.*`), `mask_token`, `head`, `fc_norm`, and a stored
  sinusoid `pos_embed` (checked).
- Width, depth, MLP width, patch size, image size (from pos_embed), tubelet, channels and biases
  are read from the tensor shapes. What shapes cannot tell comes from `config` when given, else
  from the defaults: heads = width // 64 (1408 -> 16 for EVA-g, 1280 -> 16), LayerNorm eps 1e-6
  and exact GELU (the original repositories'), VideoMAE 16 frames at 224. A missing or mis-shaped
  key, or an unknown one, fails with `WeightsFileError` naming the keys.
- identity: "sha256:<hex of the file>" (hashed once, cached like folders); the converted
  architecture details (format, heads, eps, ...) go into `params["checkpoint"]`.

Profiles: `paper` (hub ids) and `tiny` (random tiny models built locally, see `extract.models`).
Offline (HF_HUB_OFFLINE=1 or `offline=True`) a hub id missing from the local HF cache raises
`MissingWeightsError` at once.

Torch, transformers, timm and huggingface_hub are imported inside functions: `import
extract.encoders` is cheap and sets nothing global.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from emollama.extract.models import (EVA_IMG_SIZE, VIEWS, WEIGHT_SUFFIXES, WeightsFileError, build_model, default_home,
                            ensure_tiny)

log = logging.getLogger(__name__)

__all__ = [
    "ModelSource", "EncodersConfig", "OutputInfo", "MissingWeightsError", "WeightsFileError", "PROFILES",
    "profile", "weights_identity", "file_hash", "folder_hash", "Encoder", "HubertEncoder", "MaeEncoder", "VideoMaeEncoder", "EvaEncoder",
    "load_encoders", "load_encoder", "random_model", "random_encoder", "wrap_model",
]

PROFILES = ("paper", "tiny")

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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVA_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
EVA_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


# --- sources and profiles --------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSource:
    """A hub id ("org/name", optionally pinned by `revision`), a local folder, or a local weights file.

    A weights file (.pth/.pt/.bin/.safetensors, local/temporal/global views only) is a checkpoint in
    its authors' original layout; `config` optionally names a folder holding a config.json (or the
    json file) for what the tensor shapes cannot tell, e.g. the number of attention heads.
    """

    model: str
    revision: str | None = None
    config: str | None = None

    def local_path(self) -> Path | None:
        """The folder or weights file `model` names (resolved), or None for a hub id."""
        p = Path(self.model).expanduser()
        if p.is_dir():
            return p.resolve()
        if p.is_file():
            if p.suffix.lower() not in WEIGHT_SUFFIXES:
                raise ValueError(f"model {self.model!r} is a file but not a weights file "
                                 f"({', '.join(WEIGHT_SUFFIXES)}): point it at a checkpoint file or a model folder")
            return p.resolve()
        if p.suffix.lower() in WEIGHT_SUFFIXES or not _HUB_ID.match(self.model):
            raise FileNotFoundError(
                f"model {self.model!r} is neither an existing folder, nor an existing weights file "
                f"({', '.join(WEIGHT_SUFFIXES)}), nor a hub id of the form 'org/name': fix the path in the "
                "encoders config"
            )
        return None

    def weights_file(self) -> Path | None:
        """The weights file if `model` names one, else None (a folder or a hub id)."""
        local = self.local_path()
        return local if local is not None and local.is_file() else None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_value(cls, value: str | Mapping[str, Any] | "ModelSource", *,
                   base: Path | None = None) -> "ModelSource":
        """From "org/name", "path/to/folder", "path/to/file.pth", or a dict
        {"model": ..., "revision": ... (hub ids), "config": ... (weights files)}.

        A relative folder or file (model or config) is taken relative to `base` (e.g. the config
        file's folder) when it exists there.
        """
        if isinstance(value, ModelSource):
            return value
        if isinstance(value, str):
            model, revision, config = value, None, None
        else:
            unknown = set(value) - {"model", "revision", "config"}
            if unknown or "model" not in value:
                raise ValueError(f"an encoder source needs 'model' (and optionally 'revision' for a hub id or "
                                 f"'config' for a weights file), got {dict(value)}")
            model, revision, config = value["model"], value.get("revision"), value.get("config")

        def rebase(path: str) -> str:
            if base is not None and not Path(path).expanduser().is_absolute() and (Path(base) / path).exists():
                return str((Path(base) / path).resolve())
            return str(path)

        return cls(rebase(str(model)), revision, None if config is None else rebase(str(config)))


@dataclass(frozen=True)
class EncodersConfig:
    """One model source per view. As a dict/JSON/TOML: keys audio, local, temporal, global."""

    audio: ModelSource
    local: ModelSource
    temporal: ModelSource
    global_: ModelSource

    def source(self, view: str) -> ModelSource:
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)}")
        return getattr(self, "global_" if view == "global" else view)

    def to_dict(self) -> dict[str, Any]:
        return {v: self.source(v).to_dict() for v in VIEWS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, base: Path | None = None,
                  home: Path | None = None) -> "EncodersConfig":
        """From {"profile": "paper"|"tiny" (optional), "audio": ..., "local": ..., ...}.

        Views not given come from the profile (default "paper"); each given view is a hub id, a
        folder, a weights file, or {"model": ..., "revision": ..., "config": ...}.
        """
        unknown = set(d) - set(VIEWS) - {"profile", "global_"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in encoders config: expected profile, "
                             f"{', '.join(VIEWS)}")
        given = {("global" if k == "global_" else k): v for k, v in d.items() if k != "profile"}
        base_cfg = None
        if len(given) < len(VIEWS):
            base_cfg = profile(d.get("profile", "paper"), home=home)
        sources = {v: (ModelSource.from_value(given[v], base=base) if v in given else base_cfg.source(v))
                   for v in VIEWS}
        return cls(sources["audio"], sources["local"], sources["temporal"], sources["global"])


def profile(name: str, *, home: Path | None = None) -> EncodersConfig:
    """The named set of encoder sources.

    "paper": the hub ids in `PAPER`. "tiny": tiny random models, built on first use under
    `<home>/models/tiny/<view>` (home: env EMOLLAMA_HOME or ~/.cache/emollama); tests and demo only.
    """
    if name == "paper":
        return EncodersConfig(*(ModelSource(PAPER[v]) for v in VIEWS))
    if name == "tiny":
        return EncodersConfig(*(ModelSource(str(ensure_tiny(v, home))) for v in VIEWS))
    raise ValueError(f"unknown encoders profile {name!r}: choose one of {', '.join(PROFILES)}")


# --- the Hugging Face cache and weight identities --------------------------------------------

class MissingWeightsError(RuntimeError):
    """A checkpoint is not available locally and may not be downloaded."""


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def is_offline(offline: bool | None = None) -> bool:
    """`offline` if given, else env HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE (read now, not at import)."""
    if offline is not None:
        return offline
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hf_cache_dir() -> Path:
    """The HF hub cache, resolved from the environment now (huggingface_hub freezes it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def cached_snapshot(repo_id: str, revision: str | None = None, cache_dir: Path | None = None) -> Path | None:
    """The snapshot folder of `repo_id` at `revision` (default main) in the local HF cache, or None."""
    repo = Path(cache_dir or hf_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    rev = revision or "main"
    if _SHA.match(rev):
        sha = rev
    else:
        try:
            sha = (repo / "refs" / rev).read_text().strip()
        except OSError:
            return None
    snap = repo / "snapshots" / sha
    return snap if (snap / "config.json").is_file() else None


def _missing(source: ModelSource, cache_dir: Path, why: str) -> MissingWeightsError:
    rev = f" --revision {source.revision}" if source.revision else ""
    return MissingWeightsError(
        f"{source.model}{'@' + source.revision if source.revision else ''}: {why} (HF cache: {cache_dir}). "
        f"Supply it by running `hf download {source.model}{rev}` on a machine with internet and copying "
        f"its HF cache (~/.cache/huggingface/hub, or $HF_HOME/hub) to this machine, or set a local "
        f"folder for this encoder in the encoders config file."
    )


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _HashCache:
    """Per-file sha256 hashes cached in `<home>/hashes.json`, keyed by (resolved path, size, mtime_ns)."""

    def __init__(self, home: Path | None):
        self.home = Path(home) if home is not None else default_home()
        self.file = self.home / "hashes.json"
        try:
            self.cache = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.cache = {}
        self.changed = False

    def digest(self, path: Path) -> str:
        real = Path(path).resolve()
        st = real.stat()
        hit = self.cache.get(str(real))
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return hit["sha256"]
        digest = file_sha256(real)
        self.cache[str(real)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        try:
            self.home.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".hashes-", suffix=".json", dir=self.home)
            with os.fdopen(fd, "w") as f:
                json.dump(self.cache, f, indent=0, sort_keys=True)
            os.replace(tmp, self.file)
        except OSError as e:  # a read-only home only costs re-hashing
            log.warning("could not write the hash cache %s: %s", self.file, e)


def file_hash(path: Path, *, home: Path | None = None) -> str:
    """"sha256:<hex of the file's bytes>", through the same per-file cache as `folder_hash`."""
    cache = _HashCache(home)
    digest = cache.digest(Path(path))
    cache.save()
    return "sha256:" + digest


def folder_hash(folder: Path, *, home: Path | None = None) -> str:
    """sha256 over sorted (relative path, sha256 of file) of a folder's files.

    Files and folders whose name starts with "." are skipped (e.g. `.cache/huggingface`), symlinks are
    followed (HF snapshots are links into blobs). Per-file hashes are cached in `<home>/hashes.json`,
    keyed by (resolved path, size, mtime_ns), so multi-GB checkpoints are hashed once.
    """
    folder = Path(folder)
    cache = _HashCache(home)
    entries = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = Path(root) / name
            entries.append((path.relative_to(folder).as_posix(), cache.digest(path)))
    if not entries:
        raise FileNotFoundError(f"model folder {folder} has no files")
    cache.save()
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(f"{rel}\t{digest}\n".encode())
    return "sha256:" + h.hexdigest()


def weights_identity(source: ModelSource, *, offline: bool, home: Path | None = None) -> str:
    """"sha256:<hex>" for a local folder (see `folder_hash`) or weights file (the file's sha256, see
    `file_hash`); "hub:<id>@<commit>" for a hub id.

    A hub id's commit comes from the local HF cache when offline (MissingWeightsError at once when
    absent) and from the hub when online (falling back to the cache if the hub cannot be reached).
    """
    local = source.local_path()
    if local is not None:
        return file_hash(local, home=home) if local.is_file() else folder_hash(local, home=home)
    cache_dir = hf_cache_dir()
    snap = cached_snapshot(source.model, source.revision, cache_dir)
    if offline:
        if snap is None:
            raise _missing(source, cache_dir, "not in the local HF cache and offline")
        return f"hub:{source.model}@{snap.name}"
    if source.revision and _SHA.match(source.revision):
        return f"hub:{source.model}@{source.revision}"
    from huggingface_hub import HfApi
    try:
        sha = HfApi().model_info(source.model, revision=source.revision).sha
    except Exception as e:
        if snap is not None:
            log.warning("hub unreachable for %s (%s): using the cached snapshot %s", source.model, e, snap.name)
            return f"hub:{source.model}@{snap.name}"
        raise _missing(source, cache_dir, f"the hub could not be asked ({type(e).__name__}: {e})") from e
    return f"hub:{source.model}@{sha}"


# --- encoders --------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputInfo:
    """One output of an encoder: how it pools, and its per-clip shape (None = varies per clip)."""

    pooling: str
    shape: tuple[int | None, ...]


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _resize_uint8(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an [H, W, 3] uint8 frame to (height, width), PIL bicubic (as torchvision on PIL images)."""
    if frame.shape[:2] == size:
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.BICUBIC))


def _check_frames(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != np.uint8 or a.shape[-1] != 3:
        raise ValueError(f"{what}: expected uint8 RGB frames [..., H, W, 3], got {a.dtype} {a.shape}")
    return a


class Encoder:
    """A frozen encoder. Subclasses fill the declared attributes and `_encode`."""

    name: ClassVar[str]
    modality: ClassVar[str]
    frame_rate: float | None = None

    def __init__(self, model, *, weights: str, device: str = "auto", batch_size: int = 32):
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = _resolve_device(device)
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weights = weights
        self.batch_size = batch_size
        self.dim: int = 0
        self.layer: str = ""
        self.outputs: dict[str, OutputInfo] = {}
        self.params: dict[str, Any] = {}

    @property
    def compute_dtype(self) -> str:
        """"float16" on GPU, "float32" on CPU (not in params: values agree to fp16 precision)."""
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of everything that determines the values."""
        return {
            "name": self.name, "modality": self.modality, "dim": self.dim, "frame_rate": self.frame_rate,
            "layer": self.layer, "params": self.params, "weights": self.weights,
            "outputs": {k: {"pooling": o.pooling, "shape": list(o.shape)} for k, o in self.outputs.items()},
        }

    def encode(self, inputs: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        """One dict of float32 arrays (keys = `outputs`) per input clip, batched across clips."""
        import torch

        if len(inputs) == 0:
            return []
        with torch.inference_mode():
            return self._encode(list(inputs))

    def _encode(self, inputs: list) -> list[dict[str, np.ndarray]]:
        raise NotImplementedError

    def _pixels(self, frames: np.ndarray, mean, std):
        """uint8 [..., H, W, 3] -> normalised float tensor [..., 3, H, W] on the device."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)
        x = x.to(torch.float32).div_(255.0)
        x = (x - torch.tensor(mean, device=self.device)) / torch.tensor(std, device=self.device)
        return x.movedim(-1, -3).to(self.dtype)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, device={self.device!r}, weights={self.weights!r})"


class HubertEncoder(Encoder):
    """HuBERT, last hidden layer: "frames" [T, D] at 50/s and "mean" [D] over all frames."""

    name = "hubert"
    modality = "audio"

    def __init__(self, model, *, weights: str, normalize: bool = True, sample_rate: int = 16000,
                 window_s: float = 30.0, device: str = "auto", batch_size: int = 32):
        super().__init__(model, weights=weights, device=device, batch_size=batch_size)
        cfg = model.config
        self.hop = int(np.prod(cfg.conv_stride))
        # receptive field of the conv stack, in samples
        rf, jump = 1, 1
        for k, s in zip(cfg.conv_kernel, cfg.conv_stride):
            rf += (k - 1) * jump
            jump *= s
        self.receptive = rf
        self.sample_rate = sample_rate
        self.normalize = normalize
        self.window_frames = max(1, int(round(window_s * sample_rate / self.hop)))
        # group-norm feature encoders (hubert-base) normalise over time: padding would leak between
        # batch mates, so those run one window at a time
        self.batched = cfg.feat_extract_norm == "layer"
        self.dim = cfg.hidden_size
        self.frame_rate = sample_rate / self.hop
        self.layer = "last_hidden_state"
        self.outputs = {"frames": OutputInfo("none", (None, self.dim)), "mean": OutputInfo("mean", (self.dim,))}
        self.params = {
            "sample_rate": sample_rate, "normalize": normalize,
            "window_s": self.window_frames * self.hop / sample_rate,
            "window_overlap_samples": rf - self.hop, "hop_samples": self.hop,
            "min_samples": rf, "short_audio": "zero-padded to min_samples",
        }

    def _windows(self, wave: Any, i: int) -> list[np.ndarray]:
        x = np.asarray(wave, dtype=np.float32)
        if x.ndim != 1:
            raise ValueError(f"audio clip {i}: expected a mono waveform [samples], got shape {x.shape}")
        if x.size == 0:
            raise ValueError(f"audio clip {i}: empty waveform")
        if self.normalize:  # as Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
            x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        if x.size < self.receptive:
            x = np.pad(x, (0, self.receptive - x.size))
        n = (x.size - self.receptive) // self.hop + 1
        out = []
        for f0 in range(0, n, self.window_frames):
            f1 = min(f0 + self.window_frames, n)
            out.append(x[f0 * self.hop:(f1 - 1) * self.hop + self.receptive])
        return out

    def _encode(self, inputs):
        import torch

        items = [(ci, wi, w) for ci, wave in enumerate(inputs) for wi, w in enumerate(self._windows(wave, ci))]
        results: dict[tuple[int, int], np.ndarray] = {}
        if self.batched:
            # longest first; a chunk holds at most batch_size windows and ~4 windows' worth of padded
            # samples, so a batch of long clips does not build batch_size full-window attentions at once
            budget = 4 * (self.window_frames * self.hop + self.receptive)
            chunks: list[list] = []
            for t in sorted(items, key=lambda t: -t[2].size):
                if chunks and len(chunks[-1]) < self.batch_size and \
                        (len(chunks[-1]) + 1) * chunks[-1][0][2].size <= budget:
                    chunks[-1].append(t)
                else:
                    chunks.append([t])
        else:
            chunks = [[t] for t in items]
        for chunk in chunks:
            longest = max(t[2].size for t in chunk)
            x = np.zeros((len(chunk), longest), np.float32)
            mask = np.zeros((len(chunk), longest), np.int64)
            for j, (_, _, w) in enumerate(chunk):
                x[j, :w.size] = w
                mask[j, :w.size] = 1
            xt = torch.from_numpy(x).to(self.device, self.dtype)
            kwargs = {"attention_mask": torch.from_numpy(mask).to(self.device)} if len(chunk) > 1 else {}
            hidden = self.model(xt, **kwargs).last_hidden_state.float().cpu().numpy()
            for j, (ci, wi, w) in enumerate(chunk):
                n = (w.size - self.receptive) // self.hop + 1
                results[(ci, wi)] = hidden[j, :n]
        out = []
        for ci in range(len(inputs)):
            frames = np.concatenate([results[k] for k in sorted(k for k in results if k[0] == ci)])
            out.append({"frames": frames, "mean": frames.mean(axis=0)})
        return out


class MaeEncoder(Encoder):
    """ViT-MAE without masking: per frame the mean of final-norm patch tokens, then mean over frames."""

    name = "vit_mae"
    modality = "local"

    def __init__(self, model, *, weights: str, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 device: str = "auto", batch_size: int = 32):
        model.config.mask_ratio = 0.0
        super().__init__(model, weights=weights, device=device, batch_size=batch_size)
        cfg = model.config
        self.size = int(cfg.image_size)
        self.n_patches = (self.size // int(cfg.patch_size)) ** 2
        self.mean, self.std = tuple(mean), tuple(std)
        self.dim = cfg.hidden_size
        self.layer = "last_hidden_state (final norm)"
        self.outputs = {"mean": OutputInfo("mean", (self.dim,))}
        self.params = {
            "image_size": self.size, "resize": "bicubic if not image_size", "mean": list(self.mean),
            "std": list(self.std), "mask_ratio": 0.0, "noise": "increasing ramp (patch order kept)",
            "tokens": "patches (CLS excluded)", "pooling": "mean over patches, then over frames",
        }

    def _encode(self, inputs):
        import torch

        frames, owner = [], []
        for ci, clip in enumerate(inputs):
            a = _check_frames(clip, f"local clip {ci}")
            if a.ndim == 3:
                a = a[None]
            if len(a) == 0:
                raise ValueError(f"local clip {ci}: no face crops")
            for f in a:
                frames.append(_resize_uint8(f, (self.size, self.size)))
                owner.append(ci)
        per_frame = []
        for j in range(0, len(frames), self.batch_size):
            x = self._pixels(np.stack(frames[j:j + self.batch_size]), self.mean, self.std)
            noise = torch.arange(self.n_patches, device=self.device, dtype=torch.float32).expand(len(x), -1)
            h = self.model(pixel_values=x, noise=noise).last_hidden_state
            assert h.shape[1] == self.n_patches + 1, "ViT-MAE masked some patches: mask_ratio must be 0"
            per_frame.append(h[:, 1:].float().mean(dim=1).cpu().numpy())
        feats = np.concatenate(per_frame)
        owner = np.asarray(owner)
        return [{"mean": feats[owner == ci].mean(axis=0)} for ci in range(len(inputs))]


class VideoMaeEncoder(Encoder):
    """VideoMAE on one 16-frame clip: mean of the output tokens (1568 at 224/16, tubelet 2)."""

    name = "videomae"
    modality = "temporal"

    def __init__(self, model, *, weights: str, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 device: str = "auto", batch_size: int = 32):
        super().__init__(model, weights=weights, device=device, batch_size=batch_size)
        cfg = model.config
        self.size = int(cfg.image_size)
        self.num_frames = int(cfg.num_frames)
        self.n_tokens = (self.num_frames // cfg.tubelet_size) * (self.size // cfg.patch_size) ** 2
        self.mean, self.std = tuple(mean), tuple(std)
        self.dim = cfg.hidden_size
        self.layer = "last_hidden_state" + ("" if cfg.use_mean_pooling else " (final norm)")
        self.outputs = {"mean": OutputInfo("mean", (self.dim,))}
        self.params = {
            "image_size": self.size, "num_frames": self.num_frames, "tokens": self.n_tokens,
            "resize": "bicubic if not image_size", "mean": list(self.mean), "std": list(self.std),
            "pooling": "mean over tokens",
        }

    def _encode(self, inputs):
        clips = []
        for ci, clip in enumerate(inputs):
            a = _check_frames(clip, f"temporal clip {ci}")
            if a.ndim != 4 or len(a) != self.num_frames:
                raise ValueError(f"temporal clip {ci}: expected [{self.num_frames}, H, W, 3] frames, got {a.shape}")
            clips.append(np.stack([_resize_uint8(f, (self.size, self.size)) for f in a]))
        out = []
        for j in range(0, len(clips), self.batch_size):
            x = self._pixels(np.stack(clips[j:j + self.batch_size]), self.mean, self.std)  # [B, T, 3, H, W]
            h = self.model(pixel_values=x).last_hidden_state
            out.extend({"mean": m} for m in h.float().mean(dim=1).cpu().numpy())
        return out


class EvaEncoder(Encoder):
    """EVA (timm) at 448x448: all tokens after all blocks but the last, no final norm -> [1025, D]."""

    name = "eva"
    modality = "global"

    def __init__(self, model, *, weights: str, device: str = "auto", batch_size: int = 32):
        depth = len(model.blocks)
        keep = max(1, depth - 1)
        # drop the last block, the final norm and the head (MiniGPT-v2's ln_vision is the projector's)
        model.prune_intermediate_layers(indices=[keep - 1], prune_norm=True, prune_head=True)
        super().__init__(model, weights=weights, device=device, batch_size=batch_size)
        h, w = model.patch_embed.img_size
        self.size = (int(h), int(w))
        self.n_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        self.dim = model.embed_dim
        self.layer = f"blocks[:{keep}]"
        self.outputs = {"tokens": OutputInfo("none", (self.n_tokens, self.dim))}
        self.params = {
            "image_size": list(self.size), "resize": "whole frame, bicubic (PIL)",
            "mean": list(EVA_CLIP_MEAN), "std": list(EVA_CLIP_STD),
            "blocks": keep, "depth": depth, "rule": "all blocks but the last", "final_norm": False,
            "tokens": "CLS then patches",
        }

    def _encode(self, inputs):
        frames = []
        for ci, f in enumerate(inputs):
            a = _check_frames(f, f"global clip {ci}")
            if a.ndim != 3:
                raise ValueError(f"global clip {ci}: expected one frame [H, W, 3], got {a.shape}")
            frames.append(_resize_uint8(a, self.size))
        out = []
        for j in range(0, len(frames), self.batch_size):
            x = self._pixels(np.stack(frames[j:j + self.batch_size]), EVA_CLIP_MEAN, EVA_CLIP_STD)
            h = self.model.forward_features(x)
            out.extend({"tokens": t} for t in h.float().cpu().numpy())
        return out


ENCODER_CLASSES: dict[str, type[Encoder]] = {
    "audio": HubertEncoder, "local": MaeEncoder, "temporal": VideoMaeEncoder, "global": EvaEncoder,
}


# --- loading ---------------------------------------------------------------------------------

@contextmanager
def _quiet_progress():
    """Silence transformers' own progress bars while loading, restoring the caller's setting."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _prepare(source: ModelSource, offline: bool, home: Path | None):
    """-> (folder with the configs, pretrained name, from_pretrained kwargs, identity).

    Local folders and cached snapshots load with local_files_only; online hub ids download the json
    files first (to pin the commit), then the weights through the library's own loader.
    """
    local = source.local_path()
    if local is not None:
        return local, str(local), {"local_files_only": True}, folder_hash(local, home=home)
    cache_dir = hf_cache_dir()
    if offline:
        snap = cached_snapshot(source.model, source.revision, cache_dir)
        if snap is None:
            raise _missing(source, cache_dir, "not in the local HF cache and offline")
        return snap, str(snap), {"local_files_only": True}, f"hub:{source.model}@{snap.name}"
    from huggingface_hub import snapshot_download
    try:
        snap = Path(snapshot_download(source.model, revision=source.revision, cache_dir=cache_dir,
                                      allow_patterns=["*.json"]))
    except Exception as e:
        raise _missing(source, cache_dir, f"download failed ({type(e).__name__}: {e})") from e
    kwargs = {"revision": snap.name, "cache_dir": str(cache_dir)}
    return snap, source.model, kwargs, f"hub:{source.model}@{snap.name}"


def _load_file(view: str, source: ModelSource, path: Path, *, device: str, batch_size: int,
               home: Path | None) -> Encoder:
    """One view's encoder from a checkpoint file in its authors' layout (see the module docstring)."""
    from emollama.extract.models import load_weights_file

    if source.revision is not None:
        raise ValueError(f"{source.model}: `revision` applies to hub ids, not to a weights file: remove it")
    if view not in ("local", "temporal", "global"):
        raise ValueError(f"{source.model}: a single weights file is accepted for the local, temporal and global "
                         f"views, not {view!r}: give the {view} encoder a transformers model folder or hub id")
    identity = file_hash(path, home=home)
    log.info("loading %s encoder from the file %s (%s)", view, path, identity)
    cfg_dir = Path(source.config).expanduser() if source.config else None
    model, info = load_weights_file(view, path, config=cfg_dir)
    # value-determining architecture details (not the bookkeeping: what was dropped, where heads came from)
    arch = {k: v for k, v in info.items()
            if k not in ("dropped", "num_heads_from", "depth_in_file", "pos_embed_grid")}
    if view == "global":
        enc = EvaEncoder(model, weights=identity, device=device, batch_size=batch_size)
        grid = info["pos_embed_grid"]
        if list(grid) != [s // int(model.patch_embed.patch_size[0]) for s in enc.size]:
            enc.params["pos_embed"] = _RESAMPLED.format(h=grid[0], w=grid[1])
    else:
        pre = (_read_json(cfg_dir / "preprocessor_config.json") if cfg_dir is not None and cfg_dir.is_dir()
               else None) or {}
        mean = tuple(pre.get("image_mean", IMAGENET_MEAN))
        std = tuple(pre.get("image_std", IMAGENET_STD))
        cls = MaeEncoder if view == "local" else VideoMaeEncoder
        enc = cls(model, weights=identity, mean=mean, std=std, device=device, batch_size=batch_size)
    enc.params["checkpoint"] = arch
    return enc


# how the global view's position embedding is resized, when the checkpoint's grid is not 32x32
_RESAMPLED = ("resampled from {h}x{w} patches: bicubic, align_corners False, no antialias, CLS kept "
              "(as the released model)")


def load_encoder(view: str, source: ModelSource, *, device: str = "auto", offline: bool | None = None,
                 batch_size: int = 32, home: Path | None = None) -> Encoder:
    """Load one view's encoder from a hub id, local folder or weights file (frozen, eval, fp16 on GPU)."""
    offline = is_offline(offline)
    file = source.weights_file()
    if file is not None:
        return _load_file(view, source, file, device=device, batch_size=batch_size, home=home)
    if source.config is not None:
        raise ValueError(f"{source.model}: `config` applies to a weights file only (a folder or hub id brings its "
                         f"own config.json): remove it, or point `model` at a .pth/.safetensors file")
    folder, name, kwargs, identity = _prepare(source, offline, home)
    log.info("loading %s encoder from %s (%s)", view, name, identity)
    pre = _read_json(folder / "preprocessor_config.json") or {}
    try:
        with _quiet_progress():
            if view == "audio":
                from transformers import HubertModel
                model = HubertModel.from_pretrained(name, **kwargs)
                sr = int(pre.get("sampling_rate", 16000))
                if sr != 16000:
                    raise ValueError(f"{source.model}: expects {sr} Hz audio; this project feeds 16 kHz")
                return HubertEncoder(model, weights=identity, normalize=bool(pre.get("do_normalize", True)),
                                     device=device, batch_size=batch_size)
            if view in ("local", "temporal"):
                mean = tuple(pre.get("image_mean", IMAGENET_MEAN))
                std = tuple(pre.get("image_std", IMAGENET_STD))
                if view == "local":
                    from transformers import ViTMAEModel
                    model = ViTMAEModel.from_pretrained(name, mask_ratio=0.0, **kwargs)
                    return MaeEncoder(model, weights=identity, mean=mean, std=std, device=device,
                                      batch_size=batch_size)
                from transformers import VideoMAEModel
                model = VideoMAEModel.from_pretrained(name, **kwargs)
                return VideoMaeEncoder(model, weights=identity, mean=mean, std=std, device=device,
                                       batch_size=batch_size)
            if view == "global":
                import timm

                from emollama.extract.models import eva_to_img_size
                if kwargs.get("local_files_only"):
                    uri = f"local-dir:{folder}"
                    extra = {}
                else:
                    uri = f"hf-hub:{source.model}@{kwargs['revision']}"
                    extra = {"cache_dir": kwargs["cache_dir"]}
                # built at the checkpoint's own size, then resized to 448 with the released model's
                # position-embedding resample (timm's own resample uses antialias: other values)
                model = timm.create_model(uri, pretrained=True, num_classes=0, **extra)
                old_grid = eva_to_img_size(model, EVA_IMG_SIZE)
                enc = EvaEncoder(model, weights=identity, device=device, batch_size=batch_size)
                if old_grid is not None:
                    enc.params["pos_embed"] = _RESAMPLED.format(h=old_grid[0], w=old_grid[1])
                return enc
    except OSError as e:
        if offline or source.local_path() is not None:
            raise MissingWeightsError(
                f"{source.model}: the {view} checkpoint in {folder} is incomplete or unreadable ({e}). "
                f"Re-download it (`hf download {source.model}` on a machine with internet) or point the "
                f"encoders config at a complete folder."
            ) from e
        raise
    raise ValueError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)}")


def check_available(cfg: EncodersConfig, *, offline: bool | None = None) -> None:
    """Raise MissingWeightsError at once when offline and a source is neither a folder nor cached."""
    if not is_offline(offline):
        return
    for view in VIEWS:
        source = cfg.source(view)
        if source.local_path() is None and cached_snapshot(source.model, source.revision) is None:
            raise _missing(source, hf_cache_dir(), "not in the local HF cache and offline")


def load_encoders(cfg: EncodersConfig, *, device: str = "auto", offline: bool | None = None,
                  batch_size: int = 32, home: Path | None = None) -> dict[str, Encoder]:
    """The four encoders, keyed "audio", "local", "temporal", "global".

    Every source is checked before any model loads, so a missing checkpoint fails at once.
    """
    offline = is_offline(offline)
    check_available(cfg, offline=offline)
    return {view: load_encoder(view, cfg.source(view), device=device, offline=offline,
                               batch_size=batch_size, home=home) for view in VIEWS}


# --- random models (benchmarks) ---------------------------------------------------------------

def random_model(view: str, size: str = "large"):
    """A randomly initialised model of real size (no download): "large" for audio/local/temporal
    (HuBERT-large, ViT-MAE-large, VideoMAE-large), "giant" for global (EVA-g, 40 blocks), or "tiny"."""
    return build_model(view, size)


def wrap_model(view: str, model, *, weights: str, device: str = "auto", batch_size: int = 32) -> Encoder:
    """Wrap an in-memory model as the view's Encoder (defaults: normalised audio, ImageNet stats)."""
    if view not in ENCODER_CLASSES:
        raise ValueError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)}")
    return ENCODER_CLASSES[view](model, weights=weights, device=device, batch_size=batch_size)


def random_encoder(view: str, size: str = "large", *, device: str = "auto", batch_size: int = 32) -> Encoder:
    """`random_model` wrapped as an Encoder; weights identity "random:<view>-<size>"."""
    return wrap_model(view, random_model(view, size), weights=f"random:{view}-{size}", device=device,
                      batch_size=batch_size)
