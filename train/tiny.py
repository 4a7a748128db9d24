"""The `tiny` language model: a small random LlamaForCausalLM and a tokenizer built here, in code.

A TEST FIXTURE, not a language model: its weights are random, so any number computed with it
(loss, accuracy) only shows that the training machinery works, never that emotions are recognised.

The tokenizer is a byte-level BPE trained on a fixed corpus written below (the prompt template,
the instruction pools, emotion words and sentences in the style of MERR captions), so it is
deterministic, needs no download, and never produces <unk> (bytes cover everything). Both are saved
with ``save_pretrained`` under ``<home>/models/tiny/llm`` and loaded back with ``from_pretrained``
like any local checkpoint. A build goes into a temporary folder renamed into place (race-safe).
torch, transformers and tokenizers are imported inside the builders: importing this module (for
``TINY_WARNING``, ``is_tiny_fixture``) stays cheap.

Two more fixtures, of other LM families, show the ``chat`` prompt style (the tokenizer's own chat
template) and ``model.llm`` = a local folder (``ensure_tiny_chat_llm(home, family)``, under
``<home>/models/tiny/<family>``), random like the tiny Llama, with the same corpus (plus chat words):

* ``qwen2``: ``Qwen2ForCausalLM`` (grouped-query attention, q/k/v biases), a byte-level BPE with
  ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos) and no BOS, and Qwen2-Instruct's
  ChatML template (its default system prompt included).
* ``mistral``: ``MistralForCausalLM``, a sentencepiece-like BPE (``▁`` word boundaries, byte fallback:
  ``<unk> <s> </s>``, then ``<0x00>``..``<0xFF>``, then control tokens ``[INST] [/INST]``; no pad
  token, as Mistral's) and Mistral-7B-Instruct-v0.3's ``[INST]`` template (the system prompt goes
  before the last user message).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from emollama.store.cache import TINY_MARKER, build_once

from .pieces import INSTRUCTIONS, TASK_TAGS

log = logging.getLogger(__name__)

# printed wherever a tiny run's numbers appear (training summary, eval reports, params)
TINY_WARNING = ("tiny profile: these numbers come from a random tiny fixture (random LM and encoders), "
                "not a result; they say nothing about emotion recognition.")

TINY_SEED = 4321
TINY_RECIPE = 2          # bump when the recipe changes: older folders are rebuilt
TINY_VOCAB = 1024
TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=2048)
TINY_HEAD_STD = 0.25
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")   # ids 0..3

_CORPUS = """
[INST] <video></video> <feature></feature> The person in the video says: hello. [emotion] [/INST] happy</s>
The person in the video says nothing. [reason] [reason_v2] [/INST]
neutral angry happy sad worried surprise fear contempt doubt disgust anger happiness sadness surprised
The emotion of the person is neutral. The emotion is angry. The emotion is happy. The emotion is sad.
The person looks worried. The person shows surprise. There is fear, contempt, doubt and disgust.
We can see raised eyebrows, widened eyes and an open mouth on the person's face while hearing a
loud, bright voice with a falling pitch, which points to angry. The lips are pressed together.
The corners of the mouth are pulled up in a smile and the cheeks are raised, which suggests happy.
The inner corners of the eyebrows are raised and the mouth turns down; a low, slow, falling voice.
A trembling voice and a slightly raised, unsteady pitch; eyebrows drawn together; lips stretched tight.
A sudden upward leap in pitch, wide eyes and a dropped jaw are typical of surprise.
A relaxed face, a steady, even voice at a moderate pitch: nothing stands out, so the label is neutral.
The person's facial action units (AU01, AU02, AU04, AU05, AU06, AU07, AU12, AU15, AU20, AU23, AU25, AU26)
are typical of this feeling. The voice supports this. The words say little about the feeling by
themselves, so the label comes from the face and the voice.
My brother is coming to visit this weekend. I'll call you back when I get home. The train leaves at
seven in the morning. I didn't expect to see you here today! Why would you do that to me? I lost my
job and I don't know what to do. Please tell me it's going to be fine. We won the game last night.
What emotion does the person feel? Which feeling is shown in the clip? Describe the expression and
the voice, then say why. Explain the reasons behind the emotional state, using the face, the tone of
voice and what is said. Answer with one word from the list. Look at the face, listen to the voice.
0 1 2 3 4 5 6 7 8 9 10 100 1000 a b c d e f g h i j k l m n o p q r s t u v w x y z
A B C D E F G H I J K L M N O P Q R S T U V W X Y Z . , ; : ! ? ' " ( ) [ ] < > / - _
"""


def _corpus() -> list[str]:
    lines = [ln.strip() for ln in _CORPUS.strip().splitlines() if ln.strip()]
    for task, pool in INSTRUCTIONS.items():
        lines += [f"[{TASK_TAGS[task]}] {text}" for text in pool]
    return lines * 4   # repetition makes frequent words single tokens


def build_tokenizer():
    """A byte-level BPE tokenizer (transformers' fast wrapper), the same bytes on every build."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", padding_side="right", model_max_length=4096)


def build_llm(vocab_size: int):
    """The tiny random Llama, built from a fixed seed without touching the caller's RNG."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                      tie_word_embeddings=False, **TINY_LLM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(cfg)
        # A trained LM's output layer has large rows; a random one at the usual init (std 0.02) caps
        # every logit near 0 (the final RMSNorm fixes |h| = sqrt(hidden)), so no adapter could ever
        # make it confident. Rows of norm ~2 leave logits a useful range (|logit| <= ~16).
        torch.nn.init.normal_(model.lm_head.weight, std=TINY_HEAD_STD)
    return model.eval()


def _ensure(final: Path, recipe: int, build: Callable[[Path], None], what: str, home: Path) -> Path:
    """``final`` built by ``build(tmp)`` unless complete (``store.cache.build_once``, as stage one's tiny encoders)."""
    return build_once(final, {"recipe": recipe, "seed": TINY_SEED, "note": "random weights: a test fixture"},
                      build, what, home)


def ensure_tiny_llm(home: Path) -> Path:
    """The folder of the tiny LM + tokenizer under ``<home>/models/tiny/llm``, built if missing."""
    def build(tmp: Path) -> None:
        tokenizer = build_tokenizer()
        build_llm(len(tokenizer)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _ensure(Path(home) / "models" / "tiny" / "llm", TINY_RECIPE, build, "the tiny language model", Path(home))


# ---- chat fixtures of other families (the `chat` prompt style) ----------------------------------------

CHAT_RECIPE = 1          # bump when a chat fixture's recipe changes
CHAT_FAMILIES = ("qwen2", "mistral")
_CHAT_CORPUS = """
system user assistant You are a helpful assistant. Answer briefly.
You are an expert in reading emotions from faces, voices and words.
"""

# Qwen2-Instruct's template (ChatML), verbatim.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Mistral-7B-Instruct-v0.3's template, verbatim.
MISTRAL_CHAT_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content']|trim + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""


def _chat_corpus() -> list[str]:
    return _corpus() + [ln.strip() for ln in _CHAT_CORPUS.strip().splitlines()] * 4


def build_qwen2_tokenizer():
    """Qwen2-like: byte-level BPE, ChatML special tokens, eos ``<|im_end|>``, pad ``<|endoftext|>``, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_chat_corpus(), trainer=trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  padding_side="right", model_max_length=4096)
    out.chat_template = QWEN2_CHAT_TEMPLATE
    return out


def build_mistral_tokenizer():
    """Mistral-like: a sentencepiece-style BPE (``▁`` word boundaries, byte fallback), ``<s>`` / ``</s>``,
    control tokens ``[INST]`` / ``[/INST]``, no pad token, the v0.3 chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    meta = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = meta
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB - 256 - 2, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(_chat_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    learnt = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    # ids as in Mistral's vocabulary: specials, the 256 byte tokens, then the learnt pieces
    names = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    names += [t for t, _ in learnt if t not in names]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    fast = Tokenizer(models.BPE({t: i for i, t in enumerate(names)}, merges, unk_token="<unk>",
                                byte_fallback=True, fuse_unk=True))
    fast.pre_tokenizer = meta
    fast.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("[INST]", "[/INST]")])
    out = PreTrainedTokenizerFast(tokenizer_object=fast, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  padding_side="right", model_max_length=4096)
    out.chat_template = MISTRAL_CHAT_TEMPLATE
    return out


def build_chat_llm(family: str, tokenizer):
    """The tiny random LM of ``family`` (qwen2 | mistral) for ``tokenizer``, from the fixed seed."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    dims = {**TINY_LLM, "num_key_value_heads": 2}      # grouped-query attention, as both families use
    if family == "qwen2":
        cfg, cls = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=False, **ids, **dims), Qwen2ForCausalLM
    elif family == "mistral":
        cfg = MistralConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, sliding_window=None, **ids, **dims)
        cls = MistralForCausalLM
    else:
        raise ValueError(f"unknown tiny chat family {family!r}: choose {' or '.join(CHAT_FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = cls(cfg)
        torch.nn.init.normal_(model.lm_head.weight, std=TINY_HEAD_STD)   # see build_llm
    return model.eval()


def build_chat_tokenizer(family: str):
    if family == "qwen2":
        return build_qwen2_tokenizer()
    if family == "mistral":
        return build_mistral_tokenizer()
    raise ValueError(f"unknown tiny chat family {family!r}: choose {' or '.join(CHAT_FAMILIES)}")


def ensure_tiny_chat_llm(home: Path, family: str) -> Path:
    """The folder of a tiny random chat LM of ``family`` (qwen2 | mistral) with its tokenizer and chat
    template, under ``<home>/models/tiny/<family>``, built if missing: a local folder for ``model.llm``."""
    if family not in CHAT_FAMILIES:
        raise ValueError(f"unknown tiny chat family {family!r}: choose {' or '.join(CHAT_FAMILIES)}")

    def build(tmp: Path) -> None:
        tokenizer = build_chat_tokenizer(family)
        build_chat_llm(family, tokenizer).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _ensure(Path(home) / "models" / "tiny" / family, CHAT_RECIPE, build, f"the tiny {family} chat model",
                   Path(home))


def is_tiny_fixture(model_cfg) -> bool:
    """True when a run's LM is a random fixture built here: the tiny profile's own LM (no `llm` given),
    or an `llm` folder holding the tiny marker (the chat fixtures, `ensure_tiny_chat_llm`)."""
    llm = getattr(model_cfg, "llm", None)
    if not llm:
        return getattr(model_cfg, "profile", None) == "tiny"
    return "://" not in str(llm) and (Path(str(llm)).expanduser() / TINY_MARKER).is_file()
