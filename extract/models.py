"""Randomly initialised encoder models: the `tiny` profile and real-size stand-ins for benchmarks.

The tiny models are the same classes as the real encoders with the real token geometry
(HuBERT's conv strides -> 50 frames/s, ViT-MAE 224/16 -> 196 patches, VideoMAE 16x224x224 with
tubelet 2 and patch 16 -> 1568 tokens, EVA 448/14 -> 1024 patches + CLS) but tiny widths, and a
different width per view so that a feature handed to the wrong slot fails loudly:

    audio 32, local 40, temporal 24, global 48

They are built from a fixed seed, so every build writes identical bytes (same torch/transformers/
timm versions), and saved on first use under ``<home>/models/tiny/<view>``. A build goes into a
temporary folder beside the target and is renamed into place, so two processes building at once
are safe (the loser throws its copy away). They exist for tests and the offline demo only.

Torch, transformers and timm are imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VIEWS = ("audio", "local", "temporal", "global")
TINY_SEED = 1234
# Bump when a tiny recipe changes: folders built by an older recipe are rebuilt.
TINY_RECIPE = 1
TINY_MARKER = "emollama-tiny.json"
TINY_DIMS = {"audio": 32, "local": 40, "temporal": 24, "global": 48}

# timm architecture of the global view (EVA-CLIP-g/14's visual tower, see encoders.PAPER)
EVA_ARCH = "eva_giant_patch14_clip_224"
EVA_IMG_SIZE = 448


def default_home() -> Path:
    """The project's cache folder: env EMOLLAMA_HOME, else ~/.cache/emollama."""
    env = os.environ.get("EMOLLAMA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "emollama"


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

def build_model(view: str, size: str = "tiny", *, seed: int = TINY_SEED):
    """A randomly initialised model of one view (no download), in eval mode.

    size: "tiny" for every view; "large" for audio/local/temporal (real HuBERT-large, ViT-MAE-large,
    VideoMAE-large sizes); "giant" for global (real EVA-g; 1B parameters, slow on a CPU).
    """
    with _seeded(seed):
        if view == "audio":
            from transformers import HubertModel
            model = HubertModel(hubert_config(size))
        elif view == "local":
            from transformers import ViTMAEModel
            model = ViTMAEModel(vit_mae_config(size))
        elif view == "temporal":
            from transformers import VideoMAEModel
            model = VideoMAEModel(videomae_config(size))
        elif view == "global":
            import timm
            model = timm.create_model(EVA_ARCH, pretrained=False, **eva_args(size))
        else:
            raise ValueError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)}")
    return model.eval()


def save_model(view: str, model, folder: Path) -> None:
    """Save a model the way its loader reads it back (transformers or timm folder format)."""
    folder.mkdir(parents=True, exist_ok=True)
    if view == "global":
        from timm.models import save_for_hf
        save_for_hf(model, str(folder), safe_serialization=True)
    else:
        model.save_pretrained(folder)
        if view == "audio":
            from transformers import Wav2Vec2FeatureExtractor
            Wav2Vec2FeatureExtractor(
                feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                return_attention_mask=True,
            ).save_pretrained(folder)


def _marker_ok(folder: Path) -> bool:
    try:
        return json.loads((folder / TINY_MARKER).read_text()).get("recipe") == TINY_RECIPE
    except (OSError, ValueError):
        return False


def ensure_tiny(view: str, home: Path | None = None) -> Path:
    """The folder of the tiny model of `view`, building it first if missing (race-safe)."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}: expected one of {', '.join(VIEWS)}")
    home = Path(home) if home is not None else default_home()
    final = home / "models" / "tiny" / view
    if _marker_ok(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{view}-build-", dir=final.parent))
    try:
        log.info("building the tiny %s model into %s", view, final)
        save_model(view, build_model(view, "tiny"), tmp)
        (tmp / TINY_MARKER).write_text(json.dumps({"recipe": TINY_RECIPE, "seed": TINY_SEED,
                                                   "view": view}, sort_keys=True) + "\n")
        if final.exists() and not _marker_ok(final):
            # stale recipe (or a broken folder): move it aside, then put the new one in place
            old = final.parent / f".{view}-old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _marker_ok(final):  # not another builder's finished copy: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
