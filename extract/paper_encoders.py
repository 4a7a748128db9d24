"""The four frozen encoders of Emotion-LLaMA (the paper's views), registered as `hubert`, `vit_mae`,
`videomae` and `eva`.

Each class declares its name, input kind, outputs (with pooling; per-clip shapes once the weights
are read), layer and value-determining params; the weights identity comes from `extract.sources`:

| view     | encoder (class)              | model                    | input kind: per clip               | outputs                   |
|----------|------------------------------|--------------------------|------------------------------------|---------------------------|
| audio    | hubert (`HubertEncoder`)     | transformers HubertModel | waveform: mono 16 kHz              | frames [T, D] 50/s, mean  |
| local    | vit_mae (`MaeEncoder`)       | transformers ViTMAEModel | face_frames: [N, 224, 224, 3]      | mean [D]                  |
| temporal | videomae (`VideoMaeEncoder`) | transformers VideoMAE    | face_clip: [16, 224, 224, 3]       | mean [D]                  |
| global   | eva (`EvaEncoder`)           | timm Eva (EVA-CLIP-g/14) | frame: one [H, W, 3]               | tokens [1025, D], CLS 1st |

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

Sources (`extract.sources.ModelSource`): a hub id, a local transformers/timm folder, or, for the local,
temporal and global views, one local weights FILE in its authors' original key layout, converted on load:

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

Torch, transformers and timm are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from emollama.extract.models import (EVA_IMG_SIZE, eva_from_state_dict, eva_to_img_size, read_config, read_state_dict,
                                     videomae_from_state_dict, vit_mae_from_state_dict)
from emollama.extract.registry import (FACE_CLIP, FACE_FRAMES, FRAME, WAVEFORM, Encoder, check_frames, register_encoder,
                                       resize_uint8)
from emollama.extract.sources import ModelSource, read_json

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVA_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
EVA_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# how the global view's position embedding is resized, when the checkpoint's grid is not 32x32
_RESAMPLED = ("resampled from {h}x{w} patches: bicubic, align_corners False, no antialias, CLS kept "
              "(as the released model)")
# the converter's bookkeeping, not value-determining (what was dropped, where heads came from)
_BOOKKEEPING = ("dropped", "num_heads_from", "depth_in_file", "pos_embed_grid")


def _convert(converter, path: Path, source: ModelSource):
    """(model, info, config folder) of one checkpoint file in its authors' layout."""
    cfg_dir = Path(source.config).expanduser() if source.config else None
    cfg = read_config(cfg_dir)
    sd = read_state_dict(path)
    model, info = converter(sd, config=cfg, path=str(path))
    return model, info, cfg_dir


def _image_stats(cfg_dir: Path | None) -> tuple[tuple, tuple]:
    """(mean, std) from a folder's preprocessor_config.json, else ImageNet's."""
    pre = (read_json(cfg_dir / "preprocessor_config.json") if cfg_dir is not None and cfg_dir.is_dir() else None) or {}
    return tuple(pre.get("image_mean", IMAGENET_MEAN)), tuple(pre.get("image_std", IMAGENET_STD))


@register_encoder
class HubertEncoder(Encoder):
    """HuBERT, last hidden layer: "frames" [T, D] at 50/s and "mean" [D] over all frames."""

    name = "hubert"
    modality = "audio"      # the paper's view (a config entry of another name sets its own)
    input = WAVEFORM
    pooling = {"frames": "none", "mean": "mean"}

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
        self.declare_outputs({"frames": (None, self.dim), "mean": (self.dim,)})
        self.params = {
            "sample_rate": sample_rate, "normalize": normalize,
            "window_s": self.window_frames * self.hop / sample_rate,
            "window_overlap_samples": rf - self.hop, "hop_samples": self.hop,
            "min_samples": rf, "short_audio": "zero-padded to min_samples",
        }

    @classmethod
    def from_pretrained(cls, folder, name, kwargs, options, *, identity, device, batch_size, source):
        from transformers import HubertModel

        pre = read_json(folder / "preprocessor_config.json") or {}
        model = HubertModel.from_pretrained(name, **kwargs)
        sr = int(pre.get("sampling_rate", 16000))
        if sr != 16000:
            raise ValueError(f"{source.model}: expects {sr} Hz audio; this project feeds 16 kHz")
        return cls(model, weights=identity, normalize=bool(pre.get("do_normalize", True)), device=device,
                   batch_size=batch_size)

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


@register_encoder
class MaeEncoder(Encoder):
    """ViT-MAE without masking: per frame the mean of final-norm patch tokens, then mean over frames."""

    name = "vit_mae"
    modality = "local"
    input = FACE_FRAMES
    pooling = {"mean": "mean"}

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
        self.declare_outputs({"mean": (self.dim,)})
        self.params = {
            "image_size": self.size, "resize": "bicubic if not image_size", "mean": list(self.mean),
            "std": list(self.std), "mask_ratio": 0.0, "noise": "increasing ramp (patch order kept)",
            "tokens": "patches (CLS excluded)", "pooling": "mean over patches, then over frames",
        }

    @classmethod
    def from_pretrained(cls, folder, name, kwargs, options, *, identity, device, batch_size, source):
        from transformers import ViTMAEModel

        mean, std = _image_stats(folder)
        model = ViTMAEModel.from_pretrained(name, mask_ratio=0.0, **kwargs)
        return cls(model, weights=identity, mean=mean, std=std, device=device, batch_size=batch_size)

    @classmethod
    def from_file(cls, path, source, options, *, identity, device, batch_size):
        model, info, cfg_dir = _convert(vit_mae_from_state_dict, path, source)
        mean, std = _image_stats(cfg_dir)
        enc = cls(model, weights=identity, mean=mean, std=std, device=device, batch_size=batch_size)
        enc.params["checkpoint"] = {k: v for k, v in info.items() if k not in _BOOKKEEPING}
        return enc

    def _encode(self, inputs):
        import torch

        frames, owner = [], []
        for ci, clip in enumerate(inputs):
            a = check_frames(clip, f"local clip {ci}")
            if a.ndim == 3:
                a = a[None]
            if len(a) == 0:
                raise ValueError(f"local clip {ci}: no face crops")
            for f in a:
                frames.append(resize_uint8(f, (self.size, self.size)))
                owner.append(ci)
        per_frame = []
        for j in range(0, len(frames), self.batch_size):
            x = self._pixels(np.stack(frames[j:j + self.batch_size]), self.mean, self.std)
            noise = torch.arange(self.n_patches, device=self.device, dtype=torch.float32).expand(len(x), -1)
            h = self.model(pixel_values=x, noise=noise).last_hidden_state
            if h.shape[1] != self.n_patches + 1:
                raise RuntimeError(f"ViT-MAE returned {h.shape[1] - 1} of {self.n_patches} patches: its config's "
                                   "mask_ratio must be 0 (set it in the weights' config.json)")
            per_frame.append(h[:, 1:].float().mean(dim=1).cpu().numpy())
        feats = np.concatenate(per_frame)
        owner = np.asarray(owner)
        return [{"mean": feats[owner == ci].mean(axis=0)} for ci in range(len(inputs))]


@register_encoder
class VideoMaeEncoder(Encoder):
    """VideoMAE on one 16-frame clip: mean of the output tokens (1568 at 224/16, tubelet 2)."""

    name = "videomae"
    modality = "temporal"
    input = FACE_CLIP
    pooling = {"mean": "mean"}

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
        self.declare_outputs({"mean": (self.dim,)})
        self.params = {
            "image_size": self.size, "num_frames": self.num_frames, "tokens": self.n_tokens,
            "resize": "bicubic if not image_size", "mean": list(self.mean), "std": list(self.std),
            "pooling": "mean over tokens",
        }

    @classmethod
    def from_pretrained(cls, folder, name, kwargs, options, *, identity, device, batch_size, source):
        from transformers import VideoMAEModel

        mean, std = _image_stats(folder)
        model = VideoMAEModel.from_pretrained(name, **kwargs)
        return cls(model, weights=identity, mean=mean, std=std, device=device, batch_size=batch_size)

    @classmethod
    def from_file(cls, path, source, options, *, identity, device, batch_size):
        model, info, cfg_dir = _convert(videomae_from_state_dict, path, source)
        mean, std = _image_stats(cfg_dir)
        enc = cls(model, weights=identity, mean=mean, std=std, device=device, batch_size=batch_size)
        enc.params["checkpoint"] = {k: v for k, v in info.items() if k not in _BOOKKEEPING}
        return enc

    def _encode(self, inputs):
        clips = []
        for ci, clip in enumerate(inputs):
            a = check_frames(clip, f"temporal clip {ci}")
            if a.ndim != 4 or len(a) != self.num_frames:
                raise ValueError(f"temporal clip {ci}: expected [{self.num_frames}, H, W, 3] frames, got {a.shape}")
            clips.append(np.stack([resize_uint8(f, (self.size, self.size)) for f in a]))
        out = []
        for j in range(0, len(clips), self.batch_size):
            x = self._pixels(np.stack(clips[j:j + self.batch_size]), self.mean, self.std)  # [B, T, 3, H, W]
            h = self.model(pixel_values=x).last_hidden_state
            out.extend({"mean": m} for m in h.float().mean(dim=1).cpu().numpy())
        return out


@register_encoder
class EvaEncoder(Encoder):
    """EVA (timm) at 448x448: all tokens after all blocks but the last, no final norm -> [1025, D]."""

    name = "eva"
    modality = "global"
    input = FRAME
    pooling = {"tokens": "none"}

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
        self.declare_outputs({"tokens": (self.n_tokens, self.dim)})
        self.params = {
            "image_size": list(self.size), "resize": "whole frame, bicubic (PIL)",
            "mean": list(EVA_CLIP_MEAN), "std": list(EVA_CLIP_STD),
            "blocks": keep, "depth": depth, "rule": "all blocks but the last", "final_norm": False,
            "tokens": "CLS then patches",
        }

    @classmethod
    def from_pretrained(cls, folder, name, kwargs, options, *, identity, device, batch_size, source):
        import timm

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
        enc = cls(model, weights=identity, device=device, batch_size=batch_size)
        if old_grid is not None:
            enc.params["pos_embed"] = _RESAMPLED.format(h=old_grid[0], w=old_grid[1])
        return enc

    @classmethod
    def from_file(cls, path, source, options, *, identity, device, batch_size):
        model, info, _ = _convert(eva_from_state_dict, path, source)
        enc = cls(model, weights=identity, device=device, batch_size=batch_size)
        grid = info["pos_embed_grid"]
        if list(grid) != [s // int(model.patch_embed.patch_size[0]) for s in enc.size]:
            enc.params["pos_embed"] = _RESAMPLED.format(h=grid[0], w=grid[1])
        enc.params["checkpoint"] = {k: v for k, v in info.items() if k not in _BOOKKEEPING}
        return enc

    def _encode(self, inputs):
        frames = []
        for ci, f in enumerate(inputs):
            a = check_frames(f, f"global clip {ci}")
            if a.ndim != 3:
                raise ValueError(f"global clip {ci}: expected one frame [H, W, 3], got {a.shape}")
            frames.append(resize_uint8(a, self.size))
        out = []
        for j in range(0, len(frames), self.batch_size):
            x = self._pixels(np.stack(frames[j:j + self.batch_size]), EVA_CLIP_MEAN, EVA_CLIP_STD)
            h = self.model.forward_features(x)
            out.extend({"tokens": t} for t in h.float().cpu().numpy())
        return out
