"""The `tiny` language model: a small random LlamaForCausalLM and a tokenizer built here, in code.

A TEST FIXTURE, not a language model: its weights are random, so any number computed with it
(loss, accuracy) only shows that the training machinery works, never that emotions are recognised.

The tokenizer is a byte-level BPE trained on a fixed corpus written below (the prompt template,
the instruction pools, emotion words and sentences in the style of MERR captions), so it is
deterministic, needs no download, and never produces <unk> (bytes cover everything). Both are saved
with ``save_pretrained`` under ``<home>/models/tiny/llm`` and loaded back with ``from_pretrained``
like any local checkpoint. A build goes into a temporary folder renamed into place (race-safe).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .prompt import INSTRUCTIONS, TASK_TAGS

log = logging.getLogger(__name__)

TINY_SEED = 4321
TINY_RECIPE = 2          # bump when the recipe changes: older folders are rebuilt
TINY_MARKER = "emollama-tiny.json"
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


def _marker_ok(folder: Path) -> bool:
    try:
        return json.loads((folder / TINY_MARKER).read_text()).get("recipe") == TINY_RECIPE
    except (OSError, ValueError):
        return False


def ensure_tiny_llm(home: Path) -> Path:
    """The folder of the tiny LM + tokenizer under ``<home>/models/tiny/llm``, built if missing."""
    final = Path(home) / "models" / "tiny" / "llm"
    if _marker_ok(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".llm-build-", dir=final.parent))
    try:
        log.info("building the tiny language model (a random test fixture) into %s", final)
        tokenizer = build_tokenizer()
        build_llm(len(tokenizer)).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / TINY_MARKER).write_text(json.dumps({"recipe": TINY_RECIPE, "seed": TINY_SEED,
                                                   "note": "random weights: a test fixture"}) + "\n")
        if final.exists() and not _marker_ok(final):
            old = final.parent / f".llm-old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _marker_ok(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_home() -> Path:
    """The project's cache folder: env EMOLLAMA_HOME, else ~/.cache/emollama (same rule as stage one)."""
    env = os.environ.get("EMOLLAMA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "emollama"
