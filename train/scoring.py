"""Classification metrics and answer parsing, with no dependency beyond numpy.

- `classification_metrics`: accuracy (= DFEW's WAR), weighted F1 (MER2023's metric, as sklearn's
  `f1_score(average="weighted")`), macro F1 (over the classes that occur in the truth or the predictions,
  as sklearn's default: a label of the set that no clip has and no answer names does not count, so the
  number is the same whether the set lists it or not), UAR (mean recall over the classes present in the
  truth, as sklearn's `balanced_accuracy_score`), per-class precision / recall / F1 / support, and
  the confusion matrix. Conventions follow sklearn's with `zero_division=0`.
- `parse_label`: the label an answer names (case, punctuation and common synonyms handled), or
  None: answers outside the label set are counted and listed by the caller, never silently turned
  into a class (the public scorer maps them to "neutral").
- `public_label`: the public scorer itself, for comparing with the published numbers on equal terms.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

SYNONYMS: dict[str, tuple[str, ...]] = {
    "neutral": ("neutral", "neutrality", "calm", "calmness", "no emotion", "indifferent", "emotionless"),
    "happy": ("happy", "happiness", "joy", "joyful", "glad", "cheerful", "delighted", "pleased", "excited"),
    "angry": ("angry", "anger", "furious", "mad", "annoyed", "irritated", "rage", "enraged"),
    "sad": ("sad", "sadness", "unhappy", "sorrow", "sorrowful", "upset", "depressed", "grief", "melancholy"),
    "worried": ("worried", "worry", "worrying", "anxious", "anxiety", "nervous", "concerned", "uneasy"),
    "surprise": ("surprise", "surprised", "surprising", "astonished", "astonishment", "amazed", "shocked", "shock"),
    "fear": ("fear", "afraid", "scared", "fearful", "frightened", "terrified", "panic"),
    "disgust": ("disgust", "disgusted", "disgusting", "repulsed", "revolted"),
    "contempt": ("contempt", "contemptuous", "scornful", "disdain"),
    "doubt": ("doubt", "doubtful", "skeptical", "sceptical", "suspicious", "uncertain", "confused"),
}


def _norm(text: str) -> str:
    return " " + re.sub(r"[^a-z]+", " ", text.lower()).strip() + " "


def parse_label(answer: str, labels: Sequence[str], synonyms: Mapping[str, Sequence[str]] | None = None) -> str | None:
    """The label `answer` names, or None when it names none of `labels`.

    When several labels are named, the last one wins ("not sad ... rather, she is happy" -> happy;
    reasoning answers end with their conclusion). A single-word answer is matched exactly."""
    syn = synonyms if synonyms is not None else SYNONYMS
    text = _norm(answer)
    best: tuple[int, str] | None = None
    for label in labels:
        for word in {label.lower(), *syn.get(label.lower(), ())}:
            for m in re.finditer(re.escape(f" {_norm(word).strip()} "), text):
                end = m.end()
                if best is None or end > best[0]:
                    best = (end, label)
    return best[1] if best else None


def public_label(answer: str, labels: Sequence[str], fallback: str = "neutral") -> str | None:
    """The public Emotion-LLaMA scorer: the last space-separated word of the (stripped) answer, taken as
    it is; anything outside ``labels`` becomes ``fallback`` (None when the fallback is not a label)."""
    word = answer.strip().split(" ")[-1]
    if word in labels:
        return word
    return fallback if fallback in labels else None


@dataclass
class Metrics:
    labels: list[str]
    n: int
    accuracy: float                  # = WAR
    weighted_f1: float
    macro_f1: float
    uar: float                       # mean recall over classes present in the truth
    per_class: dict[str, dict[str, float]]
    confusion: list[list[int]]       # rows: truth, columns: prediction, in `labels` order
    unparsed: list[tuple[str, str]] = field(default_factory=list)   # (id, answer) outside the label set

    @property
    def war(self) -> float:
        return self.accuracy

    def to_dict(self) -> dict:
        return {"n": self.n, "accuracy": self.accuracy, "war": self.accuracy, "weighted_f1": self.weighted_f1,
                "macro_f1": self.macro_f1, "uar": self.uar, "labels": self.labels, "per_class": self.per_class,
                "confusion": self.confusion, "unparsed": len(self.unparsed),
                "unparsed_examples": [list(x) for x in self.unparsed[:50]]}

    def table(self) -> str:
        lines = [f"{'class':<12} {'prec':>6} {'recall':>6} {'f1':>6} {'support':>7}"]
        for lab in self.labels:
            p = self.per_class[lab]
            lines.append(f"{lab:<12} {p['precision']:6.3f} {p['recall']:6.3f} {p['f1']:6.3f} {int(p['support']):7d}")
        lines.append(f"n={self.n}  accuracy/WAR={self.accuracy:.4f}  weighted F1={self.weighted_f1:.4f}  "
                     f"macro F1={self.macro_f1:.4f}  UAR={self.uar:.4f}  outside the label set: {len(self.unparsed)}")
        return "\n".join(lines)


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str | None], labels: Sequence[str] | None = None,
                           ids: Sequence[str] | None = None) -> Metrics:
    """Metrics of predictions against the truth. A None prediction (an answer outside the label set)
    counts as wrong for every class and is listed in `unparsed`."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} truths but {len(y_pred)} predictions")
    labels = list(labels) if labels is not None else sorted({*y_true, *(p for p in y_pred if p is not None)})
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({t for t in y_true if t not in index})
    if unknown:
        raise ValueError(f"truth labels {unknown} are not in the label set {labels}")
    k = len(labels)
    cm = np.zeros((k, k), dtype=np.int64)
    unparsed = []
    ids = list(ids) if ids is not None else [str(i) for i in range(len(y_true))]
    for cid, t, p in zip(ids, y_true, y_pred):
        if p is None or p not in index:
            unparsed.append((cid, "" if p is None else str(p)))
            continue
        cm[index[t], index[p]] += 1
    support = np.array([sum(1 for t in y_true if t == lab) for lab in labels], dtype=np.float64)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    n = len(y_true)
    present = support > 0
    per_class = {lab: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                       "support": int(support[i])} for i, lab in enumerate(labels)}
    return Metrics(
        labels=labels, n=n,
        accuracy=float(tp.sum() / n) if n else 0.0,
        weighted_f1=float((f1 * support).sum() / support.sum()) if support.sum() else 0.0,
        macro_f1=float(f1[present | (predicted > 0)].mean()) if (present | (predicted > 0)).any() else 0.0,
        uar=float(recall[present].mean()) if present.any() else 0.0,
        per_class=per_class, confusion=cm.tolist(), unparsed=unparsed,
    )


def read_predictions(path_or_text, *, labels: Sequence[str], synonyms=None) -> tuple[list[str], list[str], list[str | None], list[str]]:
    """A predictions CSV `name,label,prediction` -> ids, truths, parsed predictions, raw answers.
    The prediction may be a label or a free-text answer: it is parsed with `parse_label`."""
    text = Path(path_or_text).read_text(encoding="utf-8-sig") if not isinstance(path_or_text, io.StringIO) \
        else path_or_text.getvalue()
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise ValueError("the predictions file has no rows")
    missing = {"name", "label", "prediction"} - {(k or "").strip().lower() for k in rows[0]}
    if missing:
        raise ValueError(f"the predictions file needs columns name,label,prediction; missing {sorted(missing)}")
    names = [(r.get("name") or "").strip() for r in ({(k or "").strip().lower(): v for k, v in r.items()}
                                                      for r in rows)]
    seen: set[str] = set()
    twice = sorted({n for n in names if n in seen or seen.add(n)})
    if twice:
        raise ValueError(f"clips listed more than once: {', '.join(twice[:10])}"
                         + (f" and {len(twice) - 10} more" if len(twice) > 10 else "")
                         + " (each clip must have one row: which prediction counts is ambiguous)")
    ids, truth, pred, raw = [], [], [], []
    for r in rows:
        r = {(k or "").strip().lower(): (v or "").strip() for k, v in r.items()}
        ids.append(r["name"])
        t = parse_label(r["label"], labels, synonyms)
        if t is None:
            raise ValueError(f"{r['name']}: truth label {r['label']!r} is not in the label set {list(labels)}")
        truth.append(t)
        raw.append(r["prediction"])
        pred.append(parse_label(r["prediction"], labels, synonyms))
    return ids, truth, pred, raw

