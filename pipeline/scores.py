"""The labels of a set of clips, three ways: the closed set, the generated answer parsed, the public scorer.

- ``score_clips``: the closed set (``train.evaluate.score_labels``: the likelihood of each label after the
  emotion prompt, so the prediction is always in the set; ``target_probabilities`` sums the mapped labels'
  into their targets), and the generated answer, parsed (``train.scoring.parse_label``: answers naming no
  label are counted and listed, never turned into a class) and by the public scorer (last word; outside
  the labels counts as neutral), for comparing with published numbers.
- ``Scores.metrics``: the metrics of each method (``train.scoring.Metrics.to_dict()``).

Used by ``pipeline.evaluation`` (one evaluation) and ``pipeline.conditions`` (the same clips under each
robustness condition).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from emollama.corpora import Clip
from emollama.pipeline.features import EvalError
from emollama.train.evaluate import score_labels
from emollama.train.generate import generate
from emollama.train.scoring import classification_metrics, parse_label, public_label

__all__ = ["parse_label_map", "candidates", "target_probabilities", "Scores", "score_clips"]


def parse_label_map(items: Sequence[str], targets: Sequence[str]) -> dict[str, str]:
    """``FROM=TO`` items: the model's label FROM counts as the dataset's label TO."""
    out: dict[str, str] = {}
    for item in items:
        a, sep, b = item.partition("=")
        a, b = a.strip().lower(), b.strip().lower()
        if not sep or not a or not b:
            raise EvalError(f"--label-map {item!r}: expected FROM=TO (e.g. worried=fear)")
        if b not in targets:
            raise EvalError(f"--label-map {item!r}: {b!r} is not a label of the evaluated set {list(targets)}")
        out[a] = b
    return out


def candidates(targets: Sequence[str], label_map: Mapping[str, str]) -> list[str]:
    """The words scored after the prompt: the target labels, then the mapped model labels."""
    return list(targets) + [a for a in label_map if a not in targets]


def target_probabilities(logp: np.ndarray, cands: Sequence[str], targets: Sequence[str],
                         label_map: Mapping[str, str]) -> np.ndarray:
    """[N, len(targets)]: softmax over the candidates' log-likelihoods, summed into their targets."""
    if logp.size == 0:
        return np.zeros((logp.shape[0], len(targets)))
    z = logp - logp.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    out = np.zeros((logp.shape[0], len(targets)))
    index = {t: i for i, t in enumerate(targets)}
    for j, c in enumerate(cands):
        out[:, index[label_map.get(c, c)]] += p[:, j]
    return out


@dataclass
class Scores:
    """The labels of a set of clips three ways: closed set (``probs`` over the targets, ``closed`` its
    argmax), and, when generated, the ``answers`` parsed (``parsed``) and by the public scorer (``public``)."""

    probs: np.ndarray
    closed: list[str]
    answers: list[str]
    parsed: list[str | None]
    public: list[str | None]
    seconds: dict[str, float]

    def metrics(self, truth: Sequence[str], targets: Sequence[str], ids: Sequence[str]) -> dict[str, dict]:
        """{"closed_set": ..., "generated": ..., "public": ...}: ``Metrics.to_dict()`` of each method scored."""
        out = {"closed_set": classification_metrics(truth, self.closed, targets, ids=ids).to_dict()}
        if self.answers:
            raw = dict(zip(ids, self.answers))
            for key, preds in (("generated", self.parsed), ("public", self.public)):
                m = classification_metrics(truth, preds, targets, ids=ids)
                m.unparsed = [(cid, raw[cid]) for cid, _ in m.unparsed]
                out[key] = m.to_dict()
        return out


def score_clips(run, prompts, batcher, usable: Sequence[Clip], targets: Sequence[str], label_map: Mapping[str, str],
                *, batch_size: int = 8, generate_tokens: int | None = 16) -> Scores:
    """Score ``usable`` (every one has features in ``batcher``): the closed set over ``targets`` (and the
    mapped labels), and the answer generated in at most ``generate_tokens`` tokens (None: not generated)."""
    cands = candidates(targets, label_map)
    ids = [c.id for c in usable]
    t1 = time.perf_counter()
    logp = score_labels(run.model, prompts, batcher, usable, cands, batch_size=batch_size, device=run.device)
    probs = target_probabilities(logp, cands, targets, label_map)
    bad = [cid for cid, row in zip(ids, probs) if not np.isfinite(row).all()]
    if bad:
        raise EvalError(f"the model gave non-finite scores (NaN or Inf) for {len(bad)} of {len(ids)} clips (e.g. "
                        f"{', '.join(bad[:3])}): the run's weights or these clips' features hold non-finite values "
                        "(check the store with `emollama store verify`); nothing was written")
    closed = [targets[i] for i in probs.argmax(1)]
    t2 = time.perf_counter()
    answers: list[str] = []
    parsed: list[str | None] = []
    public: list[str | None] = []
    if generate_tokens is not None:
        answers = generate(run.model, prompts, batcher, usable, "emotion", max_new_tokens=generate_tokens,
                           batch_size=batch_size, device=run.device)
        for a in answers:
            p = parse_label(a, cands)
            parsed.append(label_map.get(p, p) if p is not None else None)
            w = public_label(a, cands)
            public.append(label_map.get(w, w) if w is not None else None)
    return Scores(probs, closed, answers, parsed, public,
                  {"closed_set": t2 - t1, "generate": time.perf_counter() - t2})
