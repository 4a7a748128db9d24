"""Typed configuration of a training run: one TOML file plus overrides, every problem listed at once.

    [data]
    dataset = "merr"                      # a dataset adapter (corpora)
    root = "demo/data"
    store = "demo/store.zarr"
    features = ["global.eva.tokens", "local.vit_mae.mean", "temporal.videomae.mean", "audio.hubert.mean"]
    tasks = ["emotion", "reason"]
    [model]
    profile = "tiny"                      # tiny (random fixture) | paper (LLaMA-2-7B-chat)
    [lora]
    r = 64
    [optim]
    lr = 1e-4
    [run]
    out = "runs/stage1"
    [init]
    minigpt_v2 = "ckpt/minigptv2_checkpoint.pth"   # start as the paper did (optional)

The resolved config (every default filled in) is saved as ``config.json`` in the run folder.
"""

from __future__ import annotations

import json
import math
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from .modalities import PAPER_FEATURES
from .pieces import DEFAULT_SUBTITLE_TOKENS, TASKS
from .prompt import STYLES

PAPER_LLM = "meta-llama/Llama-2-7b-chat-hf"
SUBTITLE_SOURCES = ("dataset", "asr", "dataset-then-asr")   # data.subtitles (train.subtitles.SOURCES)


def device_problems(where: str, device: str) -> list[str]:
    if device in ("auto", "cpu") or device.startswith(("cuda", "mps")):
        return []
    return [f"{where} = {device!r}: use auto, cpu, cuda or cuda:N"]


class ConfigError(ValueError):
    """Every problem of a configuration, listed at once."""

    what = "configuration"

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"invalid {self.what}:\n" + "\n".join(f"  - {p}" for p in problems))


class TrainConfigError(ConfigError):
    """Every problem of a training configuration, listed at once."""

    what = "training configuration"


class MissingModelError(RuntimeError):
    """A language model or tokenizer could not be loaded; the message says what and how to supply it.
    (Here, not in train.model, so that a check that needs no torch can raise it.)"""


class TrainSetupError(ValueError):
    """A valid configuration that does not fit what it meets: the store's sets and shapes, the splits, a
    checkpoint. One line saying what and how to fix it; the CLI prints it with exit status 2 (other
    exceptions are bugs and keep their traceback)."""


@dataclass
class DataConfig:
    dataset: str = "merr"                       # the corpus adapter: merr | mer2023 | dfew | emer | folder (`emollama datasets`)
    root: str = ""                              # the corpus folder
    options: dict[str, Any] = field(default_factory=dict)   # adapter options (e.g. fold)
    store: str = ""                             # the feature store of stage one (a folder or an fsspec URL)
    features: list[str] = field(default_factory=lambda: list(PAPER_FEATURES))  # feature sets (keys or names) fed to the LM, one projector each
    tasks: list[str] = field(default_factory=lambda: ["emotion", "reason"])  # emotion | reason: the instruction tasks trained
    labels: list[str] = field(default_factory=list)          # empty: the corpus's labels
    train_split: str = "train"                  # the split trained on
    eval_split: str = "test"                    # the split evaluated during and after training
    prompt: str = "emollama"        # emollama (ours) | emotion-llama (the released protocol) | chat (LM's template)
    system: str = ""                # system prompt of the chat style (empty: none, or the template's default)
    standardize: bool = False       # projector inputs standardized with train-split statistics (not the paper's)
    patch_group: int = 4            # global patch tokens concatenated per LM token
    max_len: int = 1024             # tokens per training example; answers are never cut: a longer example is rejected
    max_subtitle_tokens: int = DEFAULT_SUBTITLE_TOKENS  # a longer subtitle is cut to this many tokens (training, eval, infer)
    subtitles: str = "dataset-then-asr"         # dataset | asr (the store's ASR text set, `extract --asr`) | dataset-then-asr: the dataset's, else the ASR text
    asr_set: str = ""                           # the ASR text set (name or key); empty: the store's one text set, if any
    length_grouping: bool = True                # batches of similar length (less padding); the order stays seeded
    workers: int = 0                # DataLoader worker processes

    def problems(self) -> list[str]:
        out = []
        if not self.root:
            out.append("data.root is empty: pass --data DIR (the corpus folder)")
        elif not Path(self.root).is_dir():
            out.append(f"data.root = {self.root!r} is not a folder")
        if not self.store:
            out.append("data.store is empty: pass --store PATH (the feature store of stage one)")
        if not self.features:
            out.append("data.features is empty: name at least one feature set (e.g. audio.hubert.mean)")
        if not self.tasks:
            out.append("data.tasks is empty: choose from " + ", ".join(TASKS))
        for t in self.tasks:
            if t not in TASKS:
                out.append(f"data.tasks: unknown task {t!r}; choose from {', '.join(TASKS)}")
        if self.prompt not in STYLES:
            out.append(f"data.prompt = {self.prompt!r}: choose {', '.join(STYLES)}")
        if self.system and self.prompt in STYLES and not STYLES[self.prompt].system_prompt:
            out.append(f"data.system is written only by the chat prompt style (data.prompt = {self.prompt!r}): "
                       "set data.prompt = \"chat\" or leave data.system empty")
        if self.patch_group < 1:
            out.append("data.patch_group must be at least 1")
        if self.max_len < 64:
            out.append(f"data.max_len = {self.max_len} is too short for the prompt (use 512 or more)")
        if self.max_subtitle_tokens < 1:
            out.append(f"data.max_subtitle_tokens = {self.max_subtitle_tokens}: use 1 or more (the default is "
                       f"{DEFAULT_SUBTITLE_TOKENS})")
        if self.workers < 0:
            out.append("data.workers must be 0 or more")
        if self.subtitles not in SUBTITLE_SOURCES:
            out.append(f"data.subtitles = {self.subtitles!r}: choose {', '.join(SUBTITLE_SOURCES)}")
        return out


@dataclass
class ModelConfig:
    profile: str = "tiny"            # tiny | paper
    llm: str = ""                    # hub id or local folder; empty: the profile's
    revision: str | None = None                 # a hub revision of the LM
    offline: bool | None = None      # None: HF_HUB_OFFLINE decides (tiny is always local)
    home: str = ""                   # where the tiny LM is built; empty: $EMOLLAMA_HOME or ~/.cache/emollama
    dtype: str = "auto"              # weights of the frozen LM: auto (fp32 on CPU, bf16/fp16 on GPU) | float32 | bfloat16 | float16
    gradient_checkpointing: bool = False        # trade compute for memory in the frozen LM
    ln_vision: bool = True           # per-token LayerNorm (no affine, fp32) on [T, D] token sets before their projectors

    def problems(self) -> list[str]:
        out = []
        if self.profile not in ("tiny", "paper"):
            out.append(f"model.profile = {self.profile!r}: choose tiny or paper (or set model.llm)")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            out.append(f"model.dtype = {self.dtype!r}: choose auto, float32, bfloat16 or float16")
        return out


@dataclass
class LoraConfig:
    r: int = 64                                 # LoRA rank
    alpha: int = 16                             # LoRA scale numerator (scale = alpha / r)
    dropout: float = 0.05                       # LoRA dropout
    bias: str = "none"                          # none | all | lora_only
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])  # the LM's modules that get adapters (q_proj/v_proj exist in Llama, Qwen2, Mistral)
    def problems(self) -> list[str]:
        out = []
        if self.r < 1:
            out.append("lora.r must be at least 1")
        if not 0 <= self.dropout < 1:
            out.append("lora.dropout must be within [0, 1)")
        if self.bias not in ("none", "all", "lora_only"):
            out.append("lora.bias: choose none, all or lora_only")
        if not self.target_modules:
            out.append("lora.target_modules is empty (the paper uses q_proj, v_proj)")
        return out


@dataclass
class OptimConfig:
    lr: float = 1e-5                            # peak learning rate (AdamW)
    min_lr: float = 1e-6                        # end of the cosine decay
    weight_decay: float = 0.05                  # on matrices only; biases and norms get none
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    warmup_steps: int = 1000                    # linear warmup, in optimizer steps
    steps: int = 0                   # scheduled optimizer steps; 0: epochs x steps per epoch
    epochs: int = 30                            # used when steps is 0
    batch_size: int = 4              # per process and micro-batch
    grad_accum: int = 1                         # micro-batches per optimizer step
    clip_norm: float = 1.0           # 0: no clipping
    precision: str = "auto"          # auto (bf16/fp16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16

    def problems(self) -> list[str]:
        out = []
        if self.lr <= 0:
            out.append("optim.lr must be positive")
        if self.min_lr < 0 or self.min_lr > self.lr:
            out.append("optim.min_lr must be within [0, lr]")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            out.append("optim.betas must be two numbers in [0, 1)")
        for name in ("weight_decay", "clip_norm"):
            if getattr(self, name) < 0:
                out.append(f"optim.{name} must be 0 or more")
        for name in ("batch_size", "grad_accum", "epochs"):
            if getattr(self, name) < 1:
                out.append(f"optim.{name} must be at least 1")
        if self.warmup_steps < 0 or self.steps < 0:
            out.append("optim.warmup_steps and optim.steps must be 0 or more")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            out.append(f"optim.precision = {self.precision!r}: choose auto, fp32, bf16 or fp16")
        return out


@dataclass
class RunConfig:
    out: str = ""                    # the run folder
    seed: int = 42                              # model init, batch order, dropout
    init_from: str = ""              # a previous run folder (curriculum: stage 2 starts from stage 1)
    save_every: int = 500            # steps between checkpoints (and one at the end)
    eval_every: int = 500            # steps between evaluations (and one at the end); 0: end only
    log_every: int = 10                         # steps between loss lines (and TensorBoard points)
    keep_last: int = 1               # resumable checkpoints kept
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    eval_batch_size: int = 8                    # examples per batch when evaluating
    def problems(self) -> list[str]:
        out = []
        if not self.out:
            out.append("run.out is empty: pass --out DIR (the run folder)")
        if self.init_from and not Path(self.init_from).is_dir():
            out.append(f"run.init_from = {self.init_from!r} is not a run folder")
        for name in ("save_every", "log_every", "keep_last", "eval_batch_size"):
            if getattr(self, name) < 1:
                out.append(f"run.{name} must be at least 1")
        if self.eval_every < 0:
            out.append("run.eval_every must be 0 or more")
        out += device_problems("run.device", self.device)
        return out


@dataclass
class InitConfig:
    """Where the trainable weights start (before ``run.init_from``, which overrides what it holds)."""

    minigpt_v2: str = ""             # MiniGPT-v2's checkpoint (.pth): llama_proj -> global patches, its LoRA -> adapter

    def problems(self) -> list[str]:
        if self.minigpt_v2 and not Path(self.minigpt_v2).is_file():
            return [f"init.minigpt_v2 = {self.minigpt_v2!r} is not a file (MiniGPT-v2's minigptv2_checkpoint.pth)"]
        return []


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    init: InitConfig = field(default_factory=InitConfig)

    def problems(self) -> list[str]:
        out = (self.data.problems() + self.model.problems() + self.lora.problems() + self.optim.problems()
               + self.run.problems() + self.init.problems())
        if self.init.minigpt_v2 and self.data.standardize:
            out.append("init.minigpt_v2 with data.standardize = true: MiniGPT-v2's llama_proj was trained on raw "
                       "ln_vision tokens; set data.standardize = false")
        if self.init.minigpt_v2 and not self.model.ln_vision:
            out.append("init.minigpt_v2 with model.ln_vision = false: MiniGPT-v2's llama_proj expects ln_vision "
                       "tokens; set model.ln_vision = true")
        return out

    def validate(self) -> "TrainConfig":
        if problems := self.problems():
            raise TrainConfigError(problems)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


SECTIONS = {f.name: f.type for f in fields(TrainConfig)}
_CLASSES = {"data": DataConfig, "model": ModelConfig, "lora": LoraConfig, "optim": OptimConfig, "run": RunConfig,
            "init": InitConfig}


def check_value(value: Any, hint: Any, name: str, problems: list[str]) -> tuple[bool, Any]:
    """(ok, value) for one setting against its type hint (str, int, float, bool, list[X], dict[K, V],
    X | None, Any): int becomes float, a tuple a list; a float must be finite (TOML's nan and inf are
    never a setting); each item of a list is checked with its index. A problem is added when not ok."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        kinds = [a for a in args if a is not type(None)]
        for kind in kinds:
            ok, v = check_value(value, kind, name, scratch := [])
            if ok:
                return True, v
        problems.append(scratch[0] if len(kinds) == 1 else
                        f"{name} = {value!r}: expected {' or '.join(map(_type_name, kinds))}")
        return False, value
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{name} = {value!r}: expected a list")
            return False, value
        items = []
        for i, x in enumerate(value):
            ok, x = check_value(x, args[0] if args else Any, f"{name}[{i}]", problems)
            if not ok:
                return False, value
            items.append(x)
        return True, items
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{name} = {value!r}: expected a table (dict)")
            return False, value
        return True, dict(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{name} = {value!r}: expected float")
            return False, value
        if not math.isfinite(value):
            problems.append(f"{name} = {value!r}: expected a finite number")
            return False, value
        return True, float(value)
    if isinstance(hint, type) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        problems.append(f"{name} = {value!r}: expected {hint.__name__}")
        return False, value
    return True, value


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def build_section(cls, data: Any, where: str, problems: list[str]):
    """Dataclass `cls` from a mapping; unknown keys and values of the wrong type (checked against the
    fields' type hints, `check_value`) are added to `problems` and left at their defaults."""
    if not isinstance(data, Mapping):
        problems.append(f"[{where}] = {data!r}: expected a table of settings ([{where}] with key = value lines)")
        return cls()
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            problems.append(f"{where}.{key}: unknown setting (known: {', '.join(known)})")
            continue
        ok, value = check_value(value, hints[key], f"{where}.{key}", problems)
        if ok:
            kwargs[key] = value
    return cls(**kwargs)


def from_dict(data: Mapping[str, Mapping[str, Any]], problems: list[str] | None = None) -> TrainConfig:
    problems = [] if problems is None else problems
    for section in data:
        if section not in _CLASSES:
            problems.append(f"[{section}]: unknown section (known: {', '.join(_CLASSES)})")
    parts = {name: build_section(cls, data.get(name, {}), name, problems) for name, cls in _CLASSES.items()}
    return TrainConfig(**parts)


def read_toml(path: str | Path | None, overrides: Mapping[str, Mapping[str, Any]] | None,
              error: type[ConfigError] = ConfigError, problems: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """A TOML file's sections (if a path is given) with overrides applied ({section: {key: value}};
    None values keep the file's). A section that is not a table (`data = 5`) goes into `problems` (raised
    at once when none is given) and only the overrides fill it."""
    data: dict[str, dict[str, Any]] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise error([f"config file not found: {p}"])
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise error([f"{p}: not valid TOML: {e}"]) from None
    bad = [f"{section} = {v!r}: expected a table of settings ([{section}] with key = value lines)"
           for section, v in data.items() if not isinstance(v, Mapping)]
    if bad and problems is None:
        raise error(bad)
    if bad:
        problems += bad
        data = {section: v for section, v in data.items() if isinstance(v, Mapping)}
    for section, values in (overrides or {}).items():
        for key, value in (values or {}).items():
            if value is not None:
                data.setdefault(section, {})[key] = value
    return data


DATA_FROM_RUN = ("dataset", "root", "store", "options")   # what a run continued or started from lends a new config


def data_from_run(run: str | Path) -> dict[str, Any]:
    """The data section (dataset, root, store, options) of a run folder's saved config, for a run that
    continues it (``--resume``) or starts from it (``--init-from``); {} when it has none."""
    try:
        saved = json.loads((Path(run) / "config.json").read_text()).get("data") or {}
    except (OSError, ValueError):
        return {}
    return {k: saved[k] for k in DATA_FROM_RUN if saved.get(k)}


def load_train_config(path: str | Path | None = None,
                      overrides: Mapping[str, Mapping[str, Any]] | None = None,
                      defaults: Mapping[str, Mapping[str, Any]] | None = None) -> TrainConfig:
    """Read a TOML file (if any) over ``defaults``, apply overrides ({section: {key: value}}, None = keep),
    validate."""
    problems: list[str] = []
    data = read_toml(path, overrides, TrainConfigError, problems)
    for section, values in (defaults or {}).items():
        for key, value in values.items():
            data.setdefault(section, {}).setdefault(key, value)
    cfg = from_dict(data, problems)
    problems += cfg.problems()
    if problems:
        raise TrainConfigError(problems)
    # The resolved config saved in the run folder must find the data from anywhere (eval, infer).
    cfg.data.root = str(Path(cfg.data.root).resolve())
    if "://" not in cfg.data.store:
        cfg.data.store = str(Path(cfg.data.store).resolve())
    if cfg.init.minigpt_v2:
        cfg.init.minigpt_v2 = str(Path(cfg.init.minigpt_v2).resolve())
    return cfg
