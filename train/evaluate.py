"""Closed-set scoring: the log-likelihood of each label (and </s>) after the emotion prompt.

The prediction is always inside the label set, unlike parsing a generated answer. The prompt is the
training prompt with the emotion task's first instruction. ``score_labels`` is reusable by later
evaluations (MER2023, DFEW); ``classification_metrics`` gives accuracy, weighted F1 and more.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from . import scoring
from .data import Example, TrainData, pad_encoded


@torch.no_grad()
def score_labels(model, data: TrainData, clips: Sequence, labels: Sequence[str], *, batch_size: int = 8,
                 device: torch.device | None = None, autocast: Any = None) -> np.ndarray:
    """[len(clips), len(labels)] summed log-probabilities of ``label</s>`` after each clip's prompt."""
    from .data import Batch

    was_training = model.training
    model.eval()
    device = device or torch.device("cpu")
    rows: list[np.ndarray] = []
    k = len(labels)
    per = max(1, batch_size)
    try:
        for i in range(0, len(clips), per):
            chunk = clips[i:i + per]
            exs = [Example(c, "emotion", lab) for c in chunk for lab in labels]
            encs = [data.encode(e, 0, fixed=True) for e in exs]
            batch = data._batch(exs, encs)
            t = pad_encoded(encs, data.tokenizer.pad_token_id)
            batch = Batch(t["input_ids"], t["attention_mask"], t["labels"], t["feat_mask"], batch.features,
                          batch.ids, batch.tasks).to(device)
            ctx = autocast() if autocast else torch.autocast(device.type, enabled=False)
            with ctx:
                logits = model.logits(batch)[:, :-1].float()
            target = batch.labels[:, 1:]
            logp = torch.log_softmax(logits, dim=-1)
            mask = target != -100
            tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            rows.append(tok.sum(1).reshape(len(chunk), k).cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(rows) if rows else np.zeros((0, k))


def classification_metrics(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict:
    """`train.scoring.classification_metrics` as a dict, plus the chance level."""
    out = scoring.classification_metrics(y_true, y_pred, labels).to_dict()
    out["chance"] = 1.0 / len(labels) if labels else 0.0
    return out


def evaluate_closed_set(model, data: TrainData, labels: Sequence[str], **kw) -> dict:
    """Closed-set emotion metrics over the clips of ``data`` that have a label in ``labels``."""
    clips = [c for c in data.clips if c.label in labels]
    if not clips:
        return {"n": 0, "accuracy": None, "weighted_f1": None, "note": "no labelled clips in this split"}
    scores = score_labels(model, data, clips, labels, **kw)
    pred = [labels[i] for i in scores.argmax(1)]
    true = [c.label for c in clips]
    out = classification_metrics(true, pred, labels)
    out["predictions"] = {c.id: p for c, p in zip(clips, pred)}
    return out


def format_metrics(m: dict, title: str = "held-out") -> list[str]:
    if not m.get("n"):
        return [f"{title}: no labelled clips"]
    lines = [f"{title}: n={m['n']}  accuracy {m['accuracy']:.3f}  weighted F1 {m['weighted_f1']:.3f}  "
             f"UAR {m['uar']:.3f}  (chance {m['chance']:.3f})"]
    labels = m["labels"]
    w = max(len(l) for l in labels)
    lines.append(" " * (w + 2) + " ".join(f"{l[:7]:>7}" for l in labels) + "   <- predicted")
    for lab, row in zip(labels, m["confusion"]):
        lines.append(f"{lab:>{w}}  " + " ".join(f"{v:>7}" for v in row))
    return lines
