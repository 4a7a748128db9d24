"""Parameter counts of a profile without weights: the model is built on the meta device.

The paper's LM is LLaMA-2-7B (32 layers, hidden 4096, 32 heads, MLP 11008, vocab 32000); its shapes
are written here so that counting needs no download. PEFT's percentage is LoRA over every parameter
of the PEFT model (base + LoRA), as ``print_trainable_parameters`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from emollama.store import FeatureStore
from emollama.store.spec import FeatureSpec

from .config import PAPER_FEATURES, TrainConfig, TrainSetupError, load_train_config
from .modalities import MODALITIES
from .run import read_run
from .model import EmoModel, assemble, count_parameters, llm_source
from .tiny import TINY_LLM, TINY_VOCAB, is_tiny_fixture

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 tie_word_embeddings=False)

# per-clip shapes of the paper's feature sets (see the README's extraction table), and the HuBERT frames
PAPER_SHAPES = {**{m.paper_set: (m.name, m.paper_shape) for m in MODALITIES},
                "audio.hubert.frames": ("audio", (None, 1024))}


@dataclass(frozen=True)
class SetShape:
    name: str
    modality: str
    shape: tuple


def paper_sets(names: Sequence[str]) -> list[tuple[str, SetShape]]:
    out = []
    for n in names:
        if n not in PAPER_SHAPES:
            raise TrainSetupError(f"no paper shape known for feature set {n!r} (known: {', '.join(PAPER_SHAPES)}); "
                             "pass --store to read the shapes from a store")
        modality, shape = PAPER_SHAPES[n]
        out.append((n, SetShape(n, modality, shape)))
    return out


def meta_model(llm_config, sets, cfg: TrainConfig) -> EmoModel:
    """The model of ``cfg`` over ``sets`` on the meta device; ``llm_config`` is a transformers config or
    the keyword arguments of a LlamaConfig."""
    from transformers import AutoModelForCausalLM, LlamaConfig   # transformers: slow to import, only when a model is built

    if isinstance(llm_config, dict):
        llm_config = LlamaConfig(**llm_config)
    with torch.device("meta"):
        return assemble(AutoModelForCausalLM.from_config(llm_config), cfg, sets)


def count_for_run(path: str | Path) -> dict[str, Any]:
    """Counts of a run folder (trained or imported) from its config and feature sets, on the meta device."""
    from transformers import AutoConfig   # transformers: slow to import, only when a model is built

    cfg, sets, keys = read_run(Path(path))
    specs = [(k, FeatureSpec.from_dict(sets[k]["spec"])) for k in keys]
    if cfg.model.profile == "paper" and not cfg.model.llm:
        llm_config = LLAMA2_7B
    else:
        src = llm_source(cfg)
        llm_config = AutoConfig.from_pretrained(src, local_files_only=Path(src).is_dir() or None)
    counts = count_parameters(meta_model(llm_config, specs, cfg))
    counts.update(profile=cfg.model.profile, run=str(path), features=[s.name for _, s in specs],
                  lora_config={"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                               "target_modules": cfg.lora.target_modules},
                  note="counted on the meta device (no weights)" + (
                      "; tiny = a random test fixture" if is_tiny_fixture(cfg.model) else ""))
    return counts


def count_for_profile(profile: str, *, config: str | Path | None = None, store: str | None = None,
                      features: Sequence[str] | None = None) -> dict[str, Any]:
    if profile not in ("paper", "tiny"):
        raise TrainSetupError(f"unknown profile {profile!r}: choose paper or tiny")
    cfg = load_train_config(config, None) if config else TrainConfig()
    names = list(features or cfg.data.features or PAPER_FEATURES)
    if store:
        st = FeatureStore.open(store, create=False)
        specs = st.sets()
        sets = [(k, specs[k]) for k in (st.resolve(n) for n in names)]
    elif profile == "paper":
        sets = paper_sets(names)
    else:
        raise TrainSetupError("the tiny profile's feature widths come from a store: pass --store PATH")
    llm_config = LLAMA2_7B if profile == "paper" else dict(vocab_size=TINY_VOCAB, **TINY_LLM)
    counts = count_parameters(meta_model(llm_config, sets, cfg))
    counts.update(profile=profile, features=names,
                  lora_config={"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                               "target_modules": cfg.lora.target_modules},
                  note="counted on the meta device (no weights)" + (
                      "; tiny = a random test fixture" if profile == "tiny" else ""))
    return counts
