"""The training recipe: ``train(cfg)`` = setup steps, then a short loop.

    Recipe(cfg)              the config checked, this process in its group (DDP), the run folder
      .setup_data()          the corpus and its labels, the store's feature sets
      .setup_model()         frozen LM + LoRA + projectors (``train.model.build_model``)
      .setup_batches()       prompt encoder + feature batcher, the train / eval splits, the schedule
      .setup_weights()       standardization statistics, MiniGPT-v2's start, ``run.init_from``
      .setup_optimizer()     AdamW (no decay on vectors), precision (autocast, fp16 scaler)
      .setup_state()         resume from the newest checkpoint or start fresh; the run's config files
      .setup_parallel()      DDP when there are several processes
      .setup_logging()       TensorBoard, progress bar
      .fit()                 the loop, then the final evaluation, checkpoint and metrics

Per optimizer step: this rank's micro-batches of the step (``data.epoch_plan``), the answer tokens of
the whole global step counted first, each micro-batch's summed loss divided by that count (so one
process with batch 4 and two with batch 2 compute the same gradient), backward, clipping, AdamW,
the learning rate of the step (linear warmup then cosine). A non-finite loss stops the run before the
optimizer touches the weights; the last checkpoint on disk stays the last good one. Every checkpoint
is saved beside the run's resolved ``config.json``.

The run folder is claimed first (``Recipe.claim``, ``train.runfolder``): a new or empty folder, or a run
that ``resume`` continues (with the same settings) or ``overwrite`` replaces; rank 0 holds its lock
for the whole stage. Ctrl-C stops at the end of the current step with a checkpoint of it, so that
``--resume`` continues exactly (``TrainingInterrupted``, exit status 130); a second Ctrl-C stops at
once and the last complete checkpoint is the one to resume.

Runs under ``torchrun`` as they are: each process reads WORLD_SIZE / RANK from the environment,
joins a process group (gloo on CPU, nccl on GPU) and wraps the model in DDP; rank 0 writes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm

from emollama.corpora import load_corpus
from emollama.store import FeatureStore, profile_summary
from emollama.store.text import is_text

from .checkpoint import (FULL_ERRNOS, CheckpointWriteError, latest_checkpoint, load_adapter, load_checkpoint,
                         load_projectors, read_state, resume_point, save_checkpoint, saved_step, versions, write_json)
from .config import TrainConfig, TrainSetupError
from .runfolder import check_out, clear_run, lock, resume_differences
from .data import (Batch, FeatureBatcher, PromptEncoder, StepLoader, TrainData, epoch_plan, fit_statistics,
                   resolve_labels, text_report, text_summary)
from .evaluate import evaluate_closed_set, format_metrics
from .report import loss_plot
from .released import init_from_minigpt_v2
from .subtitles import REPORT_FILE as SUBTITLES_FILE
from .subtitles import subtitled_corpus
from .tiny import TINY_WARNING, is_tiny_fixture
from .model import (EmoModel, build_model, count_parameters, format_parameters, pick_device, projector_meta,
                    resolve_precision)

log = logging.getLogger(__name__)



class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (SIGINT) stopped training. ``step``: where ``--resume`` continues, ``checkpoint``: its folder
    (None: nothing saved yet). The message is one line ("interrupted at step N: rerun with --resume ...")."""

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.checkpoint = step, checkpoint


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


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, max_steps: int | None = None,
          progress: bool = False, echo: Callable[[str], None] | None = None,
          losses: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) one training stage as configured; returns the loss history and final metrics.

    ``run.out`` must be new or empty, or hold a run that ``resume`` continues or ``overwrite`` replaces
    (``train.runfolder``). ``echo`` gets the summary lines, ``losses`` a loss line every ``run.log_every``
    steps when there is no progress bar (default: both to the log at INFO)."""
    recipe = Recipe(cfg, echo=echo, losses=losses)
    with recipe.claim(resume=resume, overwrite=overwrite):
        return recipe.setup(resume=resume, max_steps=max_steps, progress=progress).fit()


def _dist() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


class Recipe:
    """One training stage: the ``setup_*`` steps (``setup`` runs them in order), then ``fit``."""

    # setup_data
    corpus: Any                       # its clips' subtitles chosen (data.subtitles: train.subtitles)
    subtitles: Any                    # train.subtitles.SubtitleReport
    labels: list[str]
    store: Any
    keys: list[str]                   # the store's set keys, in the order of data.features
    sets: list[tuple[str, Any]]       # (key, FeatureSpec)
    # setup_model
    model: EmoModel
    tokenizer: Any
    # setup_batches
    train_data: TrainData
    eval_data: TrainData
    per_step: int                     # examples per optimizer step, all processes together
    steps_per_epoch: int
    total: int                        # scheduled steps
    stop: int                         # the step this call stops at (max_steps)
    # setup_weights
    params: dict
    note: str
    # setup_optimizer
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], Any] | None
    scaler: Any
    # setup_state
    pmeta: dict
    # setup_parallel
    net: torch.nn.Module
    # setup_logging
    writer: Any
    bar: Any
    tb_before: set[str]
    ck_before: Path | None

    def __init__(self, cfg: TrainConfig, *, echo: Callable[[str], None] | None = None,
                 losses: Callable[[str], None] | None = None):
        cfg.validate()
        self.cfg = cfg
        self.world, self.rank, local_rank = _dist()
        self.device = pick_device(cfg.run.device, local_rank)
        self.ddp = self.world > 1
        if self.ddp and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0
        quiet = lambda *_: None  # noqa: E731
        self.say: Callable[[str], None] = (echo or log.info) if self.main else quiet
        self.tell: Callable[[str], None] = (losses or log.info) if self.main else quiet
        self.run = Path(cfg.run.out)
        self.started = time.perf_counter()
        self.step, self.samples = 0, 0
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.sigint = 0          # Ctrl-C presses seen by the handler fit installs
        self.saving = False      # a checkpoint is being written: a second Ctrl-C waits for it

    @contextlib.contextmanager
    def claim(self, *, resume: bool = False, overwrite: bool = False) -> Iterator[None]:
        """The run folder for this stage (``train.runfolder``): rank 0 locks it for the whole stage (a
        second writer is told so at once), every rank checks it (all decide alike, before anyone
        writes), then rank 0 removes the old run with ``overwrite``. A resumed run must keep the saved
        config's settings."""
        def check() -> str:
            mode = check_out(self.run, resume=resume, overwrite=overwrite)
            if mode == "resume" and (diff := resume_differences(self.run, self.cfg)):
                raise TrainSetupError(f"--resume with settings that differ from the run's config.json: "
                                      f"{'; '.join(diff)}. Resume with the run's settings, or start a new run "
                                      "(another --out, or --overwrite)")
            return mode

        if not self.main:
            check()
            self.barrier()
            yield
            return
        if self.run.exists() and not self.run.is_dir():
            check()   # the one-line refusal, before the lock would try to make the folder
        with lock(self.run, "emollama train"):
            mode = check()
            self.barrier()
            if mode == "overwrite":
                self.say(f"--overwrite: removed the earlier run in {self.run} ({', '.join(clear_run(self.run))})")
            yield

    def setup(self, *, resume: bool = False, max_steps: int | None = None, progress: bool = False) -> "Recipe":
        self.setup_data()
        self.setup_model()
        self.setup_batches(max_steps)
        self.setup_weights()
        self.setup_optimizer()
        self.setup_state(resume)
        self.setup_parallel()
        self.setup_logging(progress)
        return self

    # -- setup steps ---------------------------------------------------------------------------

    def setup_data(self) -> None:
        """Texts and labels from the dataset adapter; the feature sets from the store."""
        cfg = self.cfg
        self.corpus = load_corpus(cfg.data.dataset, cfg.data.root, **cfg.data.options)
        self.labels = resolve_labels(cfg, self.corpus)
        self.store = FeatureStore.open(cfg.data.store, create=False)
        self.keys = [self.store.resolve(f) for f in cfg.data.features]
        specs = self.store.sets()
        self.sets = [(k, specs[k]) for k in self.keys]
        texts = [specs[k].name for k in self.keys if is_text(specs[k])]
        if texts:
            raise TrainSetupError(f"data.features names the text set(s) {texts} (speech transcripts): they are read "
                                  "as subtitles (data.subtitles, data.asr_set), not fed to a projector; remove them")
        # each clip's subtitle: the dataset's, the store's ASR text, or the first of them (train.subtitles)
        self.corpus, self.subtitles = subtitled_corpus(self.corpus, self.store, cfg.data.subtitles, cfg.data.asr_set)
        self.say(self.subtitles.line())

    def setup_model(self) -> None:
        self.model, self.tokenizer = build_model(self.cfg, self.sets, self.device)

    def setup_batches(self, max_steps: int | None = None) -> None:
        """The train and eval splits through one prompt encoder and one feature batcher; the schedule."""
        cfg = self.cfg
        prompts = PromptEncoder(self.tokenizer, self.model.layout, self.labels, seed=cfg.run.seed,
                                max_len=cfg.data.max_len, style=cfg.data.prompt, system=cfg.data.system,
                                max_subtitle_tokens=cfg.data.max_subtitle_tokens)
        features = FeatureBatcher.from_store(self.store, self.keys)
        self.train_data = TrainData(self.corpus, cfg.data.train_split, cfg.data.tasks, prompts, features)
        self.eval_data = TrainData(self.corpus, cfg.data.eval_split, cfg.data.tasks, prompts, features)
        self.per_step = cfg.optim.batch_size * self.world * cfg.optim.grad_accum
        if len(self.train_data) < self.per_step:
            raise TrainSetupError(f"the {cfg.data.train_split!r} split has {len(self.train_data)} examples, fewer than "
                             f"one step's global batch ({self.per_step}); lower optim.batch_size or grad_accum")
        self.steps_per_epoch = len(self.train_data) // self.per_step
        self.total = cfg.optim.steps or cfg.optim.epochs * self.steps_per_epoch
        self.stop = min(self.total, max_steps) if max_steps is not None else self.total

    def setup_weights(self) -> None:
        """Where the trainable weights start: fresh (drawn in ``build_model``), then the standardization
        statistics, MiniGPT-v2's projector and LoRA, a previous run's weights; the counts are logged."""
        cfg, model = self.cfg, self.model
        if cfg.data.standardize:
            fit_statistics(self.train_data.features, [c.id for c in self.train_data.clips], model.projectors)
        if cfg.init.minigpt_v2:
            mapped = init_from_minigpt_v2(model, cfg.init.minigpt_v2)
            self.say(f"started from MiniGPT-v2 ({cfg.init.minigpt_v2}): llama_proj -> {', '.join(mapped.projectors)}, "
                     f"{len(mapped.lora)} LoRA tensors; fresh: {', '.join(mapped.fresh) or 'none'}; ignored: "
                     f"{len(mapped.ignored)} key(s) ({'; '.join(sorted(set(mapped.ignored.values()))) or '-'})")
        if cfg.run.init_from:
            src = Path(cfg.run.init_from)
            load_adapter(model.llm, src)
            load_projectors(model.projectors, src, by_role=True)
            self.say(f"initialised adapter and projectors from {src}")
        self.params = count_parameters(model)
        self.note = "NOTE: " + TINY_WARNING if is_tiny_fixture(cfg.model) else ""
        for line in format_parameters(self.params, self.note):
            self.say(line)

    def setup_optimizer(self) -> None:
        cfg = self.cfg
        decay = [p for n, p in self.model.trainable() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.trainable() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
        precision = resolve_precision(cfg.optim.precision, self.device)
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp_dtype)) if amp_dtype else None
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    def setup_state(self, resume: bool) -> None:
        """Resume from the newest checkpoint (weights, optimizer, RNG, position, history), or start fresh
        (the dropout stream of this rank seeded); rank 0 writes the resolved config and the feature sets."""
        cfg = self.cfg
        if resume:
            ck = latest_checkpoint(self.run)
            if ck is None:
                self.say(f"no checkpoint in {self.run}/checkpoints: starting from scratch")
            else:
                state = self.resumable(ck, read_state(ck))
                load_checkpoint(ck, self.model, self.optimizer)
                self.step, self.history, self.evals = state["step"], state["history"], state.get("evals", [])
                self.say(f"resumed from {ck} at step {self.step}")
        if not resume or self.step == 0:
            torch.manual_seed(cfg.run.seed + 1000 * self.rank)   # dropout stream of this rank
        if self.main:
            write_json(self.run / "config.json", cfg.to_dict())
            write_json(self.run / "feature_sets.json", {k: {"name": s.name, "spec": s.to_dict()} for k, s in self.sets})
            write_json(self.run / "versions.json", versions())
            write_json(self.run / SUBTITLES_FILE, self.subtitles.to_dict())   # the text set eval and infer read
        self.pmeta = projector_meta(self.model, cfg.data.patch_group)

    def resumable(self, ck: Path, state: dict) -> dict:
        """``state`` (checkpoint ``ck``'s state.json) when it fits this run: the same feature sets, labels
        and global batch, a step within the schedule; else TrainSetupError saying what differs."""
        step = state.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0 or not isinstance(state.get("history"), list):
            raise TrainSetupError(f"{ck / 'state.json'} is damaged (step {step!r}): remove {ck} to resume from an "
                                  "earlier checkpoint, or start a new run (--overwrite)")
        if step > self.total:
            raise TrainSetupError(f"{ck / 'state.json'} is at step {step}, beyond this run's schedule of {self.total} "
                                  "steps: the checkpoint does not belong to this config (or is damaged); resume with "
                                  "the run's own config, or start a new run (--overwrite)")
        batch, spe = "global batch (batch_size x processes x grad_accum)", "steps per epoch"
        have = {"feature sets": state.get("feature_keys"), "labels": state.get("labels"),
                batch: state.get("global_batch", self.per_step), spe: state.get("steps_per_epoch", self.steps_per_epoch)}
        want = {"feature sets": self.keys, "labels": self.labels, batch: self.per_step, spe: self.steps_per_epoch}
        for what, theirs in have.items():
            if theirs != want[what]:
                raise TrainSetupError(f"{ck} was trained with {what} {theirs}, this run has {want[what]}: resume "
                                      "with the run's own settings, or start a new run (another --out, or --overwrite)")
        return state

    def setup_parallel(self) -> None:
        self.net = self.model
        if self.ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def setup_logging(self, progress: bool = False) -> None:
        self.writer, self.bar, self.tb_before = None, None, set()
        self.ck_before = latest_checkpoint(self.run)
        if self.main:
            from torch.utils.tensorboard import SummaryWriter   # tensorboard: slow to import, rank 0 only

            tb = self.run / "tb"
            self.tb_before = set(os.listdir(tb)) if tb.is_dir() else set()
            self.writer = SummaryWriter(str(tb), purge_step=self.step + 1 if self.step else None)
        if progress and self.main:
            self.bar = tqdm(total=self.stop, initial=self.step, desc=f"train {self.run.name}", unit="step")

    # -- the loop ------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.model.train()
        t_loop = time.perf_counter()
        metrics: dict = {}
        disk_failed = False
        try:
            with self.interrupts():
                for epoch, micro in self.batches():
                    lr = lr_at(self.step, cfg, self.total)
                    value, tokens, gnorm = self.train_step(micro, lr, epoch)
                    self.step += 1
                    self.samples += self.per_step
                    self.history.append({"step": self.step, "loss": value, "lr": lr, "tokens": tokens})
                    self.log_step(value, lr, gnorm)
                    if cfg.run.eval_every and self.step % cfg.run.eval_every == 0 and self.step < self.stop:
                        if self.main:
                            self.evals.append(self.evaluate())
                            self.say(f"step {self.step}: held-out accuracy {self.evals[-1].get('accuracy')}")
                        self.barrier()
                    if self.step % cfg.run.save_every == 0 and self.step < self.stop:
                        if self.main:
                            self.checkpoint()
                        self.barrier()
                    if self.stop_requested():
                        if self.main and saved_step(self.run) != self.step:
                            self.checkpoint()
                        raise self.interrupted()
                metrics = self.finish(time.perf_counter() - t_loop)
                self.barrier()
        except KeyboardInterrupt:   # a second Ctrl-C, mid-step: the last complete checkpoint stays the one to resume
            raise self.interrupted() from None
        except (CheckpointWriteError, OSError) as e:
            disk_failed = isinstance(e, CheckpointWriteError) or e.errno in FULL_ERRNOS
            raise
        finally:
            self.close(disk_failed)
        return TrainResult(self.run, self.step, self.history, metrics, self.params, self.evals,
                           time.perf_counter() - self.started, self.samples)

    @contextlib.contextmanager
    def interrupts(self) -> Iterator[None]:
        """Ctrl-C (SIGINT) during the loop asks it to stop after the current step (``stop_requested``),
        where a checkpoint of that step makes ``--resume`` exact; a second one stops at once (between
        checkpoints: the last complete one stays the place to resume), except while a checkpoint is
        being written. Only where signals can be handled (the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(signum, frame):
            self.sigint += 1
            if self.sigint == 1:
                self.tell(f"Ctrl-C: stopping after step {self.step + 1} with a checkpoint (Ctrl-C again to stop at once)")
            elif not self.saving:
                raise KeyboardInterrupt

        before = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, before)

    def stop_requested(self) -> bool:
        """Whether Ctrl-C was pressed on any process (all stop at the same step)."""
        if not self.ddp:
            return self.sigint > 0
        flag = torch.tensor(float(self.sigint > 0), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def interrupted(self) -> TrainingInterrupted:
        """The one-line TrainingInterrupted: the step ``--resume`` continues from, and its checkpoint."""
        return TrainingInterrupted(*resume_point(self.run, self.step))

    def batches(self) -> Iterator[tuple[int, list[Batch]]]:
        """(epoch, this rank's micro-batches) of every step from the current one up to ``stop``."""
        cfg = self.cfg
        while self.step < self.stop:
            epoch, pos = divmod(self.step, self.steps_per_epoch)
            plan = epoch_plan(self.train_data.lengths, self.per_step, cfg.run.seed, epoch,
                              group=cfg.data.length_grouping)
            loader = torch.utils.data.DataLoader(
                StepLoader(self.train_data, plan[pos:], epoch, self.world, self.rank, cfg.optim.grad_accum),
                batch_size=None, shuffle=False, num_workers=cfg.data.workers, collate_fn=_identity,
                # its own generator: a DataLoader draws a seed when iterated, which must not move
                # the global RNG (dropout) differently in a resumed run
                generator=torch.Generator().manual_seed(cfg.run.seed + epoch),
                worker_init_fn=_ignore_sigint)   # Ctrl-C reaches the workers too: only this process stops
            it = iter(loader)
            for _ in range(len(plan) - pos):
                if self.step >= self.stop:
                    return
                yield epoch, [next(it) for _ in range(cfg.optim.grad_accum)]

    def train_step(self, micro: list[Batch], lr: float, epoch: int) -> tuple[float, int, torch.Tensor]:
        """One optimizer step over this rank's micro-batches: (loss per answer token of the global step,
        its answer tokens, the gradient norm before clipping)."""
        cfg, device, optimizer = self.cfg, self.device, self.optimizer
        for g in optimizer.param_groups:
            g["lr"] = lr
        # on the device: nccl reduces only CUDA tensors
        count = torch.tensor(float(sum(int((b.labels[:, 1:] != -100).sum()) for b in micro)), device=device)
        if self.ddp:
            torch.distributed.all_reduce(count)
        loss_sum = torch.zeros((), device=device)
        for i, b in enumerate(micro):
            b = b.to(device)
            sync = contextlib.nullcontext() if (not self.ddp or i == len(micro) - 1) else self.net.no_sync()
            with sync:
                with (self.autocast() if self.autocast else contextlib.nullcontext()):
                    s, _ = self.net(b)
                loss = s * self.world / count
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            loss_sum += s.detach().float()
        if self.ddp:
            torch.distributed.all_reduce(loss_sum)
        value = float(loss_sum / count)
        if not math.isfinite(value):
            last = latest_checkpoint(self.run)
            raise TrainingDiverged(
                f"loss is {value} at step {self.step + 1} (epoch {epoch}, lr {lr:.3g}); stopped before updating "
                f"the weights. The last good checkpoint is {last if last else '(none yet)'}: lower optim.lr, "
                f"check the features for NaN/inf (emollama store verify), or use fp32/bf16 instead of fp16.")
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        gnorm = (torch.nn.utils.clip_grad_norm_([p for _, p in self.model.trainable()], cfg.optim.clip_norm)
                 if cfg.optim.clip_norm > 0 else torch.tensor(0.0))
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value, int(count), gnorm

    def log_step(self, value: float, lr: float, gnorm: torch.Tensor) -> None:
        if self.writer:
            self.writer.add_scalar("train/loss", value, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
            self.writer.add_scalar("train/grad_norm", float(gnorm), self.step)
        if self.bar:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        elif self.main and self.step % self.cfg.run.log_every == 0:
            self.tell(f"step {self.step}/{self.stop} loss {value:.4f} lr {lr:.3g}")

    def evaluate(self) -> dict:
        """Closed-set metrics on the eval split at the current step."""
        m = evaluate_closed_set(self.model, self.eval_data, self.labels, batch_size=self.cfg.run.eval_batch_size,
                                device=self.device, autocast=self.autocast)
        m["step"] = self.step
        if self.writer and m.get("n"):
            self.writer.add_scalar("eval/accuracy", m["accuracy"], self.step)
            self.writer.add_scalar("eval/weighted_f1", m["weighted_f1"], self.step)
        return m

    def checkpoint(self) -> Path:
        """A resumable checkpoint of the current step (and the exported weights beside config.json)."""
        self.saving = True
        try:
            saved = self._save()
        finally:
            self.saving = False
        if self.sigint > 1:   # a second Ctrl-C came while writing: stop now that the checkpoint is whole
            raise KeyboardInterrupt
        return saved

    def _save(self) -> Path:
        at, spe = self.step, self.steps_per_epoch
        state = {"step": at, "epoch": at // spe, "position": at % spe, "steps_per_epoch": spe,
                 "total_steps": self.total, "lr": lr_at(max(at - 1, 0), self.cfg, self.total),
                 "history": self.history, "evals": self.evals, "feature_keys": self.keys, "labels": self.labels,
                 "world_size": self.world, "global_batch": self.per_step}
        return save_checkpoint(self.run, at, self.model, self.optimizer, state, self.pmeta, self.cfg.run.keep_last)

    def finish(self, train_seconds: float) -> dict:
        """Rank 0: the final evaluation and checkpoint, metrics.json, the loss plot; the metrics."""
        if not self.main:
            return {}
        cfg = self.cfg
        metrics = self.evaluate()
        self.evals.append(metrics)
        self.checkpoint()
        made = self.store.profiles(self.keys)   # the profile that made each feature set (store.profiles)
        metrics = {**metrics, "split": cfg.data.eval_split, "step": self.step, "run": str(self.run),
                   "profile": cfg.model.profile, "feature_profile": profile_summary(made),
                   "feature_profiles": {f: made[k] for f, k in zip(cfg.data.features, self.keys)},
                   "features": cfg.data.features, "tasks": cfg.data.tasks,
                   "note": self.note or None, "train_seconds": round(train_seconds, 2),
                   "final_loss": self.history[-1]["loss"] if self.history else None,
                   "text": text_report(self.train_data, self.eval_data)}
        write_json(self.run / "metrics.json", metrics)
        if self.history:
            loss_plot(self.history, self.run / "loss.png", f"{self.run.name}: {cfg.model.profile} profile"
                  + (" (random test fixture)" if self.note else ""))
        for line in format_metrics(metrics, f"held-out ({cfg.data.eval_split})"):
            self.say(line)
        self.say(text_summary(metrics["text"]))
        self.say(f"feature profile: {profile_summary(made, note=True)}")
        if self.note:
            self.say(self.note)
        return metrics

    def barrier(self) -> None:
        if self.ddp:
            torch.distributed.barrier()

    def close(self, disk_failed: bool = False) -> None:
        """Close the progress bar and the TensorBoard log. After a failed write with no new checkpoint,
        ``--resume`` redoes every step of this attempt (and would purge their events): its event file goes,
        so retries on a full disk leave nothing behind."""
        if self.bar:
            self.bar.close()
        if not self.writer:
            return
        try:
            self.writer.close()
        except Exception as e:   # noqa: BLE001 - a full disk must not hide the error that stopped training
            log.warning("TensorBoard log of %s not flushed: %s", self.run, e)
        if disk_failed and latest_checkpoint(self.run) == self.ck_before:
            with contextlib.suppress(OSError):
                for name in set(os.listdir(self.run / "tb")) - self.tb_before:
                    os.remove(self.run / "tb" / name)


def _identity(x):
    return x


def _ignore_sigint(worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
