"""The ``chat`` prompt style: any chat LM through its tokenizer's own chat template.

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
"""

from __future__ import annotations

from typing import Sequence

from .pieces import IGNORE, Encoded, Layout, Pieces, PromptStyle, control_tokens, request_text

# Templates that write today's date (Llama-3.2: strftime_now) get a fixed one, Llama-3.1's default, so that
# a prompt is the same on every day (training, evaluation, inference).
CHAT_DATE = "26 Jul 2024"


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
    from jinja2 import TemplateError   # jinja2 comes with transformers' chat templates: imported where they render

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
