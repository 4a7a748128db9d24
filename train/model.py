"""The model of stage two: a frozen causal LM with a LoRA adapter, and one linear projector per
feature set into the LM's hidden size.

Feature sets become projector inputs by their per-clip shape (from the store's spec):

* ``[T, D]`` fixed (``global.eva.tokens``: 1 CLS + 1024 patches): every token first goes through
  ``ln_vision`` (``model.ln_vision``, on by default as in MiniGPT-v2 / Emotion-LLaMA: a LayerNorm over
  its D values, eps 1e-5, no affine, in fp32); then token 0 (CLS) -> Linear(D, H), one token in
  ``<feature>``; the patches, in raster order, ``patch_group`` consecutive tokens concatenated
  (1024 -> 256 x 4D) -> Linear(4D, H), in ``<video>``.
* ``[D]`` (the utterance means: local, temporal, audio) -> Linear(D, H), one token in ``<feature>``.
* ``[None, D]`` variable length (``audio.hubert.frames``): averaged over time, then as ``[D]``.

The ``<feature>`` tokens follow the paper's order: local, temporal, audio, then the global CLS.
A projector is two modules: ``norm`` (standardization per dimension with train-split statistics,
after ``ln_vision``; identity unless ``data.standardize``, off for the paper's model) then ``linear``.
``projectors.safetensors`` keeps its flat names (``<name>.weight``, ``.bias``, ``.feature_mean``,
``.feature_std``): ``Projector.saved_state`` / ``load_saved`` translate.

``build_model(cfg, sets, device)`` builds it all (frozen LM + LoRA + projectors) for training, evaluation
and inference alike; ``pick_device`` / ``resolve_dtype`` / ``resolve_precision`` are the one place where
"auto" becomes a device, a weight dtype and an autocast precision. The order of the one-token views comes
from ``train.modalities``.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from emollama.store.cache import default_home

from .config import PAPER_LLM, MissingModelError, TrainConfig, TrainSetupError  # noqa: F401 (re-exported)
from .modalities import token_rank
from .pieces import Layout, Slot
from .tiny import ensure_tiny_llm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProjectorSpec:
    """One projector: which feature set it reads, how, and its Linear's shape."""

    name: str            # module name (also the prompt slot name)
    set_key: str         # the store key of the feature set
    set_name: str
    modality: str
    part: str            # "vector" (the whole row, time-averaged if variable) | "cls" | "patches"
    in_features: int
    out_features: int
    tokens: int          # prompt tokens it produces
    group: int = 1       # adjacent patch tokens concatenated (patches only)
    norm: str = "none"   # "layernorm": ln_vision on every token of the set first (cls / patches)

    def to_dict(self) -> dict:
        return asdict(self)


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


LN_VISION_EPS = 1e-5


def projector_specs(sets: Sequence[tuple[str, Any]], hidden: int, patch_group: int = 4,
                    ln_vision: bool = True) -> list[ProjectorSpec]:
    """Projectors for ``sets`` = [(store key, FeatureSpec), ...], in prompt order."""
    out: list[ProjectorSpec] = []
    norm = "layernorm" if ln_vision else "none"
    for key, spec in sets:
        shape = tuple(spec.shape)
        base = _slug(spec.name)
        if len(shape) == 1:
            out.append(ProjectorSpec(base, key, spec.name, spec.modality, "vector", shape[0], hidden, 1))
        elif len(shape) == 2 and shape[0] is None:
            out.append(ProjectorSpec(base, key, spec.name, spec.modality, "vector", shape[1], hidden, 1))
        elif len(shape) == 2:
            n_patch, dim = shape[0] - 1, shape[1]
            if n_patch < 1 or n_patch % patch_group:
                raise TrainSetupError(
                    f"feature set {spec.name}: {shape[0]} tokens = 1 CLS + {n_patch} patches, which cannot be "
                    f"grouped {patch_group} by {patch_group} (set data.patch_group to a divisor of {n_patch})")
            out.append(ProjectorSpec(base + "_patches", key, spec.name, spec.modality, "patches",
                                     dim * patch_group, hidden, n_patch // patch_group, patch_group, norm))
            out.append(ProjectorSpec(base + "_cls", key, spec.name, spec.modality, "cls", dim, hidden, 1, 1, norm))
        else:
            raise TrainSetupError(f"feature set {spec.name}: per-clip shape {shape} is not supported "
                             "(expected [D], [T, D] tokens with CLS first, or variable [None, D])")
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise TrainSetupError(f"two feature sets give the same projector name: {names}")
    return out


def layout_for(projs: Sequence[ProjectorSpec]) -> Layout:
    """Patches in <video>; one-token views in <feature>, local, temporal, audio, then CLS."""
    video = tuple(Slot(p.name, p.tokens) for p in projs if p.part == "patches")
    single = [p for p in projs if p.part != "patches"]
    single.sort(key=lambda p: (p.part == "cls", token_rank(p.modality)))
    return Layout(video=video, feature=tuple(Slot(p.name, p.tokens) for p in single))


class Standardize(nn.Module):
    """``(x - mean) / std`` per dimension: identity (0, 1) until train-split statistics are set.

    The standardization is an affine map a Linear could absorb (same model class as the paper's plain
    Linear), but it conditions the problem: stored features often carry large constant offsets and
    small per-dimension spreads (tiny HuBERT: |mean| up to 2.1, std 0.05-0.14), which a plain Linear
    learns slowly. The statistics are buffers, saved with the weights."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @torch.no_grad()
    def set(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std.clamp(min=eps))


class Projector(nn.Module):
    """``norm`` (Standardize over the ``in_features // group`` values of a token) then ``linear``
    (Linear(in_features, H)); ``group`` consecutive patch tokens are concatenated in between."""

    # the flat tensor names of projectors.safetensors (every run folder's format) -> this module's keys
    SAVED = {"weight": "linear.weight", "bias": "linear.bias", "feature_mean": "norm.mean",
             "feature_std": "norm.std"}

    def __init__(self, in_features: int, out_features: int, group: int = 1):
        super().__init__()
        self.group = group
        self.norm = Standardize(in_features // group)
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D] -> [B, 1, H]; patch tokens [B, N, D] -> [B, N / group, H]."""
        x = self.norm(x)
        if x.dim() == 2:
            return self.linear(x).unsqueeze(1)
        b, n, d = x.shape
        return self.linear(x.reshape(b, n // self.group, self.group * d))

    def saved_state(self) -> dict[str, torch.Tensor]:
        own = self.state_dict()
        return {flat: own[key] for flat, key in self.SAVED.items()}

    def load_saved(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load the flat tensors of ``saved_state``; raises ValueError naming every missing, unexpected
        or mis-shaped one."""
        own = self.state_dict()
        problems = [f"missing {k}" for k in self.SAVED if k not in tensors]
        for k, v in tensors.items():
            if k not in self.SAVED:
                problems.append(f"unexpected {k}")
            elif tuple(v.shape) != tuple(own[self.SAVED[k]].shape):
                problems.append(f"{k} has shape {list(v.shape)}, expected {list(own[self.SAVED[k]].shape)}")
        if problems:
            raise ValueError("; ".join(problems))
        self.load_state_dict({self.SAVED[k]: v for k, v in tensors.items()})


class Projectors(nn.Module):
    """One Projector per projector spec; ``slots`` turns a batch of features into slot embeddings."""

    def __init__(self, specs: Sequence[ProjectorSpec]):
        super().__init__()
        self.specs = {p.name: p for p in specs}
        self.layers = nn.ModuleDict({p.name: Projector(p.in_features, p.out_features, p.group) for p in specs})

    def set_statistics(self, name: str, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        self.layers[name].norm.set(mean, std, eps)

    def prepare(self, name: str, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The input of projector ``name`` before standardization and grouping: [B, D] or [B, N, D]
        (tokens through ``ln_vision`` first where the spec says so)."""
        p = self.specs[name]
        if isinstance(x, (list, tuple)):   # variable-length rows: time average
            x = torch.stack([r.mean(0) for r in x])
        if p.part == "vector":
            return x.mean(1) if x.dim() == 3 else x
        x = x[:, 0] if p.part == "cls" else x[:, 1:]
        if p.norm == "layernorm":   # MiniGPT-v2's ln_vision: fresh, frozen (weight 1, bias 0), in fp32
            x = nn.functional.layer_norm(x.float(), (x.shape[-1],), eps=LN_VISION_EPS).to(x.dtype)
        return x

    def project(self, name: str, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """[B, tokens, H] for projector ``name`` from the batch of its set's features."""
        return self.layers[name](self.prepare(name, x))

    def slots(self, layout: Layout, feats: Mapping[str, Any]) -> torch.Tensor:
        """[B, layout.n_tokens, H] in prompt order."""
        parts = [self.project(s.name, feats[self.specs[s.name].set_key]) for s in layout.order]
        return torch.cat(parts, dim=1)


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU (``cuda:<local rank>``) when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_precision(name: str, device: torch.device) -> str:
    """``optim.precision``: auto is fp32 on CPU, bf16 autocast on a GPU that has it, else fp16."""
    if name == "auto":
        return "fp32" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    return name


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set to 1/true/yes/on, read now: huggingface_hub's own rule, and
    the same as `extract.sources.is_offline` (train may not import extract; a test keeps the two equal)."""
    return any((os.environ.get(v) or "").strip().lower() in {"1", "true", "yes", "on"}
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# The download hint and the hub probe of `extract.sources` (DOWNLOAD_HINT, hub_reachable), which train
# may not import; tests/pipeline/test_profiles.py keeps the two equal.
DOWNLOAD_HINT = "`hf download REPO --local-dir DIR`"
PROBE_TIMEOUT_S, PROBE_TTL_S = 3.0, 60.0
_PROBES: dict[str, tuple[float, bool]] = {}


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub (HF_ENDPOINT, else huggingface.co) answers one HEAD request within `timeout`, through
    huggingface_hub's HTTP client; an answer below 500 counts. Reused for PROBE_TTL_S per endpoint."""
    url = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    hit = _PROBES.get(url)
    if hit is not None and time.monotonic() - hit[0] < PROBE_TTL_S:
        return hit[1]
    from huggingface_hub.utils import get_session   # only when the hub is probed

    try:
        ok = get_session().head(url, timeout=timeout, follow_redirects=False).status_code < 500
    except Exception as e:  # noqa: BLE001 - any failure to get an answer means: not reachable now
        log.info("the hub at %s cannot be reached (%s: %s)", url, type(e).__name__, e)
        ok = False
    _PROBES[url] = (time.monotonic(), ok)
    return ok


def load_llm(source: str, *, revision: str | None = None, offline: bool | None = None,
             dtype: torch.dtype = torch.float32):
    """(model, tokenizer) with ``from_pretrained`` from a hub id or a local folder.

    A hub id loads from local files only when offline, or when the hub does not answer one quick probe
    (``hub_reachable``): a missing model then fails at once, not after huggingface_hub's retries."""
    from transformers import AutoModelForCausalLM, AutoTokenizer   # transformers: slow to import, only when a model is loaded

    local = Path(source).expanduser()
    if offline is None:
        offline = hub_offline()
    is_dir = local.is_dir()
    unreachable = not offline and not is_dir and not hub_reachable()
    kwargs: dict[str, Any] = {"revision": revision} if revision and not is_dir else {}
    if offline or is_dir or unreachable:
        kwargs["local_files_only"] = True
    where = str(local) if is_dir else source
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        how = (f"download it with {DOWNLOAD_HINT} (REPO {source}; accept the licence on the hub first for "
               "Llama-2) on a machine with internet, copy DIR here and set it as the local folder of the LM "
               "(--llm DIR, model.llm)")
        if is_dir:
            how = "the folder must hold config.json, the weights (*.safetensors) and the tokenizer files"
        state = " (offline)" if offline else " (the hub cannot be reached)" if unreachable else ""
        raise MissingModelError(f"cannot load the language model {where!r}{state}: {e.__class__.__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}\n  {how}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return model, tokenizer


def add_lora(model, r: int, alpha: int, dropout: float, targets: Sequence[str], bias: str = "none"):
    from peft import LoraConfig, get_peft_model   # peft imports transformers: only when the adapter is added

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias, target_modules=list(targets),
                     task_type="CAUSAL_LM")
    with warnings.catch_warnings():   # peft still reads transformers' renamed `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, cfg)


def llm_source(cfg: TrainConfig) -> str:
    """The LM to load: ``model.llm``, else the profile's (tiny: the fixture, built on first use)."""
    if cfg.model.llm:
        return cfg.model.llm
    if cfg.model.profile == "tiny":
        return str(ensure_tiny_llm(Path(cfg.model.home) if cfg.model.home else default_home()))
    return PAPER_LLM


def assemble(llm, cfg: TrainConfig, sets: Sequence[tuple[str, Any]]) -> "EmoModel":
    """Freeze ``llm``, add the LoRA adapter of ``cfg``, then the projectors of ``sets`` (in this order:
    it is the order in which the fresh weights draw their random numbers)."""
    for p in llm.parameters():
        p.requires_grad_(False)
    specs = projector_specs(sets, llm.config.hidden_size, cfg.data.patch_group, cfg.model.ln_vision)
    peft_model = add_lora(llm, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.bias)
    return EmoModel(peft_model, Projectors(specs), layout_for(specs))


def build_model(cfg: TrainConfig, sets: Sequence[tuple[str, Any]], device: torch.device):
    """(EmoModel, tokenizer): the frozen LM of ``cfg`` + LoRA + projectors over ``sets`` = [(store key,
    FeatureSpec), ...], fresh weights drawn under ``run.seed``; the same for training, evaluation and
    inference (which then load a run's weights over it)."""
    torch.manual_seed(cfg.run.seed)
    llm, tokenizer = load_llm(llm_source(cfg), revision=cfg.model.revision,
                              offline=True if cfg.model.profile == "tiny" and not cfg.model.llm else cfg.model.offline,
                              dtype=resolve_dtype(cfg.model.dtype, device))
    model = assemble(llm, cfg, sets)
    if cfg.model.gradient_checkpointing:
        inner = model.llm.base_model.model
        if hasattr(inner, "activation_checkpointing_enable"):     # transformers >= 5.x
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device), tokenizer


def projector_meta(model: "EmoModel", patch_group: int) -> dict:
    """``projectors.json``: the projectors' specs, the prompt layout, the LM's hidden size."""
    return {"hidden_size": model.llm.get_input_embeddings().embedding_dim,
            "projectors": [s.to_dict() for s in model.projectors.specs.values()],
            "layout": {"video": [[s.name, s.n] for s in model.layout.video],
                       "feature": [[s.name, s.n] for s in model.layout.feature]},
            "patch_group": patch_group}


class EmoModel(nn.Module):
    """LM (+ LoRA) and projectors. ``forward(batch)`` gives (sum of answer-token losses, answer tokens)."""

    def __init__(self, llm, projectors: Projectors, layout: Layout):
        super().__init__()
        self.llm = llm
        self.projectors = projectors
        self.layout = layout

    def embed(self, batch: Mapping[str, Any]) -> torch.Tensor:
        ids = batch["input_ids"]
        emb = self.llm.get_input_embeddings()(ids)
        if self.layout.n_tokens:
            slots = self.projectors.slots(self.layout, batch["features"]).to(emb.dtype)
            mask = batch["feat_mask"]
            emb = emb.masked_scatter(mask.unsqueeze(-1), slots.reshape(-1, slots.shape[-1]))
        return emb

    def logits(self, batch: Mapping[str, Any]) -> torch.Tensor:
        out = self.llm(inputs_embeds=self.embed(batch), attention_mask=batch["attention_mask"], use_cache=False)
        return out.logits

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(batch)[:, :-1].float()
        target = batch["labels"][:, 1:]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                           ignore_index=-100, reduction="sum")
        return loss, (target != -100).sum()

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]


def count_parameters(model: EmoModel) -> dict[str, Any]:
    """Trainable parameters per part, and the percentages: LoRA as PEFT prints it (LoRA over all
    parameters of the PEFT model), and everything trainable over everything."""
    llm_total = sum(p.numel() for p in model.llm.parameters())
    lora = sum(p.numel() for p in model.llm.parameters() if p.requires_grad)
    projs = {name: sum(p.numel() for p in layer.parameters()) for name, layer in model.projectors.layers.items()}
    proj_total = sum(projs.values())
    return {
        "lora": lora,
        "llm_all": llm_total,
        "lora_percent_peft": 100.0 * lora / llm_total,
        "projectors": projs,
        "projectors_total": proj_total,
        "trainable_total": lora + proj_total,
        "all_params": llm_total + proj_total,
        "trainable_percent": 100.0 * (lora + proj_total) / (llm_total + proj_total),
    }


def format_parameters(counts: Mapping[str, Any], note: str = "") -> list[str]:
    w = max([24] + [len(n) + 10 for n in counts["projectors"]])
    lines = [f"{'LoRA (as PEFT counts it)':<{w}}{counts['lora']:>15,}  ({counts['lora_percent_peft']:.4f}% of "
             f"{counts['llm_all']:,} LM params, PEFT's percentage)"]
    for name, n in counts["projectors"].items():
        lines.append(f"{'projector ' + name:<{w}}{n:>15,}")
    lines.append(f"{'projectors total':<{w}}{counts['projectors_total']:>15,}")
    lines.append(f"{'trainable total':<{w}}{counts['trainable_total']:>15,}  "
                 f"({counts['trainable_percent']:.4f}% of {counts['all_params']:,})")
    if note:
        lines.append(note)
    return lines
