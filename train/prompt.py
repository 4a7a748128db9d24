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

``chat``: any chat LM (Llama-3.x, Qwen2.5, Mistral instruct, ...) with the tokenizer's own chat template
(``tokenizer.apply_chat_template``): a system turn if ``data.system`` is set, a user turn holding the
``emollama`` content without ``[INST]`` / ``[/INST]``, and an assistant turn holding the answer:

    {template: system, user header} <video>{slots}</video> <feature>{slots}</feature> The person in the
    video says: {subtitle}. [{task}] {instruction}{template: end of user turn, assistant header}
    {answer}{template: end-of-turn token}

* The prompt is rendered to text with ``add_generation_prompt=True`` and a mark where each slot goes;
  the text is cut at the marks, each piece tokenized on its own (``add_special_tokens=False``: the
  template writes BOS itself where the family has one), and each mark becomes exactly its slot's
  placeholder ids, so no token merges across a slot boundary.
* The answer part is what the template writes for an assistant turn after the generation prompt,
  through the first special token after the answer (the end-of-turn token: ``<|im_end|>`` for Qwen,
  ``</s>`` for Mistral, ``<|eot_id|>`` for Llama-3); what follows it (a newline) is dropped. Only
  that part carries loss, never the template's headers. Its tokens come from tokenizing the prompt's
  last piece and the answer part together where that leaves the prompt's ids as they are; otherwise
  the answer part is tokenized on its own. Either way the training tokens start with exactly the inference prompt's.
* A template that drops the system prompt once the conversation ends with the assistant (Mistral
  v0.3 writes it before the last user message only) gets the inference prompt plus the assistant turn
  as the template writes it without the system turn.
* Templates that write today's date (Llama-3.2) get a fixed ``date_string`` (``CHAT_DATE``), so the
  prompt is the same on every day.
* A tokenizer without a chat template is refused with a ``ChatTemplateError`` naming the fix.

Evaluation layout ``public-eval`` (``emotion-llama`` only) reproduces the public evaluation script,
which made the published MER2023 number: all feature embeddings (256 patches, local, temporal, audio,
CLS) go where ``<video>`` is, and ``<feature><FeatureHere></feature>`` stays literal text. It makes the
script's tokenizer calls on the script's segments (``get_context_emb``): ``<s>[INST] <video>`` with
``add_special_tokens=True``, the placeholder, then the rest with ``add_special_tokens=False``. So the
ids start with two BOS (the tokenizer's own, then the literal ``<s>``), and whether the ``[`` after
it carries a word boundary is the tokenizer's ``legacy`` setting; no id is written here by hand.

Text is text, in every style and for every tokenizer (``Pieces``):

* subtitles, captions, rationales and the system prompt are user text: a control-token string in
  them (``</s>``, ``<s>``, ``<pad>``, ``<unk>``, ``<|im_end|>``, ``[INST]`` where it is one) is
  tokenized as plain text (``split_special_tokens``), so it never becomes a BOS, EOS, pad or unk id
  and an answer carries exactly one EOS label, its last. The prompt's own tokens stay special: the
  BOS and ``</s>`` written as ids, the chat template's control tokens. Only such strings are cut out
  of the text; any other text keeps the ids the tokenizer gives it.
* the marks that cut a text (slots, control-token strings) use a character found in none of the
  texts, so no text can collide with them.
* a subtitle is cut to ``max_subtitle_tokens`` (``data.max_subtitle_tokens``) whole words, after a
  first cut to ``CHARS_PER_TOKEN`` characters a token (``fit_subtitle``), in training, evaluation and
  inference alike. Answers are never cut; ``TrainData`` rejects an example whose answer does not fit
  ``data.max_len``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Sequence

TASKS = ("emotion", "reason", "reason_v2")
EVAL_LAYOUTS = ("trained", "public-eval")
TASK_TAGS = {"emotion": "emotion", "reason": "reason", "reason_v2": "reason_v2"}
IGNORE = -100
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


# ---- text is text: marks, user text, long subtitles -------------------------------------------------

DEFAULT_SUBTITLE_TOKENS = 256   # data.max_subtitle_tokens: a longer subtitle is cut to this many tokens
CHARS_PER_TOKEN = 16            # ... after a first cut to this many characters per token (bounded tokenizing)
_FIRST_MARK = 0xF0000           # marks: the first code point of Supplementary Private Use Area-A found in no text


def control_tokens(tokenizer) -> set[str]:
    """The tokenizer's special tokens as strings: BOS, EOS, pad, unk, a chat template's control tokens."""
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    out |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    return {t for t in out if t}


def _plain_ids(tokenizer, text: str) -> list[int]:
    """``text`` tokenized as plain text: a control-token string in it is spelled, never its id."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] if text else []


def _last_fitting(candidates: Sequence[int], ok) -> int | None:
    """The last of the ascending ``candidates`` for which ``ok`` holds (binary search: ``ok`` holds on a
    prefix of them), or None."""
    lo, hi, best = 0, len(candidates) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(candidates[mid]):
            best, lo = candidates[mid], mid + 1
        else:
            hi = mid - 1
    return best


def fit_subtitle(tokenizer, subtitle: str | None, max_tokens: int) -> tuple[str | None, bool]:
    """(``subtitle`` stripped and cut to at most ``max_tokens`` tokens, whether it was cut).

    The subtitle is first cut to ``max_tokens * CHARS_PER_TOKEN`` characters, so tokenizing it costs
    bounded time and memory whatever its length; then to the longest run of whole words of at most
    ``max_tokens`` tokens (counted as plain text on its own), or of characters where even the first
    word is longer. Training, evaluation and inference all cut it here, so their prompts match."""
    if not subtitle or not subtitle.strip():
        return subtitle, False
    whole = subtitle.strip()
    limit = max_tokens * CHARS_PER_TOKEN
    cut = len(whole) > limit
    text = whole[:limit]
    if cut:
        if not whole[limit].isspace() and re.search(r"\s", text):
            text = text[:re.search(r"\s+\S*$", text).start()]      # no half word at the end
    if len(text.encode("utf-8")) < max_tokens:   # no tokenizer spells a byte with more than one token
        return text, cut
    fits = lambda n: len(_plain_ids(tokenizer, text[:n])) <= max_tokens   # noqa: E731
    if fits(len(text)):
        return text, cut
    n = _last_fitting([m.end() for m in re.finditer(r"\S+", text)], fits)
    if n is None:
        n = _last_fitting(range(1, len(text) + 1), fits) or 0
    return text[:n].rstrip(), True


class Pieces:
    """How the text of one prompt becomes token ids, with feature slots and user text in it.

    The text is written with *marks*: ``mark`` is a character found in none of the prompt's texts (the
    first free code point of a private-use plane), so nothing a user writes can ever collide with one.
    ``mark i mark`` is where slot ``layout.order[i]`` goes; ``mark = s mark`` holds a control-token string
    ``s`` found in user text (``user``); ``mark mark`` only cuts. ``encode`` splits the text at the marks
    and tokenizes each piece on its own with ``add_special_tokens=False``: so a slot is exactly its
    placeholder ids and nothing merges across it, the prompt's own control tokens (a chat template's)
    stay special, and a control-token string from a subtitle, caption, rationale or system prompt is
    tokenized as plain text (``split_special_tokens=True``). Text without such strings is cut only at
    the slots, so its ids are what the tokenizer gives for it."""

    def __init__(self, tokenizer, layout: Layout, texts: Sequence[str | None]):
        self.tokenizer, self.layout = tokenizer, layout
        used = set().union(*(set(t) for t in texts if t))
        code = _FIRST_MARK
        while chr(code) in used:
            code += 1
        self.mark = chr(code)
        self.cut = self.mark * 2
        controls = sorted(control_tokens(tokenizer), key=len, reverse=True)
        self._controls = re.compile("|".join(map(re.escape, controls))) if controls else None
        self._control_ids = {tokenizer.convert_tokens_to_ids(t) for t in controls}
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id

    def slots(self, start: int = 0, stop: int | None = None) -> list[str]:
        """The marks of slots ``layout.order[start:stop]``."""
        n = len(self.layout.order)
        return [f"{self.mark}{i}{self.mark}" for i in range(n)[start:stop]]

    def group(self, start: int = 0, stop: int | None = None) -> str:
        """The marks of a group of slots, or a cut where the group is empty (the text still breaks there)."""
        return "".join(self.slots(start, stop)) or self.cut

    def user(self, text: str | None) -> str | None:
        """User text with each control-token string in it marked, to be tokenized as plain text."""
        if not text or self._controls is None:
            return text
        return self._controls.sub(lambda m: f"{self.mark}={m.group(0)}{self.mark}", text)

    def _ids(self, text: str, *, plain: bool = False, inside: bool = False, special: bool = False) -> list[int]:
        """``text`` tokenized (``plain``: control-token strings spelled as text); ``inside``: as in the middle
        of a text, after a newline that is then dropped, so that it gets no word boundary of its own."""
        def call(t: str) -> list[int]:
            return self.tokenizer(t, add_special_tokens=special, split_special_tokens=plain)["input_ids"]

        if not text:
            return []
        if inside:
            nl, after = call("\n"), call("\n" + text)
            if after[:len(nl)] == nl:
                return after[len(nl):]
        return call(text)

    def spell(self, text: str) -> list[int]:
        """A control-token string from user text, tokenized as plain text where it stands (inside a text).
        Where the tokenizer's vocabulary spells the control token from plain text too (a BPE that learnt a
        merge for ``</s>``), the string is split in halves until no control id is left."""
        ids = self._ids(text, plain=True, inside=True)
        if len(text) < 2 or not self._control_ids.intersection(ids):
            return ids
        half = len(text) // 2
        return self.spell(text[:half]) + self.spell(text[half:])

    def encode(self, text: str, *, first_special: bool = False, inside: bool = False) -> Tokens:
        """The tokens of ``text``; with ``first_special`` the first piece is tokenized with
        ``add_special_tokens=True`` (the public evaluation script's call); ``inside``: ``text`` goes on a
        text (see ``_ids``), as does the text after a spelled control-token string."""
        out = Tokens([], [], 0)
        spelled = inside                 # the last piece was a spelled control-token string
        for k, piece in enumerate(text.split(self.mark)):
            if k % 2 == 0:
                got, spelled = self._ids(piece, inside=spelled, special=first_special and k == 0), False
                out.n_last = len(got)
            elif piece.startswith("="):
                got, spelled = self.spell(piece[1:]), True
            else:                        # a slot, or a bare cut
                if piece:
                    n = self.layout.order[int(piece)].n
                    out.ids.extend([self.pad] * n)
                    out.feat.extend([True] * n)
                spelled = False
                continue
            out.ids.extend(got)
            out.feat.extend([False] * len(got))
        return out

    def continuation(self, prompt: str, tokens: Tokens, rest: str) -> list[int]:
        """The ids of ``rest`` after ``prompt`` (whose tokens are ``tokens``): tokenized together with the
        prompt's last piece where that leaves the prompt's ids as they are (so the answer gets its ids in
        context), else on its own."""
        parts = prompt.split(self.mark)
        joint = self.encode(parts[-1] + rest, inside=len(parts) > 1 and parts[-2].startswith("=")).ids
        n = tokens.n_last
        if joint[:n] == tokens.ids[len(tokens.ids) - n:]:
            return joint[n:]
        return self.encode(rest).ids


@dataclass
class Tokens:
    """What ``Pieces.encode`` gives: ids, feature mask, and how many of the ids the last text piece gave."""

    ids: list[int]
    feat: list[bool]
    n_last: int


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


def _with_eos(pieces: Pieces, ids: list[int], feat: list[bool], answer_ids: list[int] | None) -> Encoded:
    """The prompt ``ids`` (BOS first), then the answer and ``</s>``, which alone carry the loss."""
    start = len(ids)
    if answer_ids is None:
        return Encoded(ids, feat, [IGNORE] * start, start)
    tail = answer_ids + [pieces.tokenizer.eos_token_id]
    return Encoded(ids + tail, feat + [False] * len(tail), [IGNORE] * start + tail, start)


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
        return _with_eos(pieces, ids, feat, None)
    return _with_eos(pieces, ids, feat, pieces.continuation(text, got, " " + pieces.user(answer.strip())))


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
        return _with_eos(pieces, ids, feat, None)
    return _with_eos(pieces, ids, feat, pieces.encode(pieces.user(caption_filter(answer))).ids)


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
    found = [(turn.find(t, end), t) for t in control_tokens(tokenizer)]
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
    return prompt_style(style).stop_tokens(tokenizer)


def _chat_stop_tokens(tokenizer) -> list[int]:
    out = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    check_chat_template(tokenizer)
    turn, end = assistant_turn(tokenizer, _probe_messages(), "happy")
    ids = tokenizer(turn[end:], add_special_tokens=False)["input_ids"]
    if ids and ids[-1] not in out:
        out.append(ids[-1])
    return out


def _encode_chat(pieces: Pieces, subtitle: str | None, task: str, instruction: str, answer: str | None, *,
                 system: str) -> Encoded:
    """The ``chat`` style (see the module docstring)."""
    tokenizer, marks = pieces.tokenizer, pieces.slots()
    check_chat_template(tokenizer)
    content = chat_user_content(pieces.layout, pieces.user(subtitle), task, instruction, marks)
    messages = ([{"role": "system", "content": pieces.user(system)}] if system else []) + [
        {"role": "user", "content": content}]
    prompt = _render(tokenizer, messages, True)
    for mark in marks:
        if prompt.count(mark) != 1:
            raise ChatTemplateError(f"the chat template of {_name(tokenizer)} does not keep the user message as "
                                    f"written (a slot marker appears {prompt.count(mark)} times): choose "
                                    "data.prompt = \"emollama\"")
    got = pieces.encode(prompt)               # the inference prompt ends here
    answer_start = len(got.ids)
    if answer is None:
        return Encoded(got.ids, got.feat, [IGNORE] * answer_start, answer_start)
    turn, _ = assistant_turn(tokenizer, messages, pieces.user(answer.strip()))
    tail = pieces.continuation(prompt, got, turn)
    return Encoded(got.ids + tail, got.feat + [False] * len(tail), [IGNORE] * answer_start + tail, answer_start)


# ---- the styles: one class each, one registry ---------------------------------------------------------

class PromptStyle:
    """A prompt style (``data.prompt``): how one example's text becomes token ids (``apply``), which
    instruction pools it draws from, the evaluation layouts it has, whether it writes a system prompt, what
    it needs of a tokenizer (``check``) and where generation stops (``stop_tokens``). A new style is one
    class (its own file if it likes) and one line in ``STYLES``; nothing else names styles."""

    name: str = ""
    instructions: dict[str, tuple[str, ...]] = INSTRUCTIONS
    layouts: tuple[str, ...] = ("trained",)
    system_prompt: bool = False
    global_frame: str | None = None     # the global frame its protocol was trained on (None: the extraction's)

    def apply(self, pieces: Pieces, subtitle: str | None, task: str, instruction: str, answer: str | None, *,
              eval_layout: str = "trained", system: str = "") -> Encoded:
        raise NotImplementedError

    def check(self, tokenizer) -> None:
        """Refuse a tokenizer this style cannot use (at set-up, not at the first batch)."""

    def stop_tokens(self, tokenizer) -> list[int]:
        return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


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


class ChatStyle(PromptStyle):
    """Any chat LM through its tokenizer's own chat template, with an optional system turn."""

    name = "chat"
    system_prompt = True

    def apply(self, pieces, subtitle, task, instruction, answer, *, eval_layout="trained", system=""):
        return _encode_chat(pieces, subtitle, task, instruction, answer, system=system)

    def check(self, tokenizer) -> None:
        check_chat_template(tokenizer)

    def stop_tokens(self, tokenizer) -> list[int]:
        return _chat_stop_tokens(tokenizer)


STYLES: dict[str, PromptStyle] = {s.name: s for s in (EmollamaStyle(), EmotionLlamaStyle(), ChatStyle())}
PROMPT_STYLES = tuple(STYLES)
