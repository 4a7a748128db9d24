"""A trained run folder, loaded back for evaluation and inference.

    run = load_run("runs/stage1")            # config.json, feature_sets.json, adapter/, projectors.*
    run.model, run.tokenizer, run.labels, run.feature_keys, run.store_url, run.tiny

The model is rebuilt exactly as training built it (``train.model.build_model``: the same base LM,
LoRA config and projector shapes), then the run's exported adapter (PEFT format) and projectors
(safetensors, standardization statistics included) are loaded over it; a tensor that holds NaN or Inf
is refused with its name (``RunError``), so eval and infer never print a NaN probability from it.
``run.prompt_encoder(labels)`` gives the run's prompts (tokenizer, prompt style, layout) for scoring
and generation. The feature specs come from the run's own ``feature_sets.json``, so a run loads even
when its store has moved; the store is only needed to read features.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from emollama.corpora import load_corpus
from emollama.store.spec import FeatureSpec

from .checkpoint import CheckpointError, latest_checkpoint, load_adapter, load_projectors
from .config import TrainConfig, from_dict
from .data import PromptEncoder, resolve_labels
from .model import build_model, pick_device
from .tiny import TINY_WARNING, is_tiny_fixture

log = logging.getLogger(__name__)



class RunError(RuntimeError):
    """A run folder is missing a file or is inconsistent; the message says which and how to fix it."""


@dataclass
class LoadedRun:
    path: Path
    config: TrainConfig
    model: Any                        # train.model.EmoModel, in eval mode
    tokenizer: Any
    labels: list[str]                 # the label set the run was trained on (emotion task)
    feature_keys: list[str]           # store keys, in the order of config.data.features
    specs: dict[str, Any]             # key -> store.FeatureSpec (from feature_sets.json)
    device: torch.device
    step: int | None = None
    meta: dict = field(default_factory=dict)
    bindable: set = field(default_factory=set)   # keys bound to a store's set at evaluation (imported runs)

    def rebind(self, keys: dict[str, str], specs: dict[str, Any]) -> None:
        """Read the store's set ``keys[k]`` (spec ``specs[k]``) wherever the run reads ``k``."""
        self.feature_keys = [keys.get(k, k) for k in self.feature_keys]
        self.specs = {keys.get(k, k): (specs[k] if k in keys else s) for k, s in self.specs.items()}
        p = self.model.projectors
        p.specs = {n: replace(s, set_key=keys.get(s.set_key, s.set_key)) for n, s in p.specs.items()}

    def prompt_encoder(self, labels: Sequence[str] | None = None, layout: str = "trained") -> PromptEncoder:
        """The run's prompts, as training encoded them; ``labels`` (default: the run's) are the ones the
        emotion instruction names, ``layout`` the evaluation layout (trained | public-eval)."""
        d = self.config.data
        return PromptEncoder(self.tokenizer, self.model.layout, list(self.labels if labels is None else labels),
                             seed=self.config.run.seed, max_len=d.max_len, style=d.prompt, eval_layout=layout,
                             system=d.system, max_subtitle_tokens=d.max_subtitle_tokens)

    @property
    def tiny(self) -> bool:
        """True when the LM is the random tiny fixture (numbers from it mean nothing)."""
        return is_tiny_fixture(self.config.model)

    @property
    def store_url(self) -> str:
        return self.config.data.store

    @property
    def name(self) -> str:
        return self.path.name


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise RunError(f"{path} is missing: {what}. Is {path.parent} a run folder written by `emollama train`?")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise RunError(f"{path} is not valid JSON ({e})") from None


def run_labels(path: Path, cfg: TrainConfig) -> list[str]:
    """The run's label set: config data.labels, else the newest checkpoint's state, else metrics.json."""
    if cfg.data.labels:
        return list(cfg.data.labels)
    ck = latest_checkpoint(path)
    if ck is not None and (ck / "state.json").is_file():
        labels = json.loads((ck / "state.json").read_text()).get("labels")
        if labels:
            return list(labels)
    m = path / "metrics.json"
    if m.is_file():
        labels = json.loads(m.read_text()).get("labels")
        if labels:
            return list(labels)
    return resolve_labels(cfg, load_corpus(cfg.data.dataset, cfg.data.root, **cfg.data.options))


def order_keys(cfg: TrainConfig, sets: dict[str, dict]) -> list[str]:
    """The run's feature-set keys in the order of ``data.features`` (names or keys)."""
    by_name: dict[str, list[str]] = {}
    for key, info in sets.items():
        by_name.setdefault(info["name"], []).append(key)
    out = []
    for f in cfg.data.features:
        if f in sets:
            out.append(f)
        elif len(by_name.get(f, [])) == 1:
            out.append(by_name[f][0])
        else:
            raise RunError(f"feature {f!r} of the run's config matches {by_name.get(f, [])} in feature_sets.json; "
                           "the run folder is inconsistent (retrain or fix config.json)")
    return out


def read_run(path: Path) -> tuple[TrainConfig, dict[str, dict], list[str]]:
    """(config, feature_sets.json, the run's set keys in config order) of a run folder, without weights."""
    if not path.is_dir():
        raise RunError(f"run folder not found: {path} (pass --run DIR, the --out of `emollama train`)")
    raw = _read_json(path / "config.json", "the resolved training config")
    problems: list[str] = []
    if isinstance(raw.get("model"), dict):   # runs saved before ln_vision existed were trained without it
        raw["model"].setdefault("ln_vision", False)
    cfg = from_dict(raw, problems)
    if problems:
        raise RunError(f"{path / 'config.json'}: " + "; ".join(problems))
    sets = _read_json(path / "feature_sets.json", "the feature sets the run was trained on")
    return cfg, sets, order_keys(cfg, sets)


def load_run(path: str | Path, *, device: str = "auto", store: str | None = None, llm: str | None = None,
             offline: bool | None = None) -> LoadedRun:
    """Rebuild a run's model (base LM + LoRA + projectors) and tokenizer from its folder.

    ``store`` overrides the run's feature store (``config.data.store``) for reading features; ``llm`` its
    base LM (``config.model.llm``: a local folder or hub id of the same architecture); ``offline`` (not
    None) whether the LM may come from the hub (``config.model.offline``)."""
    path = Path(path)
    cfg, sets, keys = read_run(path)
    if store:
        cfg.data.store = store
    if llm:
        cfg.model.llm = llm
    if offline is not None:
        cfg.model.offline = offline
    specs = {k: FeatureSpec.from_dict(sets[k]["spec"]) for k in keys}
    for name in ("adapter/adapter_model.safetensors", "projectors.safetensors"):
        if not (path / name).is_file():
            raise RunError(f"{path / name} is missing: the run has no exported weights yet "
                           "(training writes them at its first checkpoint)")
    dev = pick_device(device if device != "auto" else cfg.run.device)
    cfg.run.device = str(dev)
    model, tokenizer = build_model(cfg, [(k, specs[k]) for k in keys], dev)
    try:
        load_adapter(model.llm, path)
        load_projectors(model.projectors, path)
    except CheckpointError as e:
        raise RunError(str(e)) from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    labels = run_labels(path, cfg)
    step = None
    m = path / "metrics.json"
    if m.is_file():
        step = json.loads(m.read_text()).get("step")
    return LoadedRun(path, cfg, model, tokenizer, labels, keys, specs, dev, step,
                     bindable={k for k in keys if sets[k].get("bind")})


def describe_run(run: LoadedRun) -> list[str]:
    """A few lines naming what was loaded (for logs and reports)."""
    lines = [f"run {run.path} (step {run.step}), profile {run.config.model.profile}"
             + (f", LM {run.config.model.llm}" if run.config.model.llm else ""),
             f"features: {', '.join(run.specs[k].name for k in run.feature_keys)}",
             f"labels: {', '.join(run.labels)}"]
    if run.tiny:
        lines.append("NOTE: " + TINY_WARNING)
    return lines
