"""The encoder contract: input kinds, the `Encoder` base class, and the registry of encoder classes.

An encoder class declares
- `name`: its registry name, the middle of its set names (`audio.hubert.mean`);
- `input`: the kind of input it takes, one of `INPUTS` (the extraction step prepares each kind once per
  clip and hands every encoder the kind it declares; `input_of(options)` when it is configurable);
- `pooling`: its outputs, name -> pooling (`pooling_of(options)` when configurable); shapes are known once
  the weights are read (`outputs`, name -> OutputInfo). The pooling "text" (`store.text.POOLING`) makes
  a text set: each row is one uint8 array of UTF-8 JSON (`extract.asr`, speech recognition);
- `Options`: the dataclass of its own settings in `[extract.encoders.<name>]` besides the weights source
  (None: the source only). Its fields are `extract.settings` fields: value fields reach the key;
- how it loads: `from_pretrained` (a folder / hub snapshot) and, for encoders that convert their
  authors' checkpoint files, `from_file`.

`@register_encoder` in the file that defines the class puts it in `ENCODERS`; `extract.encoders`
imports the built-in ones (`paper_encoders`, `hf_encoder`) explicitly.

Torch, transformers and timm are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import numpy as np

from emollama.extract.sources import (DOWNLOAD_HINT, MissingWeightsError, ModelSource, file_hash, is_offline,
                                      resolve_pretrained)

log = logging.getLogger(__name__)

# The inputs the extraction step prepares for every clip (extract.step.prepare), by kind.
WAVEFORM, FACE_FRAMES, FACE_CLIP, FRAME = "waveform", "face_frames", "face_clip", "frame"
INPUTS: dict[str, str] = {
    WAVEFORM: "float32 mono waveform [samples] at extract.sample_rate (16 kHz)",
    FACE_FRAMES: "uint8 face crops [N, crop, crop, 3] of frames.local_frames frames sampled uniformly",
    FACE_CLIP: "uint8 face crops [segments x per_segment, crop, crop, 3]: consecutive frames from each segment",
    FRAME: "one whole uint8 frame [H, W, 3] (frames.global_frame: first, middle, or peak = the largest face)",
}
FACE_INPUTS = (FACE_FRAMES, FACE_CLIP, FRAME)


@dataclass(frozen=True)
class OutputInfo:
    """One output of an encoder: how it pools, and its per-clip shape (None = varies per clip)."""

    pooling: str
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class EncoderInfo:
    """What a loaded encoder tells the feature specs (`extract.step.build_specs`), without the model:
    its outputs (pooling, shape), weights identity, layer, params, input kind, frame rate and compute
    dtype. `Encoder.info()` makes one; `extract.encoders` caches them so that a rerun with nothing to
    do names its feature sets without loading any model."""

    name: str                           # the registered encoder name
    input_kind: str
    weights: str
    layer: str
    frame_rate: float | None
    compute_dtype: str
    params: Mapping[str, Any]
    outputs: Mapping[str, OutputInfo]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "input_kind": self.input_kind, "weights": self.weights, "layer": self.layer,
                "frame_rate": self.frame_rate, "compute_dtype": self.compute_dtype, "params": self.params,
                "outputs": {k: {"pooling": o.pooling, "shape": list(o.shape)} for k, o in self.outputs.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EncoderInfo":
        """From `to_dict`'s form; ValueError when any field is missing or of the wrong type."""
        try:
            outputs = {str(k): OutputInfo(str(o["pooling"]), tuple(None if x is None else int(x) for x in o["shape"]))
                       for k, o in d["outputs"].items()}
            info = cls(name=d["name"], input_kind=d["input_kind"], weights=d["weights"], layer=d["layer"],
                       frame_rate=None if d["frame_rate"] is None else float(d["frame_rate"]),
                       compute_dtype=d["compute_dtype"], params=dict(d["params"]), outputs=outputs)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"not an encoder description ({type(e).__name__}: {e})") from None
        if not all(isinstance(v, str) for v in (info.name, info.input_kind, info.weights, info.layer,
                                                info.compute_dtype)) or not outputs:
            raise ValueError("not an encoder description (a name, input, weights, layer or dtype is not a string)")
        return info


def gpu_visible() -> bool:
    """Whether this host has a CUDA GPU to use, asked of the driver (libcuda) without importing torch, so
    that settings that depend on it (`extract.step.detect_on`) resolve the same in any process and a rerun
    with nothing to do loads no model machinery. (A CPU-only torch build on a GPU host still answers True.)"""
    import ctypes
    import os

    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` for a while, then set back (None: left as they are). torch
    keeps the count per thread (OpenMP), so a preparation thread of the same process keeps its own."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    if before != n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resize_uint8(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an [H, W, 3] uint8 frame to (height, width), PIL bicubic (as torchvision on PIL images)."""
    if frame.shape[:2] == size:
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.BICUBIC))


def check_frames(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype != np.uint8 or a.shape[-1] != 3:
        raise ValueError(f"{what}: expected uint8 RGB frames [..., H, W, 3], got {a.dtype} {a.shape}")
    return a


@contextmanager
def quiet_progress():
    """Silence transformers' own progress bars while loading, restoring the caller's setting."""
    from transformers.utils import logging as tlog

    was = tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tlog.enable_progress_bar()


class Encoder:
    """A frozen encoder. Subclasses declare the class attributes below, `_encode`, and how they load."""

    name: ClassVar[str]
    input: ClassVar[str]
    pooling: ClassVar[Mapping[str, str]] = {}
    Options: ClassVar[type | None] = None
    table: ClassVar[str | None] = None   # the config table of its weights (None: [extract.encoders.<entry>])
    role: ClassVar[str | None] = None    # what messages call it (None: "the <entry> encoder (<name>)")
    frame_rate: float | None = None

    def __init__(self, model, *, weights: str, device: str = "auto", batch_size: int = 32):
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weights = weights
        self.batch_size = batch_size
        self.modality: str = getattr(self, "modality", "") or self.name   # the view: set by whoever names it
        self.dim: int = 0
        self.layer: str = ""
        self.outputs: dict[str, OutputInfo] = {}
        self.params: dict[str, Any] = {}

    # --- declarations ---------------------------------------------------------------------------

    @classmethod
    def input_of(cls, options: Any = None) -> str:
        """The input kind this encoder takes (with these options)."""
        return cls.input

    @classmethod
    def pooling_of(cls, options: Any = None) -> dict[str, str]:
        """Its outputs, name -> pooling (with these options)."""
        return dict(cls.pooling)

    @property
    def input_kind(self) -> str:
        """The input kind this instance takes."""
        return self.input_of(getattr(self, "options", None))

    def declare_outputs(self, shapes: Mapping[str, tuple[int | None, ...]]) -> None:
        """Set `outputs` from the declared pooling and the shapes the weights give."""
        pooling = self.pooling_of(getattr(self, "options", None))
        if set(shapes) != set(pooling):
            raise RuntimeError(f"{type(self).__name__}: outputs {sorted(shapes)} differ from the declared "
                               f"{sorted(pooling)}")
        self.outputs = {k: OutputInfo(pooling[k], tuple(shapes[k])) for k in pooling}

    # --- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, source: ModelSource, options: Any = None, *, device: str = "auto", offline: bool | None = None,
             batch_size: int = 32, home: Path | None = None) -> "Encoder":
        """Load from a hub id, local folder or weights file (frozen, eval, fp16 on GPU)."""
        offline = is_offline(offline)
        file = source.weights_file()
        if file is not None:
            if source.revision is not None:
                raise ValueError(f"{source.model}: `revision` applies to hub ids, not to a weights file: remove it")
            identity = file_hash(file, home=home)
            log.info("loading the %s encoder from the file %s (%s)", cls.name, file, identity)
            return cls.from_file(file, source, options, identity=identity, device=device, batch_size=batch_size)
        if source.config is not None:
            raise ValueError(f"{source.model}: `config` applies to a weights file only (a folder or hub id brings its "
                             f"own config.json): remove it, or point `model` at a .pth/.safetensors file")
        folder, name, kwargs, identity = resolve_pretrained(source, offline, home)
        log.info("loading the %s encoder from %s (%s)", cls.name, name, identity)
        try:
            with quiet_progress():
                return cls.from_pretrained(folder, name, kwargs, options, identity=identity, device=device,
                                           batch_size=batch_size, source=source)
        except OSError as e:
            if kwargs.get("local_files_only"):   # a local folder or cached snapshot (offline, or no hub)
                raise MissingWeightsError(
                    f"{source.model}: the {cls.name} checkpoint in {folder} is incomplete or unreadable ({e}). "
                    f"Download it again with {DOWNLOAD_HINT} (REPO {source.model}) on a machine with internet, "
                    f"or point the encoders config at a complete folder."
                ) from e
            raise

    @classmethod
    def from_pretrained(cls, folder: Path, name: str, kwargs: dict, options: Any, *, identity: str, device: str,
                        batch_size: int, source: ModelSource) -> "Encoder":
        """Build from `name` (a folder, or a hub id with `kwargs` pinning the revision); `folder` holds
        its json files (config, preprocessor_config)."""
        raise NotImplementedError

    @classmethod
    def from_file(cls, path: Path, source: ModelSource, options: Any, *, identity: str, device: str,
                  batch_size: int) -> "Encoder":
        """Build from one checkpoint file in its authors' layout (encoders that convert one)."""
        raise ValueError(f"{source.model}: a single weights file is accepted by the vit_mae, videomae and eva "
                         f"encoders (the local, temporal and global views), not by {cls.name}: give it a "
                         f"transformers model folder or hub id")

    # --- encoding -------------------------------------------------------------------------------

    @property
    def compute_dtype(self) -> str:
        """"float16" on GPU, "float32" on CPU (not in params: values agree to fp16 precision)."""
        return str(self.dtype).removeprefix("torch.")

    def info(self) -> EncoderInfo:
        """What the feature specs need from this encoder (no model): see `EncoderInfo`."""
        return EncoderInfo(name=self.name, input_kind=self.input_kind, weights=self.weights, layer=self.layer,
                           frame_rate=self.frame_rate, compute_dtype=self.compute_dtype, params=dict(self.params),
                           outputs=dict(self.outputs))

    def describe(self) -> dict[str, Any]:
        """A JSON-able description of everything that determines the values."""
        return {
            "name": self.name, "modality": self.modality, "input": self.input_kind,
            "dim": self.dim, "frame_rate": self.frame_rate, "layer": self.layer, "params": self.params,
            "weights": self.weights,
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


ENCODERS: dict[str, type[Encoder]] = {}


def register_encoder(cls: type[Encoder]) -> type[Encoder]:
    """Class decorator: make `cls` available as `encoder = "<cls.name>"` in the encoders config."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str) or "." in name or "/" in name:
        raise TypeError(f"{cls.__name__}: an encoder needs a `name` without '.' or '/', got {name!r}")
    if name in ENCODERS and ENCODERS[name] is not cls:
        raise TypeError(f"two encoder classes are named {name!r}: {ENCODERS[name].__name__} and {cls.__name__}")
    if cls.Options is None and getattr(cls, "input", None) not in INPUTS:
        raise TypeError(f"{cls.__name__}: `input` must be one of {', '.join(INPUTS)}, "
                        f"got {getattr(cls, 'input', None)!r}")
    ENCODERS[name] = cls
    return cls


def encoder_class(name: str) -> type[Encoder]:
    """The registered encoder class of that name."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}: choose one of {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name]
