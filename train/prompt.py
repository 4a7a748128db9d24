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

``chat``: any chat LM (Llama-3.x, Qwen2.5, Mistral instruct, ...) with the tokenizer's own chat template
(``tokenizer.apply_chat_template``): a system turn if ``data.system`` is set, a user turn holding the
``emollama`` content without ``[INST]`` / ``[/INST]``, and an assistant turn holding the answer:

    {template: system, user header} <video>{slots}</video> <feature>{slots}</feature> The person in the
    video says: {subtitle}. [{task}] {instruction}{template: end of user turn, assistant header}
    {answer}{template: end-of-turn token}

* The prompt is rendered to text with ``add_generation_prompt=True`` and a unique marker where each
  slot goes; the text is cut at the markers, each piece tokenized on its own (``add_special_tokens=
  False``: the template writes BOS itself where the family has one), and each marker becomes exactly
  its slot's placeholder ids, so no token merges across a slot boundary.
* The answer part is what the template writes for an assistant turn after the generation prompt,
  through the first special token after the answer (the end-of-turn token: ``<|im_end|>`` for Qwen,
  ``</s>`` for Mistral, ``<|eot_id|>`` for Llama-3); what follows it (a newline) is dropped. Only
  that part carries loss, never the template's headers. Its tokens come from tokenizing the last
  prompt piece and the answer together (offsets) where that keeps the prompt tokens exactly those of
  the prompt alone; otherwise the answer part is tokenized on its own. Either way the training tokens
  start with exactly the inference prompt's.
* A template that drops the system prompt once the conversation ends with the assistant (Mistral
  v0.3 writes it before the last user message only) gets the inference prompt plus the assistant turn
  as the template writes it without the system turn.
* Templates that write today's date (Llama-3.2) get a fixed ``date_string`` (``CHAT_DATE``), so the
  prompt is the same on every day.
* A tokenizer without a chat template is refused with a ``ChatTemplateError`` naming the fix.

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
PROMPT_STYLES = ("emollama", "emotion-llama", "chat")
EVAL_LAYOUTS = ("trained", "public-eval")
TASK_TAGS = {"emotion": "emotion", "reason": "reason", "reason_v2": "reason_v2"}
IGNORE = -100
SLOT_MARK = "\u27e6emollama-slot-{}\u27e7"   # where a slot goes in the rendered chat text (never tokenized)
# Templates that write today's date (Llama-3.2: strftime_now) get a fixed one, Llama-3.1's default, so that
# a prompt is the same on every day (training, evaluation, inference).
CHAT_DATE = "26 Jul 2024"

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
        raise ValueError(f"unknown prompt style {style!r}: choose {', '.join(PROMPT_STYLES)}")
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


def request_text(subtitle: str | None, task: str, instruction: str) -> str:
    """The subtitle sentence (if any), the task tag and the instruction."""
    parts = []
    if subtitle and subtitle.strip():
        sub = subtitle.strip()
        parts.append(f"The person in the video says: {sub}{'' if sub[-1] in '.!?' else '.'}")
    parts.append(f"[{TASK_TAGS[task]}] {instruction}")
    return " ".join(parts)


def prompt_text(subtitle: str | None, task: str, instruction: str) -> str:
    """The text that follows the feature sections (before the answer), ``emollama`` style."""
    return request_text(subtitle, task, instruction) + " [/INST]"


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
           eval_layout: str = "trained", system: str = "") -> Encoded:
    """Token ids of one example; with ``answer`` None, the prompt alone (what inference feeds).
    ``system``: the system prompt (``chat`` style only)."""
    check_style(style, eval_layout)
    if system and style != "chat":
        raise ValueError(f"a system prompt is written only by the chat prompt style (this is {style!r}): "
                         "set data.prompt = \"chat\" or leave data.system empty")
    if style == "chat":
        return _encode_chat(tokenizer, layout, subtitle, task, instruction, answer, max_len=max_len, system=system)
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


# ---- the chat style: the tokenizer's own chat template ------------------------------------------------

class ChatTemplateError(ValueError):
    """The ``chat`` prompt style cannot use a tokenizer's chat template; the message says how to fix it."""


def _name(tokenizer) -> str:
    return repr(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def check_chat_template(tokenizer) -> None:
    """Raise a ``ChatTemplateError`` unless ``tokenizer`` has a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"data.prompt = \"chat\" renders prompts with the tokenizer's chat template, and the tokenizer of "
            f"{_name(tokenizer)} has none: choose data.prompt = \"emollama\" (or \"emotion-llama\"), or use an "
            "instruct/chat model, or give the model folder a chat template (chat_template.jinja)")


def chat_user_content(layout: Layout, subtitle: str | None, task: str, instruction: str,
                      marks: Sequence[str]) -> str:
    """The user message of the ``chat`` style: the ``emollama`` content without ``[INST]`` / ``[/INST]``,
    with ``marks[i]`` where slot ``layout.order[i]`` goes."""
    it = iter(marks)
    sections = []
    if layout.video:
        sections.append("<video>" + "".join(next(it) for _ in layout.video) + "</video>")
    if layout.feature:
        sections.append("<feature>" + "".join(next(it) for _ in layout.feature) + "</feature>")
    return " ".join(sections + [request_text(subtitle, task, instruction)])


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation,
                                             date_string=CHAT_DATE)
    except (TemplateError, ValueError, TypeError, KeyError) as e:
        roles = "/".join(m["role"] for m in messages)
        raise ChatTemplateError(f"the chat template of {_name(tokenizer)} fails on a {roles} conversation "
                                f"({e.__class__.__name__}: {e}): leave data.system empty if it refuses a system "
                                "turn, or choose data.prompt = \"emollama\"") from None


def _specials(tokenizer) -> set[str]:
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    out |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    return {t for t in out if t}


def assistant_turn(tokenizer, messages: list[dict], answer: str) -> tuple[str, int]:
    """(text, answer end): what the chat template writes after the generation prompt of ``messages`` for an
    assistant turn holding ``answer``, through its end-of-turn token (the first special token after the
    answer); ``answer end`` is where the answer stops within that text."""
    tries = [messages]
    if messages and messages[0]["role"] == "system":
        tries.append(messages[1:])     # templates that drop the system turn unless the user turn is last
    for msgs in tries:
        prompt = _render(tokenizer, msgs, True)
        full = _render(tokenizer, msgs + [{"role": "assistant", "content": answer}], False)
        if full.startswith(prompt):
            break
    else:
        raise ChatTemplateError(f"the chat template of {_name(tokenizer)} does not write a conversation with the "
                                "answer as its generation prompt followed by the assistant turn, so the answer-only "
                                "loss cannot be placed: choose data.prompt = \"emollama\" or fix the template")
    turn = full[len(prompt):]
    at = turn.find(answer)
    if at < 0:
        raise ChatTemplateError(f"the chat template of {_name(tokenizer)} changes the answer text {answer[:40]!r} "
                                "in the assistant turn: choose data.prompt = \"emollama\" or fix the template")
    end = at + len(answer)
    found = [(turn.find(t, end), t) for t in _specials(tokenizer)]
    found = [(i, t) for i, t in found if i >= 0]
    if not found:
        raise ChatTemplateError(f"the chat template of {_name(tokenizer)} closes the assistant turn with no special "
                                f"token ({turn[end:end + 20]!r} follows the answer), so generation could not stop: "
                                "use a template that ends each turn with the tokenizer's end-of-turn/eos token")
    i, t = min(found)
    return turn[:i + len(t)], end


def _probe_messages() -> list[dict]:
    return [{"role": "user", "content": "[emotion] Which emotion?"}]


def stop_token_ids(tokenizer, style: str = "emollama") -> list[int]:
    """The token ids generation stops at: EOS, and for the ``chat`` style the template's end-of-turn token."""
    out = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if style == "chat":
        check_chat_template(tokenizer)
        turn, end = assistant_turn(tokenizer, _probe_messages(), "happy")
        ids = tokenizer(turn[end:], add_special_tokens=False)["input_ids"]
        if ids and ids[-1] not in out:
            out.append(ids[-1])
    return out


def _encode_chat(tokenizer, layout: Layout, subtitle: str | None, task: str, instruction: str,
                 answer: str | None, *, max_len: int | None, system: str) -> Encoded:
    """The ``chat`` style (see the module docstring)."""
    check_chat_template(tokenizer)
    order = layout.order
    marks = [SLOT_MARK.format(i) for i in range(len(order))]
    stem = SLOT_MARK.split("{")[0]
    for what, value in (("subtitle", subtitle), ("instruction", instruction), ("answer", answer),
                        ("system prompt", system)):
        if value and stem in value:
            raise ValueError(f"the {what} contains the slot marker {stem!r}, which the chat style reserves: "
                             "remove it from the text")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": chat_user_content(layout, subtitle, task, instruction, marks)}]
    rest = _render(tokenizer, messages, True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    ids: list[int] = []
    feat: list[bool] = []

    def tokens(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

    for mark, slot in zip(marks, order):
        if rest.count(mark) != 1:
            raise ChatTemplateError(f"the chat template of {_name(tokenizer)} does not keep the user message as "
                                    "written (a slot marker appears "
                                    f"{rest.count(mark)} times): choose data.prompt = \"emollama\"")
        before, rest = rest.split(mark)
        got = tokens(before)
        ids += got + [pad] * slot.n
        feat += [False] * len(got) + [True] * slot.n
    head = tokens(rest)          # the rest of the prompt: the inference prompt ends here
    ids += head
    feat += [False] * len(head)
    answer_start = len(ids)
    if answer is None:
        return Encoded(ids, feat, [IGNORE] * len(ids), answer_start)

    turn, end = assistant_turn(tokenizer, messages, answer.strip())
    joint = tokenizer(rest + turn, add_special_tokens=False, return_offsets_mapping=True)
    cut = len(rest)
    n = sum(1 for (_, e) in joint["offset_mapping"] if e <= cut)
    if joint["input_ids"][:n] == head and all(s >= cut for (s, _) in joint["offset_mapping"][n:]):
        tail = joint["input_ids"][n:]          # the answer tokenized in context, as the prompt ends
        starts = [s - cut for (s, _) in joint["offset_mapping"][n:]]
    else:                                      # a token would merge across the prompt's end
        alone = tokenizer(turn, add_special_tokens=False, return_offsets_mapping=True)
        tail = alone["input_ids"]
        starts = [s for (s, _) in alone["offset_mapping"]]
    n_close = sum(1 for s in starts if s >= end)     # the end-of-turn token(s)
    body, close = tail[:len(tail) - n_close], tail[len(tail) - n_close:]
    if max_len is not None and answer_start + len(tail) > max_len:
        body = body[:max(max_len - n_close - answer_start, 1)]   # never cut into the prompt; keep one token
    tail = body + close
    ids += tail
    feat += [False] * len(tail)
    return Encoded(ids, feat, [IGNORE] * answer_start + tail, answer_start)
