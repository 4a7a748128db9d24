"""A generic Hugging Face encoder: any `AutoModel` with its feature extractor or image processor.

    [extract.encoders.wav2vec2]
    encoder = "hf"
    model = "facebook/wav2vec2-large-xlsr-53"   # a hub id (+ revision) or a local folder
    input = "waveform"                          # waveform | face_frames | face_clip | frame
    layer = 6                                   # optional: hidden_states[layer] (0 = the embeddings); absent:
                                                # last_hidden_state, the model's output (its final norm included)
    pooling = "mean"                            # mean | cls | none, or a list (one feature set each)

The folder (or hub repository) must hold the model and its `preprocessor_config.json`: audio models
read it with `AutoFeatureExtractor` (sampling rate 16 kHz; its normalisation applies), image models
with `AutoImageProcessor` (its resize, crop and normalisation apply to every frame). A CLIP/SigLIP-style
two-tower model runs its vision tower on images; an encoder-decoder audio model (e.g. Whisper) runs
its encoder.

- `waveform`: one clip per forward (no padding, so values never depend on batch mates); the whole clip
  at once (no windowing: mind the model's own limit, e.g. Whisper's 30 s). Outputs `mean` [D] over the
  frames, or `frames` [T, D] (pooling "none"; T varies per clip). "cls" does not apply.
- `face_frames` / `face_clip`: every face crop is one image; `mean` (over the tokens) or `cls` (token
  0) per frame, then the mean over the clip's frames -> [D]. "none" does not apply.
- `frame`: the one whole frame; `mean` / `cls` -> [D], or `tokens` [N, D] (pooling "none").

The set names are `<entry>.hf.<output>` (`wav2vec2.hf.mean`), the modality is the entry's name. The key
holds the weights identity (the folder's sha256, its preprocessor_config.json included, or the hub
commit), the layer, the pooling, the options, the processor's class, and the input kind's settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emollama.extract.registry import (FACE_CLIP, FACE_FRAMES, FRAME, INPUTS, WAVEFORM, Encoder, check_frames,
                                       register_encoder)
from emollama.extract.settings import value, value_dict
from emollama.extract.sources import MissingWeightsError

log = logging.getLogger(__name__)

POOLINGS = ("mean", "cls", "none")
SAMPLE_RATE = 16000


@dataclass(frozen=True)
class HfOptions:
    """The options of `encoder = "hf"` (besides model / revision): all of them change values."""

    input: str = value(spec="encoder", choices=tuple(INPUTS))   # waveform | face_frames | face_clip | frame
    layer: int | None = value(None, spec="encoder")     # None: last_hidden_state; i: hidden_states[i]
    pooling: tuple[str, ...] = value(("mean",), spec="encoder", choices=POOLINGS)   # mean | cls | none, one set each

    def extra_problems(self, where: str) -> list[str]:
        out = []
        if self.layer is not None and (not isinstance(self.layer, int) or isinstance(self.layer, bool)):
            out.append(f"{where}.layer = {self.layer!r}: expected an integer (an index into hidden_states)")
        if not self.pooling:
            out.append(f"{where}.pooling: empty; give mean, cls or none")
        if len(set(self.pooling)) != len(self.pooling):
            out.append(f"{where}.pooling = {list(self.pooling)}: a pooling is repeated")
        if self.input == WAVEFORM and "cls" in self.pooling:
            out.append(f"{where}.pooling: 'cls' does not apply to a waveform (no CLS token): use mean or none")
        if self.input in (FACE_FRAMES, FACE_CLIP) and "none" in self.pooling:
            out.append(f"{where}.pooling: 'none' does not apply to {self.input} (several frames per clip): "
                       "use mean or cls")
        return out


def output_name(pooling: str, input_kind: str) -> str:
    """The output (set name suffix) of one pooling: mean, cls, frames (waveform) or tokens (frame)."""
    if pooling == "none":
        return "frames" if input_kind == WAVEFORM else "tokens"
    return pooling


@register_encoder
class HfEncoder(Encoder):
    """Any transformers `AutoModel` with its processor; its last_hidden_state (or hidden_states[layer]),
    pooled as configured."""

    name = "hf"
    Options = HfOptions

    def __init__(self, model, processor, options: HfOptions, *, weights: str, device: str = "auto",
                 batch_size: int = 32):
        if options is None:
            raise ValueError("the hf encoder needs its options: input (and optionally layer, pooling)")
        self.options = options
        self.kind = options.input
        module, part = model, None
        if self.kind != WAVEFORM and getattr(model, "vision_model", None) is not None:
            module, part = model.vision_model, "vision_model"
        elif self.kind == WAVEFORM and getattr(model.config, "is_encoder_decoder", False):
            module, part = model.get_encoder(), "encoder"
        super().__init__(module, weights=weights, device=device, batch_size=batch_size)
        self.processor = processor
        if self.kind == WAVEFORM:
            sr = int(getattr(processor, "sampling_rate", SAMPLE_RATE) or SAMPLE_RATE)
            if sr != SAMPLE_RATE:
                raise ValueError(f"the model's feature extractor expects {sr} Hz audio; this project feeds 16 kHz")
        cfg = module.config
        self.min_samples = self._receptive_field(cfg)
        stride = getattr(cfg, "conv_stride", None)
        # one dry run on a blank input: how many hidden states, and the token count and width
        probe = self._hidden(self._blank())
        tokens, self.dim = int(probe.shape[1]), int(probe.shape[2])
        self.frame_rate = SAMPLE_RATE / float(np.prod(stride)) if self.kind == WAVEFORM and stride else None
        self.layer = "last_hidden_state" if options.layer is None else f"hidden_states[{options.layer}]"
        shapes = {}
        for p in options.pooling:
            if p == "none":
                shapes[output_name(p, self.kind)] = (None, self.dim) if self.kind == WAVEFORM else (tokens, self.dim)
            else:
                shapes[output_name(p, self.kind)] = (self.dim,)
        self.declare_outputs(shapes)
        self.params = {
            "model_type": getattr(model.config, "model_type", None), "architecture": type(model).__name__,
            "module": part, "processor": type(processor).__name__, "options": value_dict(options),
            "pooling": ("mean: over the frames" if self.kind == WAVEFORM else "mean: over the tokens; cls: token 0"
                        + ("" if self.kind == FRAME else "; per frame, then the mean over the frames")),
        }
        if self.kind == WAVEFORM:
            self.params["min_samples"] = self.min_samples

    # --- declarations and loading ---------------------------------------------------------------

    @classmethod
    def input_of(cls, options: HfOptions | None = None) -> str:
        if options is None:
            raise ValueError("the hf encoder takes the input its options name (input = ...)")
        return options.input

    @classmethod
    def pooling_of(cls, options: HfOptions | None = None) -> dict[str, str]:
        if options is None:
            raise ValueError("the hf encoder's outputs follow its options (pooling = ...)")
        return {output_name(p, options.input): p for p in options.pooling}

    @classmethod
    def from_pretrained(cls, folder, name, kwargs, options, *, identity, device, batch_size, source):
        from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoModel

        if options is None:
            raise ValueError(f"{source.model}: the hf encoder needs its options: input (and layer, pooling)")
        if not (Path(folder) / "preprocessor_config.json").is_file():
            what = "feature extractor" if options.input == WAVEFORM else "image processor"
            auto = "AutoFeatureExtractor" if options.input == WAVEFORM else "AutoImageProcessor"
            raise MissingWeightsError(
                f"{source.model}: no preprocessor_config.json in {folder}: the hf encoder needs the model's {what}. "
                f"Save it beside the weights (`{auto}.from_pretrained('<hub id>').save_pretrained('{folder}')`) "
                f"or use a hub id whose repository has one.")
        model = AutoModel.from_pretrained(name, **kwargs)
        processor = (AutoFeatureExtractor if options.input == WAVEFORM else AutoImageProcessor).from_pretrained(
            name, **kwargs)
        return cls(model, processor, options, weights=identity, device=device, batch_size=batch_size)

    # --- encoding -------------------------------------------------------------------------------

    @staticmethod
    def _receptive_field(cfg) -> int:
        """Samples one output frame needs (a wav2vec2-style conv stack), else 1."""
        kernels, strides = getattr(cfg, "conv_kernel", None), getattr(cfg, "conv_stride", None)
        if not kernels or not strides:
            return 1
        rf, jump = 1, 1
        for k, s in zip(kernels, strides):
            rf += (k - 1) * jump
            jump *= s
        return rf

    def _blank(self) -> Any:
        if self.kind == WAVEFORM:
            return np.zeros(SAMPLE_RATE, np.float32)
        return [np.zeros((224, 224, 3), np.uint8)]

    def _to_device(self, batch) -> dict:
        out = {}
        for k, v in batch.items():
            if hasattr(v, "to"):
                v = v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
            out[k] = v
        return out

    def _hidden(self, x):
        """The configured layer's output [B, N, D] for one waveform, or for a list of frames."""
        import torch

        layer = self.options.layer
        with torch.inference_mode():
            if self.kind == WAVEFORM:
                batch = self.processor(x, sampling_rate=SAMPLE_RATE, return_tensors="pt")
            else:
                batch = self.processor(images=list(x), return_tensors="pt")
            out = self.model(**self._to_device(batch), output_hidden_states=layer is not None)
        if layer is None:
            return out.last_hidden_state
        hidden = getattr(out, "hidden_states", None)
        if not hidden:
            raise ValueError(f"{type(self.model).__name__} returns no hidden_states: leave out `layer` to read its "
                             "last_hidden_state")
        if not -len(hidden) <= layer < len(hidden):
            n = len(hidden)
            raise ValueError(f"layer {layer}: the model returns {n} hidden states (0 = the embeddings, {n - 1} = the "
                             f"last layer's output): choose within [{-n}, {n - 1}], or leave it out for "
                             "last_hidden_state")
        return hidden[layer]

    def _pool(self, h, pooling: str):
        """[B, N, D] -> [B, D] (mean, cls) or [B, N, D] (none), float32 numpy."""
        if pooling == "mean":
            h = h.float().mean(dim=1)
        elif pooling == "cls":
            h = h[:, 0].float()
        return h.float().cpu().numpy()

    def _encode(self, inputs):
        pooling = self.options.pooling
        if self.kind == WAVEFORM:
            out = []
            for ci, wave in enumerate(inputs):
                x = np.asarray(wave, dtype=np.float32)
                if x.ndim != 1:
                    raise ValueError(f"audio clip {ci}: expected a mono waveform [samples], got shape {x.shape}")
                if x.size == 0:
                    raise ValueError(f"audio clip {ci}: empty waveform")
                if x.size < self.min_samples:
                    x = np.pad(x, (0, self.min_samples - x.size))
                h = self._hidden(x)
                out.append({output_name(p, self.kind): self._pool(h, p)[0] for p in pooling})
            return out
        frames, owner = [], []
        for ci, clip in enumerate(inputs):
            a = check_frames(clip, f"{self.kind} clip {ci}")
            if self.kind == FRAME and a.ndim != 3:
                raise ValueError(f"frame clip {ci}: expected one frame [H, W, 3], got {a.shape}")
            a = a[None] if a.ndim == 3 else a
            if len(a) == 0:
                raise ValueError(f"{self.kind} clip {ci}: no frames")
            frames.extend(a)
            owner.extend([ci] * len(a))
        pooled: dict[str, list[np.ndarray]] = {p: [] for p in pooling}
        for j in range(0, len(frames), self.batch_size):
            h = self._hidden(frames[j:j + self.batch_size])
            for p in pooling:
                pooled[p].append(self._pool(h, p))
        owner_arr = np.asarray(owner)
        every = {p: np.concatenate(pooled[p]) for p in pooling}
        out = []
        for ci in range(len(inputs)):
            row = {}
            for p in pooling:
                per_frame = every[p][owner_arr == ci]
                row[output_name(p, self.kind)] = per_frame[0] if self.kind == FRAME else per_frame.mean(axis=0)
            out.append(row)
        return out
