"""Data of stage two: prompts and features become batches, for training, evaluation and inference alike.

* ``PromptEncoder``: (clip, task, answer) -> token ids, feature slots and loss labels, in a run's prompt
  style and layout (``train.prompt.encode``), with the task's instruction drawn per epoch (training) or
  its first one (evaluation, inference).
* ``FeatureBatcher``: clip ids -> the batch's features, {set key: [B, ...] tensor, or the list of rows
  where lengths differ}, from a ``store.FeatureDataset`` (or any source with ``keys``, ``clip_ids``,
  ``__getitems__``, as evaluation's two-store reader).
* ``Batch.build`` pads the encoded examples and joins the features.
* ``TrainData``: the examples of one split of a corpus, through the two.

An *example* is one (clip, task) pair whose answer exists (emotion: the label; reason / reason_v2:
the clip's reference text) and fits ``max_len`` whole (``fit_examples``: answers are never cut; subtitles
are, to ``max_subtitle_tokens``; both are counted for the run report, ``text_report``). The order of an epoch is a pure function of (seed, epoch, global batch):
shuffled, length-grouped within windows, cut into optimizer steps. So the data position of a run is
just its step number, DDP ranks take disjoint slices of each step, and a resumed run sees exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from emollama.corpora import Clip, Corpus
from emollama.store.dataset import FeatureDataset

from .config import TrainConfig
from .pieces import DEFAULT_SUBTITLE_TOKENS, IGNORE, Encoded, Layout, fit_subtitle
from .prompt import encode, instruction_for, instructions, prompt_style, stop_token_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    clip: Clip
    task: str
    answer: str


def resolve_labels(cfg: TrainConfig, corpus: Corpus) -> list[str]:
    """data.labels, else the corpus labels that occur in the training split (in the corpus's order)."""
    if cfg.data.labels:
        return list(cfg.data.labels)
    seen = {c.label for c in corpus.split(cfg.data.train_split) if c.label}
    return [l for l in corpus.labels if l in seen] or list(corpus.labels)


def make_examples(clips: Sequence[Clip], tasks: Sequence[str], labels: Sequence[str]) -> tuple[list[Example], dict]:
    """Examples for ``tasks``; clips without an answer for a task are counted, not silently lost."""
    out: list[Example] = []
    skipped: dict[str, int] = {}
    for clip in clips:
        for task in tasks:
            if task == "emotion":
                answer = clip.label if clip.label in labels else None
            else:
                answer = clip.texts.get(task)
            if not answer:
                skipped[task] = skipped.get(task, 0) + 1
                continue
            out.append(Example(clip, task, answer))
    return out, skipped


FIT_MARGIN = 32     # an example estimated within this many tokens of max_len is encoded in full to decide


def fit_examples(examples: Sequence[Example], prompts: "PromptEncoder"
                 ) -> tuple[list[Example], list[int], list[str], list[dict]]:
    """(the examples that fit ``prompts.max_len``, their lengths for grouping (``measure``), the ids of
    the clips whose subtitle was cut, the rejected examples as {"id", "task", "reason"}).

    An example's length is its answer and (cut) subtitle, tokenized once, plus its task's fixed part (the
    prompt with the task's longest instruction); one estimated within ``FIT_MARGIN`` tokens of ``max_len``
    is encoded in full to decide. Answers are never cut: an example whose whole answer does not fit even
    with the subtitle cut to ``max_subtitle_tokens`` is rejected with its reason."""
    kept: list[Example] = []
    lengths: list[int] = []
    cut: dict[str, None] = {}
    rejected: list[dict] = []
    for e in examples:
        n, was_cut = prompts.measure(e.clip, e.answer)
        if was_cut:
            cut[e.clip.id] = None
        if prompts.fixed_part(e.task) + n + FIT_MARGIN > prompts.max_len:
            enc = prompts.longest(e.clip, e.task, e.answer)
            if len(enc.ids) > prompts.max_len:
                rejected.append({"id": e.clip.id, "task": e.task, "reason": (
                    f"{len(enc.ids)} tokens (the answer {len(enc.ids) - enc.answer_start}) with the subtitle at "
                    f"most {prompts.max_subtitle_tokens} tokens: over data.max_len = {prompts.max_len}, and "
                    "answers are never cut (raise data.max_len, or lower data.max_subtitle_tokens)")})
                continue
        kept.append(e)
        lengths.append(n)
    return kept, lengths, list(cut), rejected


def text_report(*datas: "TrainData") -> dict:
    """What the text budget did to each split: subtitles cut, examples rejected (for metrics.json)."""
    out: dict = {}
    for d in datas:
        out[d.split] = {"max_subtitle_tokens": d.prompts.max_subtitle_tokens, "max_len": d.prompts.max_len,
                        "subtitles_cut": len(d.subtitles_cut), "subtitles_cut_ids": d.subtitles_cut[:20],
                        "rejected": len(d.rejected), "rejected_examples": d.rejected[:20]}
    return out


def text_summary(report: dict) -> str:
    """One line of the training summary from ``text_report``."""
    parts = [f"{split}: {r['subtitles_cut']} subtitle(s) cut to {r['max_subtitle_tokens']} tokens, "
             f"{r['rejected']} example(s) rejected (over max_len {r['max_len']})" for split, r in report.items()]
    return "text: " + "; ".join(parts)


def epoch_plan(lengths: Sequence[int], global_batch: int, seed: int, epoch: int, *, group: bool = True,
               window: int = 16) -> list[list[int]]:
    """Example indices of each optimizer step of ``epoch`` (the incomplete last step is dropped).

    Length grouping: shuffle, sort by length inside windows of ``window`` steps, cut into steps, then
    shuffle the steps, so a step pads to similar lengths but the order stays random."""
    g = np.random.default_rng([seed, epoch])
    order = g.permutation(len(lengths))
    n_steps = len(order) // global_batch
    order = order[: n_steps * global_batch]
    if group and n_steps > 1:
        lens = np.asarray(lengths)
        span = window * global_batch
        chunks = [order[i:i + span] for i in range(0, len(order), span)]
        order = np.concatenate([c[np.argsort(-lens[c], kind="stable")] for c in chunks])
    steps = [order[i * global_batch:(i + 1) * global_batch].tolist() for i in range(n_steps)]
    if group and n_steps > 1:
        steps = [steps[i] for i in g.permutation(n_steps)]
    return steps


def micro_batches(step: list[int], world: int, rank: int, accum: int) -> list[list[int]]:
    """This rank's micro-batches of one step: the step splits into world x accum equal parts."""
    per = len(step) // (world * accum)
    mine = step[rank * per * accum:(rank + 1) * per * accum]
    return [mine[i * per:(i + 1) * per] for i in range(accum)]


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    feat_mask: torch.Tensor
    features: dict[str, Any]
    ids: list[str]
    tasks: list[str]
    meta: dict = field(default_factory=dict)

    @classmethod
    def build(cls, encs: Sequence[Encoded], features: dict[str, Any], pad_id: int, ids: Sequence[str],
              tasks: Sequence[str]) -> "Batch":
        """The encoded examples right-padded with ``pad_id``, beside their features."""
        t = pad_encoded(encs, pad_id)
        return cls(t["input_ids"], t["attention_mask"], t["labels"], t["feat_mask"], features, list(ids), list(tasks))

    def to(self, device: torch.device) -> "Batch":
        if device.type == "cpu":
            return self
        mv = lambda x: x.to(device, non_blocking=True)   # noqa: E731
        feats = {k: (mv(v) if torch.is_tensor(v) else [mv(r) for r in v]) for k, v in self.features.items()}
        return Batch(mv(self.input_ids), mv(self.attention_mask), mv(self.labels), mv(self.feat_mask), feats,
                     self.ids, self.tasks, self.meta)

    def __getitem__(self, key: str):   # the model reads batches like mappings
        return getattr(self, key)


def pad_encoded(encs: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(e.ids) for e in encs)
    ids = torch.full((len(encs), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(encs), n), dtype=torch.long)
    lab = torch.full((len(encs), n), IGNORE, dtype=torch.long)
    fm = torch.zeros((len(encs), n), dtype=torch.bool)
    for i, e in enumerate(encs):
        k = len(e.ids)
        ids[i, :k] = torch.tensor(e.ids)
        att[i, :k] = 1
        lab[i, :k] = torch.tensor(e.labels)
        fm[i, :k] = torch.tensor(e.feat)
    return {"input_ids": ids, "attention_mask": att, "labels": lab, "feat_mask": fm}


@dataclass
class PromptEncoder:
    """Token ids of (clip, task, answer) in one prompt style and layout: what training, closed-set
    scoring and generation all feed the model."""

    tokenizer: Any
    layout: Layout
    labels: Sequence[str]               # the label set the emotion instruction names
    seed: int = 0
    max_len: int = 1024                 # tokens per training example: a longer one is rejected (TrainData)
    style: str = "emollama"
    eval_layout: str = "trained"        # trained | public-eval
    system: str = ""                    # the system prompt (chat style only)
    max_subtitle_tokens: int = DEFAULT_SUBTITLE_TOKENS   # subtitles are cut to this many tokens (prompts too)

    def __post_init__(self) -> None:
        self.labels = list(self.labels)
        self._longest: dict[str, str] = {}
        self._fixed: dict[str, int] = {}
        prompt_style(self.style).check(self.tokenizer)   # e.g. no chat template: refused now, not at the first batch

    @property
    def stop_ids(self) -> list[int]:
        """The token ids generation stops at (EOS, and the chat template's end-of-turn token)."""
        return stop_token_ids(self.tokenizer, self.style)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def example(self, clip: Clip, task: str, answer: str, epoch: int = 0, *, fixed: bool = False) -> Encoded:
        """Prompt and answer: the instruction drawn for (clip, task, epoch), or the task's first with ``fixed``."""
        instr = instruction_for(task, clip.id, self.labels, seed=self.seed, epoch=epoch, fixed=fixed, style=self.style)
        return self._encode(clip, task, instr, answer)

    def prompt(self, clip: Clip, task: str) -> Encoded:
        """The inference prompt of ``clip`` for ``task``: the task's first instruction, no answer."""
        instr = instruction_for(task, clip.id, self.labels, seed=self.seed, epoch=0, fixed=True, style=self.style)
        return self._encode(clip, task, instr, None)

    def longest(self, clip: Clip, task: str, answer: str) -> Encoded:
        """The example with the task's longest instruction (in tokens): what ``max_len`` is checked on."""
        if task not in self._longest:
            pool = instructions(task, self.labels, self.style)
            self._longest[task] = max(pool, key=lambda i: len(self.tokenizer(i, add_special_tokens=False)["input_ids"]))
        return self._encode(clip, task, self._longest[task], answer)

    def _encode(self, clip: Clip, task: str, instruction: str, answer: str | None) -> Encoded:
        return encode(self.tokenizer, self.layout, clip.subtitle, task, instruction, answer, style=self.style,
                      eval_layout=self.eval_layout, system=self.system, max_subtitle_tokens=self.max_subtitle_tokens)

    def measure(self, clip: Clip, answer: str) -> tuple[int, bool]:
        """(answer + subtitle tokens: the length that steps are grouped by (instructions vary little),
        whether the subtitle is cut to ``max_subtitle_tokens``)."""
        subtitle, cut = fit_subtitle(self.tokenizer, clip.subtitle, self.max_subtitle_tokens)
        text = answer + " " + ((subtitle if cut else clip.subtitle) or "")
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]), cut

    def fixed_part(self, task: str) -> int:
        """The tokens of a ``task`` example besides its answer and subtitle (``measure``), with the task's
        longest instruction."""
        if task not in self._fixed:
            probe = Clip("probe", Path("."), subtitle="so")
            self._fixed[task] = len(self.longest(probe, task, "so").ids) - self.measure(probe, "so")[0]
        return self._fixed[task]


class FeatureBatcher:
    """The features of a batch of clips, read from ``source`` (a ``store.FeatureDataset`` over the clips,
    or anything with ``keys``, ``clip_ids`` and ``__getitems__``)."""

    def __init__(self, source):
        self.source = source
        self.keys = list(source.keys)
        self.index = {c: i for i, c in enumerate(source.clip_ids)}

    @classmethod
    def from_store(cls, store, keys: Sequence[str], clip_ids: Sequence[str] | None = None) -> "FeatureBatcher":
        """Over the clips of ``store`` complete in every set of ``keys`` (or ``clip_ids``)."""
        return cls(FeatureDataset(store, list(keys), None if clip_ids is None else list(clip_ids)))

    def __contains__(self, clip_id: str) -> bool:
        return clip_id in self.index

    def __call__(self, clip_ids: Sequence[str]) -> dict[str, Any]:
        """{set key: [B, ...] rows stacked, or the list of rows where their shapes differ}."""
        items = self.source.__getitems__([self.index[c] for c in clip_ids])
        feats: dict[str, Any] = {}
        for k in self.keys:
            rows = [it[k] for it in items]
            feats[k] = torch.stack(rows) if all(r.shape == rows[0].shape for r in rows) else list(rows)
        return feats


class TrainData:
    """The examples of one split of ``corpus``, batched through a prompt encoder and a feature batcher."""

    def __init__(self, corpus: Corpus, split: str, tasks: Sequence[str], prompts: PromptEncoder,
                 features: FeatureBatcher):
        self.prompts, self.features = prompts, features
        clips = [c for c in corpus.split(split) if c.id in features]
        missing = [c.id for c in corpus.split(split) if c.id not in features]
        if missing:
            log.warning("%d %s clip(s) have no features in every configured set (skipped): %s",
                        len(missing), split, missing[:5])
        self.missing = missing
        self.clips = clips
        self.split = split
        examples, self.skipped = make_examples(clips, tasks, prompts.labels)
        self.examples, self.lengths, self.subtitles_cut, self.rejected = fit_examples(examples, prompts)
        if self.subtitles_cut:
            log.warning("%d %s clip(s) have a subtitle longer than data.max_subtitle_tokens = %d: cut to it: %s",
                        len(self.subtitles_cut), split, prompts.max_subtitle_tokens, self.subtitles_cut[:5])
        if self.rejected:
            log.warning("%d %s example(s) rejected: %s", len(self.rejected), split,
                        "; ".join(f"{r['id']} ({r['task']}): {r['reason']}" for r in self.rejected[:3]))

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, indices: Sequence[int], epoch: int) -> Batch:
        exs = [self.examples[i] for i in indices]
        encs = [self.prompts.example(e.clip, e.task, e.answer, epoch) for e in exs]
        return Batch.build(encs, self.features([e.clip.id for e in exs]), self.prompts.pad_id,
                           [e.clip.id for e in exs], [e.task for e in exs])


@torch.no_grad()
def fit_statistics(features: FeatureBatcher, clip_ids: Sequence[str], projectors, chunk: int = 64) -> None:
    """Per-dimension mean and std of every projector's input over ``clip_ids`` (the train split's)."""
    if not clip_ids:
        return
    sums: dict[str, list] = {}
    for i in range(0, len(clip_ids), chunk):
        feats = features(clip_ids[i:i + chunk])
        for name, spec in projectors.specs.items():
            v = projectors.prepare(name, feats[spec.set_key]).double()
            v = v.reshape(-1, projectors.layers[name].norm.mean.numel())
            acc = sums.setdefault(name, [0, 0.0, 0.0])
            acc[0] += v.shape[0]
            acc[1] = acc[1] + v.sum(0)
            acc[2] = acc[2] + (v * v).sum(0)
    for name, (n, s1, s2) in sums.items():
        mean = s1 / n
        std = (s2 / n - mean * mean).clamp(min=0).sqrt()
        projectors.set_statistics(name, mean.float(), std.float())


class StepLoader(torch.utils.data.Dataset):
    """Micro-batches of this rank from ``start_step`` on, as a Dataset (DataLoader workers prefetch)."""

    def __init__(self, data: TrainData, plan: list[list[int]], epoch: int, world: int, rank: int, accum: int):
        self.data, self.epoch = data, epoch
        self.items = [mb for step in plan for mb in micro_batches(step, world, rank, accum)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Batch:
        return self.data.collate(self.items[i], self.epoch)
