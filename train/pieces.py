"""Text to token ids, for every prompt style: slots, layouts, user text, long subtitles, and the
``PromptStyle`` interface each style implements (``train.prompt`` registers the styles).

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

import re
from dataclasses import dataclass, field
from typing import Sequence

TASKS = ("emotion", "reason", "reason_v2")
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

def request_text(subtitle: str | None, task: str, instruction: str) -> str:
    """The subtitle sentence (if any), the task tag and the instruction."""
    parts = []
    if subtitle and subtitle.strip():
        sub = subtitle.strip()
        parts.append(f"The person in the video says: {sub}{'' if sub[-1] in '.!?' else '.'}")
    parts.append(f"[{TASK_TAGS[task]}] {instruction}")
    return " ".join(parts)


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


def with_eos(pieces: Pieces, ids: list[int], feat: list[bool], answer_ids: list[int] | None) -> Encoded:
    """The prompt ``ids`` (BOS first), then the answer and ``</s>``, which alone carry the loss."""
    start = len(ids)
    if answer_ids is None:
        return Encoded(ids, feat, [IGNORE] * start, start)
    tail = answer_ids + [pieces.tokenizer.eos_token_id]
    return Encoded(ids + tail, feat + [False] * len(tail), [IGNORE] * start + tail, start)


# ---- the styles: one class each, one registry ---------------------------------------------------------

class PromptStyle:
    """A prompt style (``data.prompt``): how one example's text becomes token ids (``apply``), which
    instruction pools it draws from, the evaluation layouts it has, whether it writes a system prompt, what
    it needs of a tokenizer (``check``) and where generation stops (``stop_tokens``). A new style is one
    class (its own file if it likes) and one ``register_style`` call (``train.prompt``); nothing else names
    styles."""

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
