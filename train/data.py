"""Training data: features from the store, texts and labels from the dataset adapter.

An *example* is one (clip, task) pair whose answer exists (emotion: the label; reason / reason_v2:
the clip's reference text). The order of an epoch is a pure function of (seed, epoch, global batch):
shuffled, length-grouped within windows, cut into optimizer steps. So the data position of a run is
just its step number, DDP ranks take disjoint slices of each step, and a resumed run sees exactly
the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from emollama.store.datasets import Clip, Corpus

from .prompt import IGNORE, Layout, encode, instruction_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    clip: Clip
    task: str
    answer: str


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

    def to(self, device: torch.device) -> "Batch":
        if device.type == "cpu":
            return self
        mv = lambda x: x.to(device, non_blocking=True)   # noqa: E731
        feats = {k: (mv(v) if torch.is_tensor(v) else [mv(r) for r in v]) for k, v in self.features.items()}
        return Batch(mv(self.input_ids), mv(self.attention_mask), mv(self.labels), mv(self.feat_mask), feats,
                     self.ids, self.tasks, self.meta)

    def __getitem__(self, key: str):   # the model reads batches like mappings
        return getattr(self, key)


def pad_encoded(encs: Sequence, pad_id: int) -> dict[str, torch.Tensor]:
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


class TrainData:
    """Examples of one split with their features (held by a store.FeatureDataset)."""

    def __init__(self, corpus: Corpus, features, split: str, tasks: Sequence[str], labels: Sequence[str],
                 tokenizer, layout: Layout, *, seed: int = 0, max_len: int = 1024, style: str = "emollama",
                 eval_layout: str = "trained"):
        self.features = features                   # store.FeatureDataset over every clip we need
        self.index = {c: i for i, c in enumerate(features.clip_ids)}
        clips = [c for c in corpus.split(split) if c.id in self.index]
        missing = [c.id for c in corpus.split(split) if c.id not in self.index]
        if missing:
            log.warning("%d %s clip(s) have no features in every configured set (skipped): %s",
                        len(missing), split, missing[:5])
        self.missing = missing
        self.clips = clips
        self.examples, self.skipped = make_examples(clips, tasks, labels)
        self.split, self.tokenizer, self.layout = split, tokenizer, layout
        self.labels = list(labels)
        self.seed, self.max_len = seed, max_len
        self.style, self.eval_layout = style, eval_layout
        # approximate lengths for grouping: answer + subtitle tokens (instructions vary little)
        self.lengths = [len(tokenizer(e.answer + " " + (e.clip.subtitle or ""), add_special_tokens=False)["input_ids"])
                        for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def encode(self, ex: Example, epoch: int, *, fixed: bool = False, answer: str | None = None):
        instr = instruction_for(ex.task, ex.clip.id, self.labels, seed=self.seed, epoch=epoch, fixed=fixed,
                                style=self.style)
        return encode(self.tokenizer, self.layout, ex.clip.subtitle, ex.task, instr,
                      ex.answer if answer is None else answer, max_len=self.max_len, style=self.style,
                      eval_layout=self.eval_layout)

    def prompt(self, clip: Clip, task: str):
        """The inference prompt of ``clip`` for ``task``: the task's first instruction, no answer."""
        instr = instruction_for(task, clip.id, self.labels, seed=self.seed, epoch=0, fixed=True, style=self.style)
        return encode(self.tokenizer, self.layout, clip.subtitle, task, instr, None, style=self.style,
                      eval_layout=self.eval_layout)

    def collate(self, indices: Sequence[int], epoch: int) -> Batch:
        exs = [self.examples[i] for i in indices]
        encs = [self.encode(e, epoch) for e in exs]
        return self._batch(exs, encs)

    def _batch(self, exs: Sequence[Example], encs: Sequence) -> Batch:
        items = self.features.__getitems__([self.index[e.clip.id] for e in exs])
        feats: dict[str, Any] = {}
        for k in self.features.keys:
            rows = [it[k] for it in items]
            feats[k] = torch.stack(rows) if all(r.shape == rows[0].shape for r in rows) else list(rows)
        t = pad_encoded(encs, self.tokenizer.pad_token_id)
        return Batch(t["input_ids"], t["attention_mask"], t["labels"], t["feat_mask"], feats,
                     [e.clip.id for e in exs], [e.task for e in exs])


@torch.no_grad()
def fit_statistics(data: TrainData, projectors, chunk: int = 64) -> None:
    """Per-dimension mean and std of every projector's input over the clips of ``data`` (train split)."""
    idx = [data.index[c.id] for c in data.clips]
    if not idx:
        return
    sums: dict[str, list] = {}
    for i in range(0, len(idx), chunk):
        items = data.features.__getitems__(idx[i:i + chunk])
        for name, spec in projectors.specs.items():
            rows = [it[spec.set_key] for it in items]
            x = torch.stack(rows) if all(r.shape == rows[0].shape for r in rows) else list(rows)
            v = projectors.prepare(name, x).double().reshape(-1, projectors.layers[name].feature_mean.numel())
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
