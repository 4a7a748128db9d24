"""The training loop: one readable function, ``train(cfg)``.

Per optimizer step: this rank's micro-batches of the step (``data.epoch_plan``), the answer tokens of
the whole global step counted first, each micro-batch's summed loss divided by that count (so one
process with batch 4 and two with batch 2 compute the same gradient), backward, clipping, AdamW,
the learning rate of the step (linear warmup then cosine). A non-finite loss stops the run before the
optimizer touches the weights; the last checkpoint on disk stays the last good one.

Runs under ``torchrun`` as they are: each process reads WORLD_SIZE / RANK from the environment,
joins a process group (gloo on CPU, nccl on GPU) and wraps the model in DDP; rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import (FULL_ERRNOS, CheckpointWriteError, latest_checkpoint, load_adapter, load_checkpoint,
                         load_projectors, save_checkpoint, versions, write_json)
from .config import PAPER_LLM, TrainConfig
from .data import StepLoader, TrainData, epoch_plan, fit_statistics
from .evaluate import evaluate_closed_set, format_metrics
from .model import (EmoModel, Projectors, add_lora, count_parameters, format_parameters, layout_for, load_llm,
                    projector_specs, resolve_dtype)
from .tiny import default_home, ensure_tiny_llm

log = logging.getLogger(__name__)

TINY_NOTE = "NOTE: tiny profile = a random test fixture; its numbers say nothing about emotion recognition."


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    run: Path
    step: int
    history: list[dict]
    metrics: dict
    params: dict
    evals: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    samples: int = 0


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    o = cfg.optim
    warm = min(o.warmup_steps, max(total - 1, 0))
    if warm and step < warm:
        return o.lr * (step + 1) / warm
    span = max(total - warm, 1)
    t = min(max(step - warm, 0) / span, 1.0)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * t))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def llm_source(cfg: TrainConfig) -> str:
    if cfg.model.llm:
        return cfg.model.llm
    if cfg.model.profile == "tiny":
        return str(ensure_tiny_llm(Path(cfg.model.home) if cfg.model.home else default_home()))
    return PAPER_LLM


def resolve_labels(cfg: TrainConfig, corpus) -> list[str]:
    """data.labels, else the corpus labels that occur in the training split (in the corpus's order)."""
    if cfg.data.labels:
        return list(cfg.data.labels)
    seen = {c.label for c in corpus.split(cfg.data.train_split) if c.label}
    return [l for l in corpus.labels if l in seen] or list(corpus.labels)


def build_model(cfg: TrainConfig, sets: list[tuple[str, Any]], device: torch.device):
    """(EmoModel, tokenizer, projector specs): frozen LM + LoRA + projectors, under ``run.seed``."""
    torch.manual_seed(cfg.run.seed)
    llm, tokenizer = load_llm(llm_source(cfg), revision=cfg.model.revision,
                              offline=True if cfg.model.profile == "tiny" and not cfg.model.llm else cfg.model.offline,
                              dtype=resolve_dtype(cfg.model.dtype, device))
    for p in llm.parameters():
        p.requires_grad_(False)
    hidden = llm.config.hidden_size
    specs = projector_specs(sets, hidden, cfg.data.patch_group, cfg.model.ln_vision)
    peft_model = add_lora(llm, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, cfg.lora.bias)
    if cfg.model.gradient_checkpointing:
        inner = peft_model.base_model.model
        if hasattr(inner, "activation_checkpointing_enable"):     # transformers >= 5.x
            inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = EmoModel(peft_model, Projectors(specs), layout_for(specs)).to(device)
    return model, tokenizer, specs


def projector_meta(model: EmoModel, specs, cfg: TrainConfig) -> dict:
    return {"hidden_size": model.llm.get_input_embeddings().embedding_dim,
            "projectors": [s.to_dict() for s in specs],
            "layout": {"video": [[s.name, s.n] for s in model.layout.video],
                       "feature": [[s.name, s.n] for s in model.layout.feature]},
            "patch_group": cfg.data.patch_group}


def _dist() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def _plot(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, loss = [h["step"] for h in history], [h["loss"] for h in history]
    ax.plot(steps, loss, lw=0.6, alpha=0.35, label="per step")
    w = max(1, min(50, len(loss) // 10))
    if w > 1:   # steps differ by task (length grouping): a moving average shows the trend
        avg = [sum(loss[max(0, i - w + 1):i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(loss))]
        ax.plot(steps, avg, lw=1.5, label=f"mean of {w}")
        ax.legend(fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def train(cfg: TrainConfig, *, resume: bool = False, max_steps: int | None = None, progress: bool = False,
          echo: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) one training stage as configured; returns the loss history and final metrics."""
    from emollama.store import FeatureDataset, FeatureStore
    from emollama.store.datasets import load_corpus

    cfg.validate()
    say = echo or log.info
    world, rank, local_rank = _dist()
    device = pick_device(cfg.run.device, local_rank)
    ddp = world > 1
    if ddp and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main = rank == 0
    if not main:
        say = lambda *_: None   # noqa: E731
    run = Path(cfg.run.out)
    if main:
        run.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # data: texts and labels from the adapter, features from the store
    corpus = load_corpus(cfg.data.dataset, cfg.data.root, **cfg.data.options)
    labels = resolve_labels(cfg, corpus)
    store = FeatureStore.open(cfg.data.store, create=False)
    keys = [store.resolve(f) for f in cfg.data.features]
    specs_by_key = store.sets()
    sets = [(k, specs_by_key[k]) for k in keys]
    model, tokenizer, pspecs = build_model(cfg, sets, device)
    features = FeatureDataset(store, keys)
    train_data = TrainData(corpus, features, cfg.data.train_split, cfg.data.tasks, labels, tokenizer, model.layout,
                           seed=cfg.run.seed, max_len=cfg.data.max_len, style=cfg.data.prompt)
    eval_data = TrainData(corpus, features, cfg.data.eval_split, cfg.data.tasks, labels, tokenizer, model.layout,
                          seed=cfg.run.seed, max_len=cfg.data.max_len, style=cfg.data.prompt)
    per_step = cfg.optim.batch_size * world * cfg.optim.grad_accum
    if len(train_data) < per_step:
        raise ValueError(f"the {cfg.data.train_split!r} split has {len(train_data)} examples, fewer than one "
                         f"step's global batch ({per_step}); lower optim.batch_size or grad_accum")
    steps_per_epoch = len(train_data) // per_step
    total = cfg.optim.steps or cfg.optim.epochs * steps_per_epoch
    stop = min(total, max_steps) if max_steps is not None else total

    if cfg.data.standardize:
        fit_statistics(train_data, model.projectors)
    if cfg.init.minigpt_v2:
        from .released import init_from_minigpt_v2

        mapped = init_from_minigpt_v2(model, cfg.init.minigpt_v2)
        say(f"started from MiniGPT-v2 ({cfg.init.minigpt_v2}): llama_proj -> {', '.join(mapped.projectors)}, "
            f"{len(mapped.lora)} LoRA tensors; fresh: {', '.join(mapped.fresh) or 'none'}; ignored: "
            f"{len(mapped.ignored)} key(s) ({'; '.join(sorted(set(mapped.ignored.values()))) or '-'})")
    if cfg.run.init_from:
        src = Path(cfg.run.init_from)
        load_adapter(model.llm, src)
        load_projectors(model.projectors, src, by_role=True)
        say(f"initialised adapter and projectors from {src}")

    params = count_parameters(model)
    note = TINY_NOTE if cfg.model.profile == "tiny" and not cfg.model.llm else ""
    for line in format_parameters(params, note):
        say(line)

    decay = [p for n, p in model.trainable() if p.ndim >= 2]
    no_decay = [p for n, p in model.trainable() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    step, history, evals = 0, [], []
    if resume:
        ck = latest_checkpoint(run)
        if ck is None:
            say(f"no checkpoint in {run}/checkpoints: starting from scratch")
        else:
            state = load_checkpoint(ck, model, optimizer)
            if state.get("feature_keys") != keys:
                raise ValueError(f"{ck} was trained on feature sets {state.get('feature_keys')}, "
                                 f"this config reads {keys}: resume with the same features")
            step, history, evals = state["step"], state["history"], state.get("evals", [])
            say(f"resumed from {ck} at step {step}")
    if not resume or step == 0:
        torch.manual_seed(cfg.run.seed + 1000 * rank)   # dropout stream of this rank

    if main:
        write_json(run / "config.json", cfg.to_dict())
        write_json(run / "feature_sets.json", {k: {"name": s.name, "spec": s.to_dict()} for k, s in sets})
        write_json(run / "versions.json", versions())
    pmeta = projector_meta(model, pspecs, cfg)
    net: torch.nn.Module = model
    if ddp:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    precision = cfg.optim.precision
    if precision == "auto":
        precision = "fp32" if device.type != "cuda" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else None
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    writer = None
    tb_before: set[str] = set()
    ck_before = latest_checkpoint(run)
    if main:
        from torch.utils.tensorboard import SummaryWriter
        tb_before = set(os.listdir(run / "tb")) if (run / "tb").is_dir() else set()
        writer = SummaryWriter(str(run / "tb"), purge_step=step + 1 if step else None)
    bar = None
    if progress and main:
        from tqdm.auto import tqdm
        bar = tqdm(total=stop, initial=step, desc=f"train {run.name}", unit="step")

    def do_eval(at: int) -> dict:
        m = evaluate_closed_set(model, eval_data, labels, batch_size=cfg.run.eval_batch_size, device=device,
                                autocast=autocast)
        m["step"] = at
        if writer and m.get("n"):
            writer.add_scalar("eval/accuracy", m["accuracy"], at)
            writer.add_scalar("eval/weighted_f1", m["weighted_f1"], at)
        return m

    def checkpoint(at: int) -> Path:
        st = {"step": at, "epoch": at // steps_per_epoch, "position": at % steps_per_epoch,
              "steps_per_epoch": steps_per_epoch, "total_steps": total, "lr": lr_at(max(at - 1, 0), cfg, total),
              "history": history, "evals": evals, "feature_keys": keys, "labels": labels,
              "world_size": world, "global_batch": per_step}
        return save_checkpoint(run, at, model, optimizer, st, pmeta, cfg.run.keep_last)

    model.train()
    samples = 0
    plan_cache: dict[int, list] = {}
    t_loop = time.perf_counter()
    disk_failed = False
    try:
        while step < stop:
            epoch, pos = divmod(step, steps_per_epoch)
            if epoch not in plan_cache:
                plan_cache = {epoch: epoch_plan(train_data.lengths, per_step, cfg.run.seed, epoch,
                                                group=cfg.data.length_grouping)}
            plan = plan_cache[epoch]
            loader = torch.utils.data.DataLoader(
                StepLoader(train_data, plan[pos:], epoch, world, rank, cfg.optim.grad_accum),
                batch_size=None, shuffle=False, num_workers=cfg.data.workers, collate_fn=_identity,
                # its own generator: a DataLoader draws a seed when iterated, which must not move
                # the global RNG (dropout) differently in a resumed run
                generator=torch.Generator().manual_seed(cfg.run.seed + epoch))
            it = iter(loader)
            for _ in range(len(plan) - pos):
                if step >= stop:
                    break
                micro = [next(it) for _ in range(cfg.optim.grad_accum)]
                lr = lr_at(step, cfg, total)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                # on the device: nccl reduces only CUDA tensors
                count = torch.tensor(float(sum(int((b.labels[:, 1:] != -100).sum()) for b in micro)), device=device)
                if ddp:
                    torch.distributed.all_reduce(count)
                loss_sum = torch.zeros((), device=device)
                for i, b in enumerate(micro):
                    b = b.to(device)
                    sync = contextlib.nullcontext() if (not ddp or i == len(micro) - 1) else net.no_sync()
                    with sync:
                        with (autocast() if autocast else contextlib.nullcontext()):
                            s, _ = net(b)
                        loss = s * world / count
                        if scaler is not None:
                            scaler.scale(loss).backward()
                        else:
                            loss.backward()
                    loss_sum += s.detach().float()
                if ddp:
                    torch.distributed.all_reduce(loss_sum)
                value = float(loss_sum / count)
                if not math.isfinite(value):
                    last = latest_checkpoint(run)
                    raise TrainingDiverged(
                        f"loss is {value} at step {step + 1} (epoch {epoch}, lr {lr:.3g}); stopped before updating "
                        f"the weights. The last good checkpoint is {last if last else '(none yet)'}: lower optim.lr, "
                        f"check the features for NaN/inf (emollama store verify), or use fp32/bf16 instead of fp16.")
                if scaler is not None:
                    scaler.unscale_(optimizer)
                gnorm = (torch.nn.utils.clip_grad_norm_([p for _, p in model.trainable()], cfg.optim.clip_norm)
                         if cfg.optim.clip_norm > 0 else torch.tensor(0.0))
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                samples += per_step
                history.append({"step": step, "loss": value, "lr": lr, "tokens": int(count)})
                if writer:
                    writer.add_scalar("train/loss", value, step)
                    writer.add_scalar("train/lr", lr, step)
                    writer.add_scalar("train/grad_norm", float(gnorm), step)
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                elif main and step % cfg.run.log_every == 0:
                    log.info("step %d/%d loss %.4f lr %.3g", step, stop, value, lr)
                if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < stop:
                    if main:
                        evals.append(do_eval(step))
                        say(f"step {step}: held-out accuracy {evals[-1].get('accuracy')}")
                    if ddp:
                        torch.distributed.barrier()
                if step % cfg.run.save_every == 0 and step < stop:
                    if main:
                        checkpoint(step)
                    if ddp:
                        torch.distributed.barrier()
        train_seconds = time.perf_counter() - t_loop
        metrics: dict = {}
        if main:
            metrics = do_eval(step)
            evals.append(metrics)
            checkpoint(step)
            metrics = {**metrics, "split": cfg.data.eval_split, "step": step, "run": str(run),
                       "profile": cfg.model.profile, "features": cfg.data.features, "tasks": cfg.data.tasks,
                       "note": note or None, "train_seconds": round(train_seconds, 2),
                       "final_loss": history[-1]["loss"] if history else None}
            write_json(run / "metrics.json", metrics)
            if history:
                _plot(history, run / "loss.png", f"{run.name}: {cfg.model.profile} profile"
                      + (" (random test fixture)" if note else ""))
            for line in format_metrics(metrics, f"held-out ({cfg.data.eval_split})"):
                say(line)
            if note:
                say(note)
        if ddp:
            torch.distributed.barrier()
    except (CheckpointWriteError, OSError) as e:
        disk_failed = isinstance(e, CheckpointWriteError) or e.errno in FULL_ERRNOS
        raise
    finally:
        if bar:
            bar.close()
        if writer:
            try:
                writer.close()
            except Exception as e:   # noqa: BLE001 - a full disk must not hide the error that stopped training
                log.warning("TensorBoard log of %s not flushed: %s", run, e)
            if disk_failed and latest_checkpoint(run) == ck_before:
                # no checkpoint was written in this attempt: --resume redoes all of its steps (and would purge
                # their TensorBoard events), so its event file goes and retries on a full disk leave nothing
                with contextlib.suppress(OSError):
                    for name in set(os.listdir(run / "tb")) - tb_before:
                        os.remove(run / "tb" / name)
    return TrainResult(run, step, history, metrics, params, evals, time.perf_counter() - start, samples)


def _identity(x):
    return x
