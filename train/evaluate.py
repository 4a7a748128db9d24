"""Closed-set scoring: the log-likelihood of each label (and </s>) after the emotion prompt.

The prediction is always inside the label set, unlike parsing a generated answer. The prompt is the
training prompt with the emotion task's first instruction (``PromptEncoder.example(..., fixed=True)``),
over the features of a ``FeatureBatcher``. ``score_labels`` is reusable by later
evaluations (MER2023, DFEW); ``scoring.classification_metrics`` gives accuracy, weighted F1 and more.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from . import scoring
from .data import Batch, FeatureBatcher, PromptEncoder, TrainData


@torch.no_grad()
def score_labels(model, prompts: PromptEncoder, features: FeatureBatcher, clips: Sequence, labels: Sequence[str], *,
                 batch_size: int = 8, device: torch.device | None = None, autocast: Any = None) -> np.ndarray:
    """[len(clips), len(labels)] summed log-probabilities of ``label</s>`` after each clip's prompt."""
    was_training = model.training
    model.eval()
    device = device or torch.device("cpu")
    rows: list[np.ndarray] = []
    k = len(labels)
    per = max(1, batch_size)
    try:
        for i in range(0, len(clips), per):
            chunk = clips[i:i + per]
            encs = [prompts.example(c, "emotion", lab, 0, fixed=True) for c in chunk for lab in labels]
            ids = [c.id for c in chunk for _ in labels]
            batch = Batch.build(encs, features(ids), prompts.pad_id, ids, ["emotion"] * len(ids)).to(device)
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


def evaluate_closed_set(model, data: TrainData, labels: Sequence[str], **kw) -> dict:
    """Closed-set emotion metrics over the clips of ``data`` that have a label in ``labels``."""
    clips = [c for c in data.clips if c.label in labels]
    if not clips:
        return {"n": 0, "accuracy": None, "weighted_f1": None, "note": "no labelled clips in this split"}
    scores = score_labels(model, data.prompts, data.features, clips, labels, **kw)
    pred = [labels[i] for i in scores.argmax(1)]
    true = [c.label for c in clips]
    out = scoring.classification_metrics(true, pred, labels).to_dict()
    out["chance"] = 1.0 / len(labels)
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
