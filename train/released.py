"""The released checkpoints of Emotion-LLaMA and MiniGPT-v2, mapped onto our model.

Every released file (``Emotion_LLaMA.pth``, ``checkpoint_best.pth``, ``MER2024-best.pth``, and
MiniGPT-v2's ``minigptv2_checkpoint.pth``) is a ``torch.save`` of a dict whose ``"model"`` entry holds
the trainable tensors only:

    llama_proj.{weight,bias}          [H, 4 D_eva]   -> the global patch projector (4 tokens grouped)
    cls_tk_llama_proj.{weight,bias}   [H, D_eva]     -> the global CLS projector
    feats_llama_proj1.{weight,bias}   [H, 1024]      -> local (face MAE)
    feats_llama_proj2.{weight,bias}   [H, 1024]      -> temporal (VideoMAE)
    feats_llama_proj3.{weight,bias}   [H, 1024]      -> audio (HuBERT)
    llama_model.base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}.weight  -> the LoRA adapter

MiniGPT-v2's file holds ``llama_proj`` and the LoRA only: the other four projectors are new in
Emotion-LLaMA and start fresh. ``attention.*`` (a module the released code builds but never calls) and
``*.rotary_emb.inv_freq`` (a buffer some transformers versions save) are ignored with that reason.
Every other key is an error, and so is every expected key that is missing or mis-shaped: all of them
are listed at once. Files are read with ``torch.load(weights_only=True)``: a pickle that needs code is
refused; a tensor that holds NaN or Inf is refused by name.

Which projector a tensor feeds is decided by role (modality and part), not by name, so the mapping
works whatever the run calls its feature sets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from emollama.store.cache import default_home
from emollama.store.spec import FeatureSpec

from .checkpoint import CheckpointError, check_finite, load_torch, save_projectors, versions, write_json
from .config import PAPER_LLM, DataConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from .model import MissingModelError, Projectors, projector_meta
from .params import LLAMA2_7B, meta_model
from .runfolder import check_out, clear_run, lock
from .tiny import ensure_tiny_llm

# released projector name -> (modality, part) of our projector
PROJECTORS: dict[str, tuple[str, str]] = {
    "llama_proj": ("global", "patches"),
    "cls_tk_llama_proj": ("global", "cls"),
    "feats_llama_proj1": ("local", "vector"),
    "feats_llama_proj2": ("temporal", "vector"),
    "feats_llama_proj3": ("audio", "vector"),
}
MINIGPT_V2_PROJECTORS = ("llama_proj",)
LORA_PREFIX = "llama_model."
LORA_KEY = re.compile(r"^llama_model\.(base_model\.model\.model\.layers\.\d+\.\S+\.lora_[AB])(?:\.default)?\.weight$")
IGNORED: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^attention\."), "an unused module of the released code (built, never called in forward)"),
    (re.compile(r"(^|\.)rotary_emb\.inv_freq$"), "a rotary-embedding buffer that some transformers versions save"),
)
KINDS = ("emotion-llama", "minigpt-v2")
# the label set of the released emotion instruction
RELEASED_LABELS = ["happy", "sad", "neutral", "angry", "worried", "surprise", "fear", "contempt", "doubt"]


class ReleasedCheckpointError(CheckpointError):
    """A released checkpoint does not fit the model; the message lists every problem."""


@dataclass
class Mapped:
    """A released state dict, sorted: what feeds which projector and the adapter, what is ignored."""

    projectors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)   # our projector -> weight/bias
    lora: dict[str, torch.Tensor] = field(default_factory=dict)                    # PEFT keys, no adapter name
    ignored: dict[str, str] = field(default_factory=dict)                          # key -> why
    fresh: list[str] = field(default_factory=list)                                 # our projectors left as built
    used: list[str] = field(default_factory=list)                                  # released keys used

    def summary(self) -> dict[str, Any]:
        return {"used": len(self.used), "projectors": sorted(self.projectors), "lora_tensors": len(self.lora),
                "ignored": {k: v for k, v in sorted(self.ignored.items())}, "fresh": self.fresh}


def read_released(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``"model"`` dict of a released checkpoint (``torch.load(weights_only=True)``)."""
    path = Path(path)
    obj = load_torch(path)
    state = obj.get("model") if isinstance(obj, Mapping) and "model" in obj else obj
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ReleasedCheckpointError(f"{path}: expected a dict with a 'model' entry of named tensors "
                                      "(the layout of Emotion_LLaMA.pth / minigptv2_checkpoint.pth)")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ReleasedCheckpointError(f"{path}: entries that are not tensors: {bad[:5]}")
    check_finite(state, path)
    return dict(state)


def guess_kind(state: Mapping[str, Any]) -> str:
    """"emotion-llama" when the file has Emotion-LLaMA's own projectors, else "minigpt-v2"."""
    return "emotion-llama" if any(k.startswith(("feats_llama_proj", "cls_tk_llama_proj")) for k in state) \
        else "minigpt-v2"


def released_dims(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Sizes read off the tensors: LM hidden size, EVA width, the three feature widths, LoRA rank,
    layers and target modules (for building a matching model before mapping)."""
    out: dict[str, Any] = {}
    if "llama_proj.weight" in state:
        h, d4 = state["llama_proj.weight"].shape
        out.update(hidden=int(h), eva_group_dim=int(d4))
    for name, (modality, part) in PROJECTORS.items():
        w = state.get(f"{name}.weight")
        if w is not None and part == "vector":
            out[modality] = int(w.shape[1])
        if w is not None and part == "cls":
            out["eva_dim"] = int(w.shape[1])
    layers, targets, rank = set(), set(), None
    for k, v in state.items():
        m = re.search(r"layers\.(\d+)\.(?:\S+\.)?(\w+)\.lora_A(?:\.default)?\.weight$", k)
        if m and k.startswith(LORA_PREFIX):
            layers.add(int(m.group(1)))
            targets.add(m.group(2))
            rank = int(v.shape[0])
    out.update(lora_layers=len(layers), lora_targets=sorted(targets), lora_r=rank)
    return out


def _ignored(key: str) -> str | None:
    for pattern, why in IGNORED:
        if pattern.search(key):
            return why
    return None


def map_released(state: Mapping[str, torch.Tensor], model, *, kind: str = "emotion-llama",
                 source: str = "checkpoint") -> Mapped:
    """Sort ``state`` onto ``model`` (a ``train.model.EmoModel``, possibly on the meta device).

    Raises ReleasedCheckpointError naming every missing, mis-shaped or unexpected key."""
    from peft import get_peft_model_state_dict   # peft imports transformers: only when a checkpoint is mapped

    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}: choose {' or '.join(KINDS)}")
    problems: list[str] = []
    out = Mapped()
    by_role: dict[tuple[str, str], list] = {}
    for spec in model.projectors.specs.values():
        by_role.setdefault((spec.modality, spec.part), []).append(spec)
    expected_proj = PROJECTORS if kind == "emotion-llama" else {k: PROJECTORS[k] for k in MINIGPT_V2_PROJECTORS}
    claimed: set[str] = set()
    reported: set[str] = set()
    for name, role in expected_proj.items():
        specs = by_role.get(role, [])
        if len(specs) != 1:
            what = f"{role[0]} {role[1]}" if role[1] != "vector" else role[0]
            problems.append(f"{name} feeds the {what} projector, but the model has "
                            f"{'none' if not specs else len(specs)} (feature sets: "
                            f"{sorted({s.set_name for s in model.projectors.specs.values()})})")
            continue
        spec = specs[0]
        layer = model.projectors.layers[spec.name]
        tensors = {}
        for part in ("weight", "bias"):
            key = f"{name}.{part}"
            want = tuple(getattr(layer.linear, part).shape)
            if key not in state:
                problems.append(f"missing key {key} (expected shape {list(want)})")
            elif tuple(state[key].shape) != want:
                problems.append(f"{key}: shape {list(state[key].shape)}, the model's {spec.name}.{part} is {list(want)}")
                reported.add(key)
            else:
                tensors[part] = state[key]
                claimed.add(key)
        if len(tensors) == 2:
            out.projectors[spec.name] = tensors
    out.fresh = sorted(n for n in model.projectors.layers if n not in out.projectors)

    want_lora = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model.llm).items() if ".lora_" in k}
    got_lora: dict[str, str] = {}
    for key in state:
        m = LORA_KEY.match(key)
        if m:
            got_lora[m.group(1) + ".weight"] = key
    for peft_key, shape in sorted(want_lora.items()):
        src = got_lora.get(peft_key)
        if src is None:
            problems.append(f"missing key {LORA_PREFIX + peft_key} (expected shape {list(shape)})")
        elif tuple(state[src].shape) != shape:
            problems.append(f"{src}: shape {list(state[src].shape)}, the adapter's is {list(shape)}")
            reported.add(src)
        else:
            out.lora[peft_key] = state[src]
            claimed.add(src)

    for key in state:
        if key in claimed or key in reported:
            continue
        why = _ignored(key)
        if why:
            out.ignored[key] = why
        elif key in got_lora.values():
            problems.append(f"unexpected key {key}: a LoRA tensor for a layer or module the model does not have "
                            f"(the adapter targets {sorted({k.split('.')[-3] for k in want_lora})})")
        else:
            problems.append(f"unexpected key {key} {list(state[key].shape)}: not part of the {kind} layout")
    if problems:
        raise ReleasedCheckpointError(f"{source} does not fit the model ({len(problems)} problem(s)):\n"
                                      + "\n".join(f"  - {p}" for p in problems))
    out.used = sorted(claimed)
    return out


@torch.no_grad()
def apply_mapped(model, mapped: Mapped) -> None:
    """Copy mapped tensors into ``model``'s projectors and adapter (which must hold real tensors)."""
    from peft import set_peft_model_state_dict   # peft imports transformers: only when a checkpoint is mapped

    for name, tensors in mapped.projectors.items():
        linear = model.projectors.layers[name].linear
        linear.weight.copy_(tensors["weight"].to(linear.weight.dtype))
        linear.bias.copy_(tensors["bias"].to(linear.bias.dtype))
    if mapped.lora:
        dtype = next(p for n, p in model.llm.named_parameters() if ".lora_" in n).dtype
        result = set_peft_model_state_dict(model.llm, {k: v.to(dtype) for k, v in mapped.lora.items()})
        unexpected = getattr(result, "unexpected_keys", []) or []
        if unexpected:
            raise ReleasedCheckpointError(f"the adapter did not take {unexpected[:3]}")


def init_from_minigpt_v2(model, path: str | Path) -> Mapped:
    """Start as the paper did: MiniGPT-v2's ``llama_proj`` into the global patch projector, its LoRA
    into the adapter; the other projectors keep their fresh initialisation."""
    state = read_released(path)
    kind = guess_kind(state)
    if kind != "minigpt-v2":
        raise ReleasedCheckpointError(
            f"{path} holds Emotion-LLaMA's own projectors (feats_llama_proj*, cls_tk_llama_proj): it is a released "
            "Emotion-LLaMA checkpoint, not MiniGPT-v2's. Import it with `emollama import-checkpoint` and start "
            "from it with run.init_from instead")
    mapped = map_released(state, model, kind="minigpt-v2", source=str(path))
    apply_mapped(model, mapped)
    return mapped


# ---------------------------------------------------------------------------------------------
# Importing a released checkpoint as a run folder

# the store sets an imported run reads by default; at evaluation each is bound to the store's one set
# of the same modality and shape when no set of this name exists (see pipeline.evaluation.bind_store)
RELEASED_SETS = {
    "global": ("global.eva.tokens", "eva", "none"),
    "local": ("local.vit_mae.mean", "vit_mae", "mean"),
    "temporal": ("temporal.videomae.mean", "videomae", "mean"),
    "audio": ("audio.hubert.mean", "hubert", "mean"),
}
EVA_TOKENS = 1025   # CLS + 32 x 32 patches at 448 (the patch projector groups them 4 by 4: 256 tokens)


def _binding_specs(dims: Mapping[str, Any], kind: str, names: Mapping[str, str]):
    out = []
    for modality in ("global", "local", "temporal", "audio"):
        if kind == "minigpt-v2" and modality != "global":
            continue
        default, encoder, pooling = RELEASED_SETS[modality]
        if modality == "global":
            dim = dims.get("eva_dim") or dims["eva_group_dim"] // 4
            shape: tuple = (EVA_TOKENS, dim)
        else:
            shape = (dims[modality],)
        spec = FeatureSpec(name=names.get(modality, default), modality=modality, encoder=encoder,
                           weights="bound at evaluation", layer="", pooling=pooling, shape=shape,
                           params={"binding": "the store's set of this name, else its one set of this modality "
                                              "and shape"})
        out.append((f"bind:{spec.name}", spec))
    return out


def _llm_config(profile: str, llm: str, home: Path | None):
    from transformers import AutoConfig, LlamaConfig   # transformers: slow to import, only when a config is read

    if llm:
        local = Path(llm).expanduser()
        try:
            return AutoConfig.from_pretrained(str(local) if local.is_dir() else llm,
                                              local_files_only=local.is_dir() or None)
        except (OSError, ValueError) as e:
            raise MissingModelError(f"cannot read the language model's config.json from {llm!r}: {e}") from None
    if profile == "tiny":
        return AutoConfig.from_pretrained(ensure_tiny_llm(home or default_home()), local_files_only=True)
    return LlamaConfig(**LLAMA2_7B)


def import_checkpoint(path: str | Path, out: str | Path, *, profile: str = "paper", llm: str = "",
                      home: Path | None = None, kind: str | None = None,
                      names: Mapping[str, str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write a run folder from a released checkpoint: the PEFT adapter, the projectors (safetensors), a
    config with the ``emotion-llama`` prompt style and the feature-set binding. No LM weights are
    loaded: the mapping is checked against a model built on the meta device from the LM's config.

    ``out`` must be new or empty, or hold a run that ``overwrite`` replaces (``train.runfolder``); the
    checkpoint is read and checked first, then ``out`` is locked while it is written."""
    from peft import LoraConfig as PeftLoraConfig   # peft imports transformers: only when a checkpoint is imported

    path, out = Path(path), Path(out)
    check_out(out, resume=False, overwrite=overwrite)
    state = read_released(path)
    kind = kind or guess_kind(state)
    dims = released_dims(state)
    if "hidden" not in dims or not dims.get("lora_r"):
        raise ReleasedCheckpointError(f"{path}: no llama_proj or no LoRA tensors: not a released Emotion-LLaMA or "
                                      "MiniGPT-v2 checkpoint")
    llm_cfg = _llm_config(profile, llm, home)
    if llm_cfg.hidden_size != dims["hidden"]:
        raise ReleasedCheckpointError(
            f"{path} was trained on an LM of hidden size {dims['hidden']}, but the chosen LM "
            f"({llm or profile}) has {llm_cfg.hidden_size}: use --profile paper (LLaMA-2-7B-chat) or --llm with a "
            f"local folder of an LM of hidden size {dims['hidden']}")
    sets = _binding_specs(dims, kind, names or {})
    cfg = TrainConfig(
        data=DataConfig(dataset="mer2023", features=[s.name for _, s in sets], tasks=["emotion", "reason"],
                        labels=list(RELEASED_LABELS), prompt="emotion-llama", standardize=False),
        model=ModelConfig(profile=profile, llm=llm, ln_vision=True),
        lora=LoraConfig(r=dims["lora_r"], alpha=16, dropout=0.05, target_modules=dims["lora_targets"]),
        run=RunConfig(out=str(out.resolve())))
    meta = meta_model(llm_cfg, sets, cfg)
    specs = list(meta.projectors.specs.values())
    mapped = map_released(state, meta, kind=kind, source=str(path))
    if mapped.fresh:
        raise ReleasedCheckpointError(f"{path} is a {kind} checkpoint without {mapped.fresh}: it cannot be run as a "
                                      "model; use it as [init] minigpt_v2 in a training config instead")

    projectors = Projectors(specs)
    with torch.no_grad():
        for name, tensors in mapped.projectors.items():
            linear = projectors.layers[name].linear
            linear.weight.copy_(tensors["weight"].float())
            linear.bias.copy_(tensors["bias"].float())
    info = {"source": str(path.resolve()), "kind": kind, "dims": dims, **mapped.summary()}
    with lock(out, "emollama import-checkpoint"):
        if check_out(out, resume=False, overwrite=overwrite) == "overwrite":
            clear_run(out)
        adapter = out / "adapter"
        adapter.mkdir(exist_ok=True)
        PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none",
                       target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM",
                       base_model_name_or_path=llm or (PAPER_LLM if profile == "paper" else "tiny")
                       ).save_pretrained(adapter)
        save_file({k: v.detach().float().contiguous() for k, v in mapped.lora.items()},
                  str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
        save_projectors(projectors, out, projector_meta(meta, cfg.data.patch_group))
        write_json(out / "config.json", cfg.to_dict())
        write_json(out / "feature_sets.json",
                   {k: {"name": s.name, "spec": s.to_dict(), "bind": True} for k, s in sets})
        write_json(out / "versions.json", versions())
        write_json(out / "imported.json", info)
    return info
