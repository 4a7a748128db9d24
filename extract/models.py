"""Randomly initialised encoder models: the `tiny` profile and real-size stand-ins for benchmarks.

The tiny models are the same classes as the real encoders with the real token geometry
(HuBERT's conv strides -> 50 frames/s, ViT-MAE 224/16 -> 196 patches, VideoMAE 16x224x224 with
tubelet 2 and patch 16 -> 1568 tokens, EVA 448/14 -> 1024 patches + CLS) but tiny widths, and a
different width per view so that a feature handed to the wrong slot fails loudly:

    audio 32, local 40, temporal 24, global 48

Two more tiny recipes are fixtures for the generic `hf` encoder (`extract.hf_encoder`): `wav2vec2`
(width 28, with its feature extractor) and `clip_vision` (width 36, 64x64, with its image processor).

They are built from a fixed seed, so every build writes identical bytes (same torch/transformers/
timm versions), and saved on first use under ``<home>/models/tiny/<name>``. A build goes into a
temporary folder beside the target and is renamed into place, so two processes building at once
are safe (the loser throws its copy away). They exist for tests and the offline demo only.

The second half converts the authors' own checkpoint FILES, in their original key layouts, into
the same classes (`*_from_state_dict`; the formats are described in `extract.paper_encoders`).

Torch, transformers and timm are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from emollama.store.cache import build_once, default_home

log = logging.getLogger(__name__)

TINY_SEED = 1234
# Bump when a tiny recipe changes: folders built by an older recipe are rebuilt.
TINY_RECIPE = 1
TINY_DIMS = {"audio": 32, "local": 40, "temporal": 24, "global": 48, "wav2vec2": 28, "clip_vision": 36}

# timm architecture of the global view (EVA-CLIP-g/14's visual tower, see encoders.PAPER)
EVA_ARCH = "eva_giant_patch14_clip_224"
EVA_IMG_SIZE = 448


def _seeded(seed: int):
    """Run model construction under a fixed seed without touching the caller's RNG state."""
    import torch

    class _Ctx:
        def __enter__(self):
            self._fork = torch.random.fork_rng(devices=[])
            self._fork.__enter__()
            torch.manual_seed(seed)

        def __exit__(self, *exc):
            return self._fork.__exit__(*exc)

    return _Ctx()


# --- configurations --------------------------------------------------------------------------

def hubert_config(size: str):
    from transformers import HubertConfig

    if size == "large":  # hubert-large / chinese-hubert-large
        return HubertConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
            conv_dim=(512,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True,
        )
    if size == "tiny":
        return HubertConfig(
            hidden_size=TINY_DIMS["audio"], num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, conv_dim=(32,) * 7, feat_extract_norm="layer",
            do_stable_layer_norm=True,
        )
    raise ValueError(f"unknown size {size!r}: expected 'tiny' or 'large'")


def vit_mae_config(size: str):
    from transformers import ViTMAEConfig

    if size == "large":  # facebook/vit-mae-large
        return ViTMAEConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                            intermediate_size=4096, mask_ratio=0.0)
    if size == "tiny":
        return ViTMAEConfig(
            hidden_size=TINY_DIMS["local"], num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=80, image_size=224, patch_size=16, mask_ratio=0.0,
            decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
            decoder_intermediate_size=32,
        )
    raise ValueError(f"unknown size {size!r}: expected 'tiny' or 'large'")


def videomae_config(size: str):
    from transformers import VideoMAEConfig

    if size == "large":  # MCG-NJU/videomae-large
        return VideoMAEConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                              intermediate_size=4096, use_mean_pooling=False)
    if size == "tiny":
        return VideoMAEConfig(
            hidden_size=TINY_DIMS["temporal"], num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=48, image_size=224, patch_size=16, num_frames=16, tubelet_size=2,
            use_mean_pooling=False, decoder_hidden_size=16, decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2, decoder_intermediate_size=32,
        )
    raise ValueError(f"unknown size {size!r}: expected 'tiny' or 'large'")


def eva_args(size: str) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model(EVA_ARCH, **args)``."""
    if size == "giant":  # EVA-CLIP-g/14 visual tower: 40 blocks, 1408-d
        return dict(img_size=EVA_IMG_SIZE, num_classes=0)
    if size == "tiny":
        return dict(img_size=EVA_IMG_SIZE, num_classes=0, embed_dim=TINY_DIMS["global"], depth=3,
                    num_heads=2, mlp_ratio=2.0)
    raise ValueError(f"unknown size {size!r}: expected 'tiny' or 'giant'")


# --- building --------------------------------------------------------------------------------

def _hubert(size: str):
    from transformers import HubertModel
    return HubertModel(hubert_config(size))


def _vit_mae(size: str):
    from transformers import ViTMAEModel
    return ViTMAEModel(vit_mae_config(size))


def _videomae(size: str):
    from transformers import VideoMAEModel
    return VideoMAEModel(videomae_config(size))


def _eva(size: str):
    import timm
    return timm.create_model(EVA_ARCH, pretrained=False, **eva_args(size))


def _tiny_only(size: str, what: str) -> None:
    if size != "tiny":
        raise ValueError(f"unknown size {size!r} for {what}: only 'tiny' (a test fixture)")


def _wav2vec2(size: str):
    """A tiny wav2vec2 (HuBERT's conv stack: 50 frames/s), a fixture for the generic `hf` encoder."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model
    _tiny_only(size, "wav2vec2")
    return Wav2Vec2Model(Wav2Vec2Config(
        hidden_size=TINY_DIMS["wav2vec2"], num_hidden_layers=2, num_attention_heads=2, intermediate_size=56,
        conv_dim=(16,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, vocab_size=32,
    ))


def _clip_vision(size: str):
    """A tiny CLIP vision tower (64x64, patch 16: CLS + 16 patches), a fixture for the `hf` encoder."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    _tiny_only(size, "clip_vision")
    return CLIPVisionModel(CLIPVisionConfig(
        hidden_size=TINY_DIMS["clip_vision"], intermediate_size=72, num_hidden_layers=2, num_attention_heads=2,
        image_size=64, patch_size=16, projection_dim=16,
    ))


def _save_pretrained(model, folder: Path) -> None:
    model.save_pretrained(folder)


def _save_timm(model, folder: Path) -> None:
    from timm.models import save_for_hf
    save_for_hf(model, str(folder), safe_serialization=True)


def _save_with_feature_extractor(model, folder: Path) -> None:
    from transformers import Wav2Vec2FeatureExtractor
    model.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
        return_attention_mask=True,
    ).save_pretrained(folder)


def _save_with_image_processor(model, folder: Path) -> None:
    from transformers import CLIPImageProcessor
    model.save_pretrained(folder)
    size = int(model.config.image_size)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(folder)


@dataclass(frozen=True)
class Recipe:
    """A random model: how to build it at a size (under the fixed seed) and save it as its loader reads it."""
    build: Callable[[str], Any]
    save: Callable[[Any, Path], None]


# name (the tiny folder's name; the paper's views for the tiny profile) -> recipe
RECIPES: dict[str, Recipe] = {
    "audio": Recipe(_hubert, _save_with_feature_extractor),
    "local": Recipe(_vit_mae, _save_pretrained),
    "temporal": Recipe(_videomae, _save_pretrained),
    "global": Recipe(_eva, _save_timm),
    "wav2vec2": Recipe(_wav2vec2, _save_with_feature_extractor),
    "clip_vision": Recipe(_clip_vision, _save_with_image_processor),
}


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(RECIPES)}")
    return RECIPES[name]


def build_model(name: str, size: str = "tiny", *, seed: int = TINY_SEED):
    """A randomly initialised model of one recipe (no download), in eval mode.

    size: "tiny" for every recipe; "large" for audio/local/temporal (real HuBERT-large, ViT-MAE-large,
    VideoMAE-large sizes); "giant" for global (real EVA-g; 1B parameters, slow on a CPU).
    """
    recipe = _recipe(name)
    with _seeded(seed):
        model = recipe.build(size)
    return model.eval()


def save_model(name: str, model, folder: Path) -> None:
    """Save a model the way its loader reads it back (transformers or timm folder format)."""
    folder.mkdir(parents=True, exist_ok=True)
    _recipe(name).save(model, folder)


def ensure_tiny(view: str, home: Path | None = None) -> Path:
    """The folder of the tiny model `view` (a recipe name: a paper view, wav2vec2, clip_vision), building
    it first if missing or damaged (``store.cache.build_once``: race-safe; a damaged build is rebuilt, with a
    warning)."""
    _recipe(view)
    home = Path(home) if home is not None else default_home()
    return build_once(home / "models" / "tiny" / view, {"recipe": TINY_RECIPE, "seed": TINY_SEED, "view": view},
                      lambda tmp: save_model(view, build_model(view, "tiny"), tmp), f"the tiny {view} model", home)


# --- the authors' checkpoint files ---------------------------------------------------------------

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# Widths whose number of attention heads is not width // 64: EVA-g/14 (1408-d, head dim 88) and
# ViT-H (1280-d, head dim 80), both 16 heads.
KNOWN_HEADS = {1408: 16, 1280: 16}
# The original MAE / VideoMAE / EVA code builds its LayerNorms with eps 1e-6 (transformers'
# config default is 1e-12): the default when no `config` is given.
ORIGINAL_LN_EPS = 1e-6
# VideoMAE's position embedding is a fixed sinusoid table that its checkpoints do not store, so
# the clip geometry cannot be read from the file: these are the pretraining inputs (and the
# paper's), used unless `config` says otherwise.
VIDEOMAE_DEFAULT_FRAMES = 16
VIDEOMAE_DEFAULT_IMAGE = 224


class WeightsFileError(ValueError):
    """A weights file that cannot be read safely, or whose keys are not the expected layout."""


def default_heads(dim: int) -> int:
    """Attention heads of a `dim`-wide ViT when no config says: `KNOWN_HEADS`, else dim // 64."""
    if dim in KNOWN_HEADS:
        return KNOWN_HEADS[dim]
    if dim >= 64 and dim % 64 == 0:
        return dim // 64
    raise WeightsFileError(
        f"cannot tell the number of attention heads of a {dim}-wide model from its tensor shapes "
        f"(the default rule is width // 64): give the source a `config` folder holding a config.json "
        f"with num_attention_heads (HF) or model_args.num_heads (timm)"
    )


def read_state_dict(path: Path) -> dict[str, Any]:
    """The tensors of a .pth/.pt/.bin (torch.load, weights_only) or .safetensors file, on the CPU.

    A top-level "model" / "module" / "state_dict" dict is unwrapped (repeatedly), a "module." key
    prefix (DDP) is stripped. Other top-level entries of a training checkpoint (optimizer, epoch,
    scaler, an argparse `args` Namespace) are ignored. A pickle that needs any other code to load is
    refused.
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file
        from safetensors import SafetensorError
        try:
            obj = load_file(str(path))
        except SafetensorError as e:   # a header or data that ends early, or is not safetensors
            raise _damaged(path, e, "safetensors") from None
        except Exception as e:
            raise WeightsFileError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    else:
        obj = _torch_load(path)
    return _unwrap(obj, path)


def _torch_load(path: Path):
    import torch

    def load(mmap: bool):
        # argparse.Namespace: the MAE / VideoMAE training scripts save their `args` with the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            return load(True)
        except RuntimeError as e:  # the legacy (non-zip) torch.save format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return load(False)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise WeightsFileError(f"{path}: not a readable torch checkpoint ({e})") from e
        why = str(e).strip().splitlines()
        if not any("GLOBAL" in line for line in why):   # "Unsupported operand 65": bytes that are no pickle
            raise _damaged(path, e, "torch") from None
        why = next((line for line in why if "GLOBAL" in line), why[0] if why else "")
        why = why.split(". Please use", 1)[0].strip().removeprefix("WeightsUnpickler error: ")
        raise WeightsFileError(
            f"{path}: refused: loading it would run code stored in the pickle ({why.strip()}). Only plain "
            f"tensors (and dicts/lists of them) are loaded. On a machine where you trust the file, re-save "
            f"its weights alone: `sd = torch.load(f, weights_only=False)['model']; torch.save(sd, 'clean.pth')` "
            f"(or safetensors.torch.save_file(sd, 'clean.safetensors'))."
        ) from e
    except WeightsFileError:
        raise
    except (PermissionError, FileNotFoundError, IsADirectoryError) as e:
        raise WeightsFileError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from e
    except Exception as e:   # a zip without its directory, a record past the end, bytes that are no pickle
        raise _damaged(path, e, "torch") from None


def _damaged(path: Path, e: BaseException, reader: str) -> WeightsFileError:
    """One line for a weights file that `reader` cannot read: truncated (an interrupted copy or download)
    or corrupt; its size and the reader's first sentence (as train.checkpoint.damaged_file says it)."""
    from emollama.extract.sources import DamagedWeightsError

    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    why = lines[0].split(". ")[0] if lines else type(e).__name__
    if not isinstance(e, (RuntimeError, OSError)):
        why = f"{type(e).__name__}: {why}"    # KeyError: 0 says little without its name
    try:
        size = f"{path.stat().st_size:,} bytes"
    except OSError:
        size = "size unknown"
    return DamagedWeightsError(f"{path} is truncated or corrupt ({size}; {reader} cannot read it: {why}): copy "
                               "or download it again")


def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    import torch

    def all_tensors(d):
        return all(isinstance(v, torch.Tensor) for v in d.values())

    for _ in range(4):
        if not isinstance(obj, Mapping) or all_tensors(obj):
            break
        inner = next((obj[k] for k in ("model", "module", "state_dict") if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsFileError(f"{path}: expected a dict of tensors (optionally inside 'model', 'module' or "
                               f"'state_dict'), got {type(obj).__name__}")
    others = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise WeightsFileError(f"{path}: expected a dict of tensors, but {_fmt_keys(others)} are not tensors "
                               f"(top-level keys: {_fmt_keys(list(obj))})")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_config(config: str | Path | None) -> dict | None:
    """The JSON of a `config` entry: a folder holding config.json, or the json file itself."""
    if config is None:
        return None
    p = Path(config).expanduser()
    f = p / "config.json" if p.is_dir() else p
    try:
        out = json.loads(f.read_text())
    except OSError:
        raise FileNotFoundError(
            f"config {str(config)!r}: no config.json there: point `config` at a folder holding a HF or "
            f"timm config.json (e.g. a downloaded facebook/vit-mae-large) or at the json file itself"
        ) from None
    except ValueError as e:
        raise WeightsFileError(f"{f}: not valid JSON ({e})") from e
    if not isinstance(out, dict):
        raise WeightsFileError(f"{f}: expected a JSON object")
    return out


def _fmt_keys(keys, n: int = 8) -> str:
    keys = sorted(map(str, keys))
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _need(sd: Mapping[str, Any], key: str, ndim: int, fmt: str, path: str):
    if key not in sd:
        raise WeightsFileError(f"{path}: not a checkpoint in the {fmt} layout: missing key {key!r} "
                               f"(keys start: {_fmt_keys(list(sd), 6)})")
    t = sd[key]
    if t.ndim != ndim:
        raise WeightsFileError(f"{path}: {fmt} key {key!r} has shape {tuple(t.shape)}, expected {ndim} dims")
    return t


def _vit_geometry(sd, fmt: str, path) -> tuple[int, int, int, int, int, int]:
    """(width, channels, patch, grid side, depth, MLP width) of a ViT state dict with CLS + square grid."""
    w = _need(sd, "patch_embed.proj.weight", 4, fmt, path)
    dim, chans, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    pos = _need(sd, "pos_embed", 3, fmt, path)
    n = int(pos.shape[1]) - 1
    g = int(round(n ** 0.5))
    if n < 1 or g * g != n:
        raise WeightsFileError(f"{path}: pos_embed {tuple(pos.shape)} is not 1 CLS + a square grid of patches")
    depth = _depth(sd, fmt, path)
    mlp = int(_need(sd, "blocks.0.mlp.fc1.weight", 2, fmt, path).shape[0])
    return dim, chans, p, g, depth, mlp


def _depth(sd: Mapping[str, Any], fmt: str, path: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not idx:
        raise WeightsFileError(f"{path}: not a checkpoint in the {fmt} layout: no 'blocks.N.*' keys "
                               f"(keys start: {_fmt_keys(list(sd), 6)})")
    return max(idx) + 1


def _block_spec(i: int, dim: int, mlp: int, bias: str, gamma: bool = False) -> dict[str, tuple]:
    """Expected keys and shapes of timm-style ViT block i. bias: "fused" (attn.qkv.bias), "qv"
    (attn.q_bias + attn.v_bias, no key bias) or "none"."""
    b = f"blocks.{i}."
    spec = {
        b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
        b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
        b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
        b + "mlp.fc1.weight": (mlp, dim), b + "mlp.fc1.bias": (mlp,),
        b + "mlp.fc2.weight": (dim, mlp), b + "mlp.fc2.bias": (dim,),
    }
    if bias == "fused":
        spec[b + "attn.qkv.bias"] = (3 * dim,)
    elif bias == "qv":
        spec[b + "attn.q_bias"] = (dim,)
        spec[b + "attn.v_bias"] = (dim,)
    if gamma:
        spec[b + "gamma_1"] = (dim,)
        spec[b + "gamma_2"] = (dim,)
    return spec


def _check_layout(sd: Mapping[str, Any], expected: Mapping[str, tuple], drop: Mapping[str, str], fmt: str,
                  path: str) -> list[str]:
    """Every expected key present with its shape and a float dtype, every other key a known extra
    (regex -> kind in `drop`). Returns the kinds dropped; raises WeightsFileError naming the keys."""
    missing = [k for k in expected if k not in sd]
    bad = [f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k])})" for k in expected
           if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    bad += [f"{k} dtype {sd[k].dtype} (expected a float type)" for k in expected
            if k in sd and not sd[k].is_floating_point()]
    dropped: dict[str, int] = {}
    unexpected = []
    for k in sd:
        if k in expected:
            continue
        kind = next((kind for pat, kind in drop.items() if re.match(pat, k)), None)
        if kind is None:
            unexpected.append(k)
        else:
            dropped[kind] = dropped.get(kind, 0) + 1
    problems = []
    if missing:
        problems.append(f"missing keys: {_fmt_keys(missing)}")
    if bad:
        more = f" ... and {len(bad) - 8} more" if len(bad) > 8 else ""
        problems.append(f"mis-shaped keys: {'; '.join(bad[:8])}{more}")
    if unexpected:
        problems.append(f"unexpected keys: {_fmt_keys(unexpected)}")
    if problems:
        raise WeightsFileError(
            f"{path}: not a checkpoint in the {fmt} layout: {'; '.join(problems)}. Point `model` at "
            f"the original checkpoint file (see extract.encoders for the accepted layouts), or at a "
            f"transformers/timm model folder instead."
        )
    if dropped:
        log.info("%s: dropped %s", path, ", ".join(f"{n} {kind} tensors" for kind, n in dropped.items()))
    return list(dropped)


def _copy_into(model, tensors: Mapping[str, Any], *, skip: tuple[str, ...] = ()) -> None:
    """Copy converted tensors into the model (cast to its dtype), which must be covered exactly
    (keys starting with a `skip` prefix may stay at their init)."""
    import torch

    target = model.state_dict()
    missing = [k for k in target if k not in tensors and not k.startswith(skip)]
    extra = [k for k in tensors if k not in target]
    if missing or extra:
        raise RuntimeError(
            f"converting to {type(model).__name__}: the converted weights do not match the installed "
            f"library's parameter names (not covered: {_fmt_keys(missing)}; unknown: {_fmt_keys(extra)}); "
            f"this transformers/timm version names its weights differently: please report it"
        )
    with torch.no_grad():
        for k, v in tensors.items():
            if tuple(target[k].shape) != tuple(v.shape):
                raise RuntimeError(f"converting to {type(model).__name__}: {k} is {tuple(v.shape)}, the model "
                                   f"expects {tuple(target[k].shape)}")
            target[k].copy_(v)


def _heads(dim: int, cfg: Mapping[str, Any] | None, path: str) -> tuple[int, str]:
    """(heads, where from): the config's num_attention_heads / num_heads / model_args.num_heads, the
    timm architecture it names, else `default_heads`."""
    heads, src = None, "default"
    if cfg:
        for d in (cfg, cfg.get("model_args") or {}):
            for k in ("num_attention_heads", "num_heads"):
                if heads is None and isinstance(d.get(k), int):
                    heads, src = d[k], "config"
        if heads is None and isinstance(cfg.get("architecture"), str):
            heads = _timm_arch_heads(cfg["architecture"])
            src = "config" if heads else src
    if heads is None:
        heads = default_heads(dim)
    if heads < 1 or dim % heads:
        raise WeightsFileError(f"{path}: {heads} attention heads ({src}) do not divide the width {dim}: fix "
                               f"the num_attention_heads in the source's `config`")
    return heads, src


def _timm_arch_heads(arch: str) -> int | None:
    try:
        import timm
        import torch

        with torch.device("meta"):
            m = timm.create_model(arch, pretrained=False)
        return int(m.blocks[0].attn.num_heads)
    except Exception:
        return None


def resample_pos_embed(pos_embed, grid: int | tuple[int, int], num_prefix_tokens: int = 1,
                       old_grid: tuple[int, int] | None = None):
    """Resize a [1, prefix + h*w, D] position embedding to `grid` patches, as the released model does
    (LAVIS `interpolate_pos_embed`): in fp32, bicubic, align_corners False, no antialias; the prefix
    (CLS) positions kept. Returns fp32; unchanged (as fp32) when the grid already matches."""
    import math

    import torch
    import torch.nn.functional as F

    gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
    pos = pos_embed.detach().float()
    prefix, patches = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
    if old_grid is None:
        g = math.isqrt(patches.shape[1])
        if g * g != patches.shape[1]:
            raise ValueError(f"position embedding of {patches.shape[1]} patches is not a square grid")
        old_grid = (g, g)
    if tuple(old_grid) == (gh, gw):
        return pos
    x = patches.reshape(pos.shape[0], old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(gh, gw), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([prefix, x.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


def eva_to_img_size(model, img_size: int = EVA_IMG_SIZE) -> tuple[int, int] | None:
    """Set a timm Eva to img_size, resampling its position embedding with `resample_pos_embed`
    (not timm's own resample, which uses antialias). Returns the old grid if it was resampled."""
    import torch

    pe = model.patch_embed
    old = tuple(int(g) for g in pe.grid_size)
    new = tuple(img_size // int(p) for p in pe.patch_size)
    if old == new:
        return None
    orig = model.pos_embed.detach().clone() if model.pos_embed is not None else None
    model.set_input_size(img_size=(img_size, img_size))
    if orig is not None:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        with torch.no_grad():
            model.pos_embed.copy_(resample_pos_embed(orig, new, prefix, old_grid=old).to(orig.dtype))
    return old


def _mlp_ratio(dim: int, hidden: int) -> float:
    r = hidden / dim
    return r if int(dim * r) == hidden else (hidden + 0.5) / dim


EVA_FORMAT = "original EVA/LAVIS (eva_vit_g.pth)"
MAE_FORMAT = "MAE repository"
VIDEOMAE_FORMAT = "VideoMAE repository"


def eva_from_state_dict(sd: Mapping[str, Any], *, config: Mapping[str, Any] | None = None,
                        img_size: int = EVA_IMG_SIZE, path: str = "EVA weights"):
    """A timm Eva (EVA_ARCH's class) at img_size from an original-layout EVA state dict.

    Width, depth (= the blocks in the file), MLP width, patch size, input channels, q/v biases and
    layer scale are read from the shapes; heads from `config` or `default_heads`. The position
    embedding is resampled to the img_size grid with `resample_pos_embed`. Weights are loaded in
    fp32. Dropped: the final norm (`norm.*`, `fc_norm.*`: the encoder stops before it), classifier
    heads (`head.*`, `lm_head.*`), `mask_token`, and an EVA-CLIP file's text tower (only `visual.*`
    is kept). Returns (model, info).
    """
    import timm

    if "visual.pos_embed" in sd:  # a whole EVA-CLIP checkpoint: keep its vision tower
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    fmt = EVA_FORMAT
    dim, chans, p, g, depth, mlp = _vit_geometry(sd, fmt, path)
    bias = "qv" if "blocks.0.attn.q_bias" in sd else "none"
    gamma = "blocks.0.gamma_1" in sd
    expected = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + g * g, dim),
                "patch_embed.proj.weight": (dim, chans, p, p), "patch_embed.proj.bias": (dim,)}
    for i in range(depth):
        expected.update(_block_spec(i, dim, mlp, bias, gamma))
    drop = {r"(norm|fc_norm)\.": "final norm (unused)", r"(head|lm_head)\.": "classifier head",
            r"mask_token$": "mask token"}
    dropped = _check_layout(sd, expected, drop, fmt, path)
    heads, heads_from = _heads(dim, config, path)
    if img_size % p:
        raise WeightsFileError(f"{path}: patch size {p} does not divide the input size {img_size}")
    model = timm.create_model(
        EVA_ARCH, pretrained=False, img_size=img_size, num_classes=0, in_chans=chans, patch_size=p,
        embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=_mlp_ratio(dim, mlp),
        qkv_bias=bias == "qv", init_values=1.0 if gamma else None,
    )
    tensors = {k: sd[k] for k in expected}
    tensors["pos_embed"] = resample_pos_embed(sd["pos_embed"], img_size // p)
    _copy_into(model, tensors, skip=("norm.", "fc_norm.", "head."))
    info = {"format": "eva", "num_heads": heads, "num_heads_from": heads_from, "depth_in_file": depth,
            "pos_embed_grid": [g, g], "dropped": dropped}
    return model.float().eval(), info


def _hf_layer(keys, i: int) -> dict[str, str]:
    """Role -> key prefix of layer i of a transformers ViT-like encoder (v5 or v4 names)."""
    bases = [b for b in (f"layers.{i}.", f"encoder.layers.{i}.", f"encoder.layer.{i}.")
             if any(k.startswith(b) for k in keys)]
    roles = {
        "q": ("attention.q_proj", "attention.attention.query"),
        "k": ("attention.k_proj", "attention.attention.key"),
        "v": ("attention.v_proj", "attention.attention.value"),
        "o": ("attention.o_proj", "attention.output.dense"),
        "ln1": ("layernorm_before",), "ln2": ("layernorm_after",),
        "fc1": ("mlp.fc1", "intermediate.dense"), "fc2": ("mlp.fc2", "output.dense"),
    }
    out = {"base": bases[0] if bases else ""}
    for role, names in roles.items():
        hit = [out["base"] + n for n in names if out["base"] + n + ".weight" in keys]
        if not hit:
            raise RuntimeError(f"unknown transformers layout: no {role} weight in layer {i} (this transformers "
                               f"version names its weights differently: please report it)")
        out[role] = hit[0]
    return out


def _hf_blocks(sd: Mapping[str, Any], keys, depth: int, bias: str) -> dict[str, Any]:
    """timm-style blocks (fused qkv) -> transformers ViT layers (split query/key/value)."""
    out = {}
    for i in range(depth):
        t, b = _hf_layer(keys, i), f"blocks.{i}."
        for role, x in zip("qkv", sd[b + "attn.qkv.weight"].chunk(3, dim=0)):
            out[t[role] + ".weight"] = x
        if bias == "fused":
            for role, x in zip("qkv", sd[b + "attn.qkv.bias"].chunk(3, dim=0)):
                out[t[role] + ".bias"] = x
        elif bias == "qv":
            for role, src in (("q", "attn.q_bias"), ("v", "attn.v_bias")):
                name = next((n for n in (t[role] + ".bias", t["base"] + f"attention.attention.{role}_bias")
                             if n in keys), None)
                if name is None:
                    raise RuntimeError(f"unknown transformers layout: no {role} bias in layer {i}")
                out[name] = sd[b + src]
        for role, src in (("o", "attn.proj"), ("ln1", "norm1"), ("ln2", "norm2"), ("fc1", "mlp.fc1"),
                          ("fc2", "mlp.fc2")):
            out[t[role] + ".weight"] = sd[b + src + ".weight"]
            out[t[role] + ".bias"] = sd[b + src + ".bias"]
    return out


def _hf_config(cls, cfg: Mapping[str, Any] | None, model_type: str, path: str, defaults: dict, shapes: dict):
    """A transformers config: the original repository's defaults, overlaid by the `config` JSON, with
    every field the tensor shapes tell overridden by the shapes (a disagreement is logged)."""
    if cfg is None:
        conf = cls(**defaults)
    else:
        if cfg.get("model_type") not in (None, model_type):
            raise WeightsFileError(f"{path}: the source's config is a {cfg.get('model_type')!r} config, "
                                   f"expected {model_type!r}: point `config` at a {model_type} model folder")
        conf = cls.from_dict({**defaults, **cfg})
        differ = {k: (cfg[k], v) for k, v in shapes.items() if k in cfg and cfg[k] != v}
        if differ:
            log.warning("%s: the config disagrees with the tensor shapes, which win: %s", path,
                        ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differ.items()))
    for k, v in shapes.items():
        setattr(conf, k, v)
    return conf


def vit_mae_from_state_dict(sd: Mapping[str, Any], *, config: Mapping[str, Any] | None = None,
                            path: str = "MAE weights"):
    """A transformers ViTMAEModel from an MAE-repository state dict (timm ViT names).

    Width, depth, MLP width, patch size, channels, image size (from pos_embed), qkv bias from the
    shapes; heads, layer_norm_eps and hidden_act from `config` (else default_heads, 1e-6, gelu).
    Dropped: the decoder (`decoder_*`: decoder_embed, decoder_blocks, decoder_norm, decoder_pred,
    decoder_pos_embed), `mask_token`, a classifier `head.*`. Returns (model, info).
    """
    from transformers import ViTMAEConfig, ViTMAEModel

    fmt = MAE_FORMAT
    dim, chans, p, g, depth, mlp = _vit_geometry(sd, fmt, path)
    bias = "fused" if "blocks.0.attn.qkv.bias" in sd else "none"
    expected = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + g * g, dim),
                "patch_embed.proj.weight": (dim, chans, p, p), "patch_embed.proj.bias": (dim,),
                "norm.weight": (dim,), "norm.bias": (dim,)}
    for i in range(depth):
        expected.update(_block_spec(i, dim, mlp, bias))
    drop = {r"decoder_": "decoder", r"mask_token$": "mask token", r"head\.": "classifier head"}
    dropped = _check_layout(sd, expected, drop, fmt, path)
    heads, heads_from = _heads(dim, config, path)
    conf = _hf_config(
        ViTMAEConfig, config, "vit_mae", path,
        defaults=dict(layer_norm_eps=ORIGINAL_LN_EPS, hidden_act="gelu"),
        shapes=dict(hidden_size=dim, num_hidden_layers=depth, intermediate_size=mlp, patch_size=p,
                    image_size=g * p, num_channels=chans, qkv_bias=bias == "fused",
                    num_attention_heads=heads, mask_ratio=0.0),
    )
    model = ViTMAEModel(conf)
    keys = set(model.state_dict())
    tensors = _hf_blocks(sd, keys, depth, bias)
    tensors.update({
        "embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"],
    })
    _copy_into(model, tensors)
    info = {"format": "mae", "num_heads": heads, "num_heads_from": heads_from,
            "layer_norm_eps": conf.layer_norm_eps, "hidden_act": conf.hidden_act, "dropped": dropped}
    return model.float().eval(), info


def videomae_from_state_dict(sd: Mapping[str, Any], *, config: Mapping[str, Any] | None = None,
                             path: str = "VideoMAE weights"):
    """A transformers VideoMAEModel from a VideoMAE-repository state dict.

    Pretraining layout: `encoder.*` (patch_embed Conv3d, blocks with qkv weight + q_bias/v_bias,
    `encoder.norm`), plus the decoder; the fine-tuning layout (no `encoder.` prefix, `fc_norm` +
    `head`) is accepted too. Width, depth, MLP width, patch size, tubelet size, channels, q/v bias
    from the shapes; heads, layer_norm_eps, hidden_act, num_frames and image_size from `config`
    (else default_heads, 1e-6, gelu, 16 frames, 224). With `norm.*` the model applies that final norm
    (use_mean_pooling False); a file with only `fc_norm.*` (a fine-tuned classifier's norm after
    pooling) gives the un-normed tokens (use_mean_pooling True), as transformers does. Dropped: the
    decoder (`decoder.*`, `encoder_to_decoder.*`), `mask_token`, classifier `head.*`, `fc_norm.*`, and
    a stored `pos_embed` once checked equal to the fixed sinusoid table. Returns (model, info).
    """
    import torch
    from transformers import VideoMAEConfig, VideoMAEModel

    fmt = VIDEOMAE_FORMAT
    if any(k.startswith("encoder.") for k in sd):
        sd = {(k[len("encoder."):] if k.startswith("encoder.") else k): v for k, v in sd.items()}
    w = _need(sd, "patch_embed.proj.weight", 5, fmt, path)
    dim, chans, t, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2]), int(w.shape[3])
    depth = _depth(sd, fmt, path)
    mlp = int(_need(sd, "blocks.0.mlp.fc1.weight", 2, fmt, path).shape[0])
    bias = "qv" if "blocks.0.attn.q_bias" in sd else "none"
    final_norm = "norm.weight" in sd or "fc_norm.weight" not in sd
    expected = {"patch_embed.proj.weight": (dim, chans, t, p, p), "patch_embed.proj.bias": (dim,)}
    if final_norm:
        expected.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    for i in range(depth):
        expected.update(_block_spec(i, dim, mlp, bias))
    drop = {r"decoder\.": "decoder", r"encoder_to_decoder\.": "decoder", r"mask_token$": "mask token",
            r"head\.": "classifier head", r"fc_norm\.": "classifier norm (after pooling)",
            r"pos_embed$": "fixed sinusoid position table"}
    dropped = _check_layout(sd, expected, drop, fmt, path)
    heads, heads_from = _heads(dim, config, path)
    defaults = dict(layer_norm_eps=ORIGINAL_LN_EPS, hidden_act="gelu", num_frames=VIDEOMAE_DEFAULT_FRAMES,
                    image_size=VIDEOMAE_DEFAULT_IMAGE)
    shapes = dict(hidden_size=dim, num_hidden_layers=depth, intermediate_size=mlp, patch_size=p,
                  tubelet_size=t, num_channels=chans, num_attention_heads=heads,
                  use_mean_pooling=not final_norm)
    conf = _hf_config(VideoMAEConfig, config, "videomae", path, defaults, shapes)
    conf.qv_bias = bias == "qv"
    conf.qkv_bias = bias == "qv"  # the name before transformers 5
    if conf.num_frames % t or conf.image_size % p:
        raise WeightsFileError(f"{path}: tubelet {t} / patch {p} do not divide num_frames {conf.num_frames} / "
                               f"image_size {conf.image_size}: fix them in the source's `config`")
    model = VideoMAEModel(conf)
    if "pos_embed" in sd:
        table = model.embeddings.position_embeddings
        pe = sd["pos_embed"].float()
        if tuple(pe.shape) != tuple(table.shape):
            raise WeightsFileError(
                f"{path}: pos_embed {tuple(pe.shape)} does not fit {conf.num_frames} frames at "
                f"{conf.image_size}x{conf.image_size} ({tuple(table.shape)}): set num_frames and image_size "
                f"in the source's `config`"
            )
        if not torch.allclose(pe, table.float(), atol=2e-3):
            raise WeightsFileError(
                f"{path}: pos_embed is not VideoMAE's fixed sinusoid table (a learned position embedding?): "
                f"transformers' VideoMAEModel cannot hold it; use a checkpoint trained with the fixed table"
            )
    keys = set(model.state_dict())
    tensors = _hf_blocks(sd, keys, depth, bias)
    tensors.update({"embeddings.patch_embeddings.projection.weight": w,
                    "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"]})
    if final_norm:
        tensors.update({"layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]})
    _copy_into(model, tensors)
    info = {"format": "videomae", "num_heads": heads, "num_heads_from": heads_from,
            "layer_norm_eps": conf.layer_norm_eps, "hidden_act": conf.hidden_act,
            "num_frames": conf.num_frames, "image_size": conf.image_size, "final_norm": final_norm,
            "dropped": dropped}
    return model.float().eval(), info
