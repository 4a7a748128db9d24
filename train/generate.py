"""Greedy generation with the training prompt layout.

The prompt is built by the prompt encoder training uses (``PromptEncoder.prompt``: ``train.prompt.encode``
with no answer and the task's first instruction), exactly the prompt ``train.evaluate.score_labels`` scores
labels after. Feature slots are filled by the run's projectors (``EmoModel.embed``); the batch is then
left-padded in embedding space and handed to the LM's ``generate`` (greedy, ``max_new_tokens``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .data import Batch, FeatureBatcher, PromptEncoder


@torch.no_grad()
def generate(model, prompts: PromptEncoder, features: FeatureBatcher, clips: Sequence, task: str, *,
             max_new_tokens: int = 64, batch_size: int = 8, device: torch.device | None = None) -> list[str]:
    """Greedy answers of ``model`` for ``clips`` (features from ``features``) to the ``task`` prompt."""
    device = device or torch.device("cpu")
    tok = prompts.tokenizer
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for i in range(0, len(clips), max(1, batch_size)):
            chunk = list(clips[i:i + max(1, batch_size)])
            ids = [c.id for c in chunk]
            batch = Batch.build([prompts.prompt(c, task) for c in chunk], features(ids), prompts.pad_id, ids,
                                [task] * len(ids)).to(device)
            emb = model.embed(batch)                                   # right-padded [B, L, H]
            lengths = batch.attention_mask.sum(1).tolist()
            width = emb.shape[1]
            left = torch.zeros_like(emb)
            att = torch.zeros(emb.shape[:2], dtype=torch.long, device=emb.device)
            for r, n in enumerate(lengths):
                left[r, width - n:] = emb[r, :n]
                att[r, width - n:] = 1
            ids_out = model.llm.generate(inputs_embeds=left, attention_mask=att, max_new_tokens=max_new_tokens,
                                         do_sample=False, num_beams=1, eos_token_id=prompts.stop_ids,
                                         pad_token_id=tok.pad_token_id)
            for row in ids_out:
                out.append(tok.decode(row.tolist(), skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out
