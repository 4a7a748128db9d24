"""The prompt: one layout for training and inference, feature tokens as embedding slots.

Two prompt styles (``data.prompt``, saved in the run's config):

``emollama`` (the default for new runs), our own wording:

    [INST] <video>{global patch tokens}</video> <feature>{local, temporal, audio, CLS}</feature>
    The person in the video says: {subtitle}. [{task}] {instruction} [/INST] {answer}</s>

* A feature token is a *slot*: the text around it is tokenized, the slot holds a placeholder id
  (the pad id) and a mask bit, and the model writes the projected feature into the slot's embedding.
* Views that are not configured drop their slots; a section with no slot at all (e.g. audio-only
  training has no ``<video>`` section) is left out with its tags.
* A clip with no subtitle leaves out the whole "The person in the video says" sentence (saying
  "says: ." or inventing "nothing" would teach the model a fact the corpus does not state).
* A subtitle that already ends with . ! or ? gets no second full stop.
* Only the answer tokens and the closing ``</s>`` carry loss. Where the answer starts is found from
  the tokenizer's character offsets, so the prompt tokens are exactly those of the prompt alone.

``emotion-llama``: the released model's training protocol, token for token (what its weights expect):

    <s> | [INST] <video> | 256 patches | </video> <feature> | local temporal audio CLS |
    </feature> The person in video says: {sentence}.  [{task}] {instruction}  [/INST] | {answer}</s>

* each text piece is tokenized on its own with ``add_special_tokens=False``; the answer too (so it
  gets its own leading word boundary), then ``</s>``. Note "in video" and the two double spaces.
* the answer first passes the caption filter (``caption_filter``: lowercase, ``. ! " ( ) * # : ; ~``
  to spaces, whitespace collapsed, at most 200 words); the emotion instruction is the released one
  (nine labels, whatever the label set); the reason instructions are the released pool of five.
* the tags and the sentence are always written (the protocol has no optional part); a clip without
  a subtitle says ``The person in video says: .``.

Evaluation layout ``public-eval`` (``emotion-llama`` only) reproduces the public evaluation script,
which made the published MER2023 number: all feature embeddings (256 patches, local, temporal, audio,
CLS) go where ``<video>`` is, and ``<feature><FeatureHere></feature>`` stays literal text.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Sequence

TASKS = ("emotion", "reason", "reason_v2")
PROMPT_STYLES = ("emollama", "emotion-llama")
EVAL_LAYOUTS = ("trained", "public-eval")
TASK_TAGS = {"emotion": "emotion", "reason": "reason", "reason_v2": "reason_v2"}
IGNORE = -100

# Our own wording. `{labels}` is replaced by the label set, comma separated.
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "emotion": (
        "Which emotion does the person show? Answer with one word from: {labels}.",
        "Name the person's emotion using one of these words: {labels}.",
        "From the face, the voice and the words, pick the emotion ({labels}). Reply with the word only.",
        "What is the person feeling? Choose one of {labels} and answer with that single word.",
    ),
    "reason": (
        "Describe the facial expression and the tone of voice, then say which emotion they point to.",
        "What do the face and the voice show, and what feeling follows from them?",
        "Give a short description of the expression and the voice that reveal the person's emotion.",
    ),
    "reason_v2": (
        "Explain the reasons behind the person's emotional state, using the face, the voice and what is said.",
        "Reason step by step from the facial cues, the vocal cues and the words to the emotion.",
        "Why does the person feel this way? Give the evidence from the expression, the voice and the speech.",
    ),
}


# The released model's instructions: protocol strings, as its weights were trained on them.
RELEASED_EMOTION_INSTRUCTION = ("Please determine which emotion label in the video represents: happy, sad, neutral, "
                                "angry, worried, surprise, fear, contempt, doubt.")
RELEASED_REASON_INSTRUCTIONS = (
    "Please analyze all the clues in the video and reason out the emotional label of the person in the video.",
    "What is the emotional state of the person in the video? Please tell me the reason.",
    "What are the facial expressions and vocal tone used in the video? What is the intended meaning behind his "
    "words? Which emotion does this reflect?",
    "Please integrate information from various modalities to infer the emotional category of the person in the "
    "video.",
    "Could you describe the emotion-related features of the individual in the video? What emotional category do "
    "they fall into?",
)
RELEASED_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "emotion": (RELEASED_EMOTION_INSTRUCTION,),
    "reason": RELEASED_REASON_INSTRUCTIONS,
    "reason_v2": RELEASED_REASON_INSTRUCTIONS,
}
_FILTERED = re.compile(r'[.!"()*#:;~]')


def caption_filter(text: str, max_words: int = 200) -> str:
    """The released model's answer filter: lowercase; each of . ! " ( ) * # : ; ~ replaced by a space;
    runs of whitespace collapsed; stripped; at most ``max_words`` words."""
    words = _FILTERED.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


def check_style(style: str, layout: str = "trained") -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}: choose {' or '.join(PROMPT_STYLES)}")
    if layout not in EVAL_LAYOUTS:
        raise ValueError(f"unknown evaluation layout {layout!r}: choose {' or '.join(EVAL_LAYOUTS)}")
    if layout == "public-eval" and style != "emotion-llama":
        raise ValueError("the public-eval layout reproduces the public evaluation script's text, which exists "
                         "only for the emotion-llama prompt style (this run uses " + repr(style) + ")")


@dataclass(frozen=True)
class Slot:
    """``n`` consecutive feature tokens produced by projector ``name``."""

    name: str
    n: int


@dataclass(frozen=True)
class Layout:
    video: tuple[Slot, ...] = ()      # inside <video>...</video> (global patch tokens)
    feature: tuple[Slot, ...] = ()    # inside <feature>...</feature> (one token per view, CLS last)

    @property
    def n_tokens(self) -> int:
        return sum(s.n for s in self.video + self.feature)

    @property
    def order(self) -> tuple[Slot, ...]:
        return self.video + self.feature


@dataclass
class Encoded:
    ids: list[int]
    feat: list[bool]                  # True at feature slots, in Layout.order
    labels: list[int]                 # IGNORE except on answer tokens and </s>
    answer_start: int                 # index of the first answer token (== len(ids) without answer)
    meta: dict = field(default_factory=dict)


def instruction_for(task: str, key: str, labels: Sequence[str], *, seed: int = 0, epoch: int = 0,
                    fixed: bool = False, style: str = "emollama") -> str:
    """An instruction from the task's pool of the prompt ``style``: drawn by a hash of (seed, epoch,
    key) so that it needs no RNG state (exact resume) and differs across epochs; ``fixed`` takes the
    first (evaluation)."""
    pools = RELEASED_INSTRUCTIONS if style == "emotion-llama" else INSTRUCTIONS
    if task not in pools:
        raise ValueError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    pool = pools[task]
    if fixed:
        i = 0
    else:
        h = hashlib.sha256(f"{seed}:{epoch}:{key}:{task}".encode()).digest()
        i = int.from_bytes(h[:4], "little") % len(pool)
    return pool[i].replace("{labels}", ", ".join(labels))


def prompt_text(subtitle: str | None, task: str, instruction: str) -> str:
    """The text that follows the feature sections (before the answer)."""
    parts = []
    if subtitle and subtitle.strip():
        sub = subtitle.strip()
        parts.append(f"The person in the video says: {sub}{'' if sub[-1] in '.!?' else '.'}")
    parts.append(f"[{TASK_TAGS[task]}] {instruction} [/INST]")
    return " ".join(parts)


def _builder(tokenizer):
    """(ids, feature mask, text(s), slots(group)): ids start with <s>; ``text`` appends the tokens of a
    piece tokenized on its own, ``slots`` appends placeholder ids (the pad id) marked as feature slots."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    ids: list[int] = [tokenizer.bos_token_id]
    feat: list[bool] = [False]

    def text(s: str) -> None:
        got = tokenizer(s, add_special_tokens=False)["input_ids"]
        ids.extend(got)
        feat.extend([False] * len(got))

    def slots(group: Sequence[Slot]) -> None:
        for s in group:
            ids.extend([pad] * s.n)
            feat.extend([True] * s.n)

    return ids, feat, text, slots


def encode(tokenizer, layout: Layout, subtitle: str | None, task: str, instruction: str,
           answer: str | None = None, *, max_len: int | None = None, style: str = "emollama",
           eval_layout: str = "trained") -> Encoded:
    """Token ids of one example; with ``answer`` None, the prompt alone (what inference feeds)."""
    check_style(style, eval_layout)
    if style == "emotion-llama":
        return _encode_released(tokenizer, layout, subtitle, task, instruction, answer, max_len=max_len,
                                public_eval=eval_layout == "public-eval")
    ids, feat, text, slots = _builder(tokenizer)

    head = "[INST]"
    if layout.video:
        text(head + " <video>")
        slots(layout.video)
        head = "</video>"
    if layout.feature:
        text(head + " <feature>")
        slots(layout.feature)
        head = "</feature>"
    tail = f"{head} {prompt_text(subtitle, task, instruction)}"
    if answer is None:
        text(tail)
        return Encoded(ids, feat, [IGNORE] * len(ids), len(ids))
    full = f"{tail} {answer.strip()}"
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    cut = len(tail)
    n_prompt = sum(1 for (_, end) in enc["offset_mapping"] if end <= cut)
    tail_ids = enc["input_ids"]
    labels = [IGNORE] * (len(ids) + n_prompt)
    ids.extend(tail_ids)
    feat.extend([False] * len(tail_ids))
    answer_start = len(labels)
    labels.extend(tail_ids[n_prompt:])
    if max_len is not None and len(ids) + 1 > max_len:
        keep = max(max_len - 1, answer_start + 1)   # never cut into the prompt; keep one answer token
        ids, feat, labels = ids[:keep], feat[:keep], labels[:keep]
    ids.append(tokenizer.eos_token_id)
    feat.append(False)
    labels.append(tokenizer.eos_token_id)
    return Encoded(ids, feat, labels, answer_start)


def _encode_released(tokenizer, layout: Layout, subtitle: str | None, task: str, instruction: str,
                     answer: str | None, *, max_len: int | None, public_eval: bool) -> Encoded:
    """The ``emotion-llama`` style (see the module docstring), piece by piece."""
    ids, feat, text, slots = _builder(tokenizer)

    sentence = (subtitle or "").strip()
    tail = f"The person in video says: {sentence}.  [{TASK_TAGS[task]}] {instruction}  [/INST]"
    text("[INST] <video>")
    slots(layout.video)
    if public_eval:
        slots(layout.feature)
        text("</video> <feature><FeatureHere></feature> " + tail)
    else:
        text("</video> <feature>")
        slots(layout.feature)
        text("</feature> " + tail)
    answer_start = len(ids)
    labels = [IGNORE] * len(ids)
    if answer is None:
        return Encoded(ids, feat, labels, answer_start)
    ans = tokenizer(caption_filter(answer), add_special_tokens=False)["input_ids"]
    if max_len is not None and len(ids) + len(ans) + 1 > max_len:
        ans = ans[:max(max_len - 1 - len(ids), 1)]   # never cut into the prompt; keep one answer token
    ans = ans + [tokenizer.eos_token_id]
    ids.extend(ans)
    feat.extend([False] * len(ans))
    labels.extend(ans)
    return Encoded(ids, feat, labels, answer_start)
