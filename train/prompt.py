"""The prompt: one layout for training and inference, feature tokens as embedding slots.

Three prompt styles (``data.prompt``, saved in the run's config):

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
* Only the answer tokens and the closing ``</s>`` carry loss. The answer is tokenized together with
  the prompt where that leaves the prompt's ids as they are (so the training tokens start with exactly
  the inference prompt's), else on its own.

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

``chat``: any chat LM with the tokenizer's own chat template (``train.chat_prompt``).

Evaluation layout ``public-eval`` (``emotion-llama`` only) reproduces the public evaluation script,
which made the published MER2023 number: all feature embeddings (256 patches, local, temporal, audio,
CLS) go where ``<video>`` is, and ``<feature><FeatureHere></feature>`` stays literal text. It makes the
script's tokenizer calls on the script's segments (``get_context_emb``): ``<s>[INST] <video>`` with
``add_special_tokens=True``, the placeholder, then the rest with ``add_special_tokens=False``. So the
ids start with two BOS (the tokenizer's own, then the literal ``<s>``), and whether the ``[`` after
it carries a word boundary is the tokenizer's ``legacy`` setting; no id is written here by hand.

How text becomes ids in every style (slots, user text, long subtitles): ``train.pieces``.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

from .chat_prompt import ChatStyle
from .pieces import (EVAL_LAYOUTS, TASK_TAGS, TASKS, Encoded, Layout, Pieces, PromptStyle, fit_subtitle,
                     request_text, with_eos)

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


def prompt_style(style: str) -> "PromptStyle":
    """The registered ``PromptStyle`` named ``style`` (``STYLES``)."""
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}: choose {', '.join(STYLES)}")
    return STYLES[style]


def check_style(style: str, layout: str = "trained") -> None:
    ps = prompt_style(style)
    if layout not in EVAL_LAYOUTS:
        raise ValueError(f"unknown evaluation layout {layout!r}: choose {' or '.join(EVAL_LAYOUTS)}")
    if layout not in ps.layouts:
        raise ValueError("the public-eval layout reproduces the public evaluation script's text, which exists "
                         "only for the emotion-llama prompt style (this run uses " + repr(style) + ")")


def instructions(task: str, labels: Sequence[str], style: str = "emollama") -> list[str]:
    """The instruction pool of ``task`` in the prompt ``style``, ``{labels}`` filled in."""
    pools = prompt_style(style).instructions
    if task not in pools:
        raise ValueError(f"unknown task {task!r}: choose from {', '.join(TASKS)}")
    return [i.replace("{labels}", ", ".join(labels)) for i in pools[task]]


def instruction_for(task: str, key: str, labels: Sequence[str], *, seed: int = 0, epoch: int = 0,
                    fixed: bool = False, style: str = "emollama") -> str:
    """An instruction from the task's pool of the prompt ``style``: drawn by a hash of (seed, epoch,
    key) so that it needs no RNG state (exact resume) and differs across epochs; ``fixed`` takes the
    first (evaluation)."""
    pool = instructions(task, labels, style)
    if fixed:
        return pool[0]
    h = hashlib.sha256(f"{seed}:{epoch}:{key}:{task}".encode()).digest()
    return pool[int.from_bytes(h[:4], "little") % len(pool)]


def prompt_text(subtitle: str | None, task: str, instruction: str) -> str:
    """The text that follows the feature sections (before the answer), ``emollama`` style."""
    return request_text(subtitle, task, instruction) + " [/INST]"


def encode(tokenizer, layout: Layout, subtitle: str | None, task: str, instruction: str,
           answer: str | None = None, *, style: str = "emollama", eval_layout: str = "trained", system: str = "",
           max_subtitle_tokens: int | None = None) -> Encoded:
    """Token ids of one example; with ``answer`` None, the prompt alone (what inference feeds).
    ``system``: the system prompt (``chat`` style only). ``max_subtitle_tokens``: the subtitle is cut to
    this many tokens (``fit_subtitle``; ``meta["subtitle_cut"]`` says whether it was). The answer is
    never cut: whether the example fits a length budget is the caller's decision (``TrainData``)."""
    check_style(style, eval_layout)
    ps = prompt_style(style)
    if system and not ps.system_prompt:
        raise ValueError(f"a system prompt is written only by the chat prompt style (this is {style!r}): "
                         "set data.prompt = \"chat\" or leave data.system empty")
    cut = False
    if max_subtitle_tokens is not None:
        subtitle, cut = fit_subtitle(tokenizer, subtitle, max_subtitle_tokens)
    pieces = Pieces(tokenizer, layout, (subtitle, instruction, answer, system))
    enc = ps.apply(pieces, subtitle, task, instruction, answer, eval_layout=eval_layout, system=system)
    enc.meta["subtitle_cut"] = cut
    return enc


def stop_token_ids(tokenizer, style: str = "emollama") -> list[int]:
    """The token ids generation stops at: EOS, and for the ``chat`` style the template's end-of-turn token."""
    return prompt_style(style).stop_tokens(tokenizer)


def _encode_ours(pieces: Pieces, subtitle: str | None, task: str, instruction: str, answer: str | None) -> Encoded:
    """The ``emollama`` style (see the module docstring)."""
    layout, nv = pieces.layout, len(pieces.layout.video)
    head, text = "[INST]", ""
    if layout.video:
        text += f"{head} <video>{pieces.group(0, nv)}"
        head = "</video>"
    if layout.feature:
        text += f"{head} <feature>{pieces.group(nv)}"
        head = "</feature>"
    text += f"{head} {prompt_text(pieces.user(subtitle), task, instruction)}"
    got = pieces.encode(text)
    ids, feat = [pieces.tokenizer.bos_token_id] + got.ids, [False] + got.feat
    if answer is None:
        return with_eos(pieces, ids, feat, None)
    return with_eos(pieces, ids, feat, pieces.continuation(text, got, " " + pieces.user(answer.strip())))


def _encode_released(pieces: Pieces, subtitle: str | None, task: str, instruction: str, answer: str | None, *,
                     public_eval: bool) -> Encoded:
    """The ``emotion-llama`` style (see the module docstring), piece by piece; ``public_eval``: the public
    evaluation script's segments and calls."""
    nv = len(pieces.layout.video)
    sentence = pieces.user((subtitle or "").strip())
    tail = f"The person in video says: {sentence}.  [{TASK_TAGS[task]}] {instruction}  [/INST]"
    if public_eval:
        # the script's three segments, tokenized by the same calls: tokenizer(seg, add_special_tokens=i == 0)
        text = f"<s>[INST] <video>{pieces.group()}</video> <feature><FeatureHere></feature> {tail}"
        got = pieces.encode(text, first_special=True)
        ids, feat = got.ids, got.feat
    else:
        text = f"[INST] <video>{pieces.group(0, nv)}</video> <feature>{pieces.group(nv)}</feature> {tail}"
        got = pieces.encode(text)
        ids, feat = [pieces.tokenizer.bos_token_id] + got.ids, [False] + got.feat
    if answer is None:
        return with_eos(pieces, ids, feat, None)
    return with_eos(pieces, ids, feat, pieces.encode(pieces.user(caption_filter(answer))).ids)


# ---- the styles: one class each, one registry ---------------------------------------------------------

class EmollamaStyle(PromptStyle):
    """Our own wording, in the Llama-2 ``[INST]`` frame (the module docstring)."""

    name = "emollama"

    def apply(self, pieces, subtitle, task, instruction, answer, *, eval_layout="trained", system=""):
        return _encode_ours(pieces, subtitle, task, instruction, answer)


class EmotionLlamaStyle(PromptStyle):
    """The released model's training protocol, token for token, and the public evaluation layout."""

    name = "emotion-llama"
    instructions = RELEASED_INSTRUCTIONS
    layouts = ("trained", "public-eval")
    global_frame = "first"

    def apply(self, pieces, subtitle, task, instruction, answer, *, eval_layout="trained", system=""):
        return _encode_released(pieces, subtitle, task, instruction, answer, public_eval=eval_layout == "public-eval")


STYLES: dict[str, PromptStyle] = {}


def register_style(style: PromptStyle) -> PromptStyle:
    """Add ``style`` (an instance) to ``STYLES`` under its ``name``: the one registration of a prompt style."""
    if not style.name or style.name in STYLES:
        raise ValueError(f"a prompt style needs a name of its own (got {style.name!r}; taken: {', '.join(STYLES)})")
    STYLES[style.name] = style
    return style


for _style in (EmollamaStyle(), EmotionLlamaStyle(), ChatStyle()):
    register_style(_style)
PROMPT_STYLES = tuple(STYLES)
