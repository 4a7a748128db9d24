"""Subtitles from speech: Whisper (through transformers) as an encoder whose output is text.

    emollama extract --asr                      # [extract.asr] enabled = true
    [extract.asr]
    enabled = true
    model = "openai/whisper-large-v3"            # a hub id (+ revision) or a local folder; unset: the profile's
    task = "translate"                           # translate (English text) | transcribe (the spoken language)
    language = "zh"                              # force the spoken language; unset: detected per clip

One class, `WhisperAsr` (registered as `whisper`), takes the 16 kHz mono waveform the extraction step
prepares for every clip (`registry.WAVEFORM`, the audio view's input) and writes one text set,
`asr.whisper.text`: per clip the UTF-8 JSON object `{"text", "language", "detected", "task",
"no_speech_prob"}` (`store.text`: a variable-length uint8 set whose spec says it is text). So the
transcript is keyed, committed, skipped on reruns and extracted for new clips (eval, infer) exactly as
the feature sets are. `pipeline.extraction.encoders_config` adds the entry (named `asr`, `ASR_VIEW`)
when `[extract.asr] enabled`; nothing else names it.

- The key holds the weights identity (hub id@commit, or the folder's sha256: a different checkpoint or
  revision is a different set), the task, the forced language (or "detected") and the decoding settings
  (`WhisperOptions`, all `value` fields): translate and transcribe never share a set.
- Decoding is greedy, one clip at a time (a clip's text never depends on its batch mates), in
  consecutive windows of equal length, at most 30 s (Whisper's context), joined with spaces; the language is detected once, on
  the first window, from the decoder's first step (as `WhisperForConditionalGeneration.detect_language`),
  where the no-speech probability is read too. A clip without sound (all-zero samples: `missing_audio =
  "silence"`) gets an empty text and no language, without running the model.
- Profiles: `paper` uses `PAPER_ASR` (openai/whisper-large-v3); `tiny` a random tiny Whisper built here
  (`ensure_tiny_whisper`: a byte-level BPE tokenizer with Whisper's special tokens, a feature extractor and
  a generation config with `lang_to_id` / `task_to_id`, so `generate(task=..., language=...)` runs as on a
  real checkpoint). The tiny model's text is random tokens: a test fixture, never a transcript.

Which text a prompt then uses (the dataset's subtitle, the ASR text, or the first where the other is
missing) is stage two's choice (`train.subtitles`), not this module's.

Torch and transformers are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from emollama.extract.models import RECIPES, Recipe, ensure_tiny
from emollama.extract.registry import WAVEFORM, Encoder, register_encoder
from emollama.extract.settings import policy, value
from emollama.extract.sources import ModelSource
from emollama.store import text as text_rows

log = logging.getLogger(__name__)

PAPER_ASR = "openai/whisper-large-v3"
ASR_VIEW = "asr"              # the entry's name: its set is asr.whisper.text
TASKS = ("translate", "transcribe")
SAMPLE_RATE = 16000
WINDOW_S = 30                 # Whisper's context: longer clips are decoded window by window
NO_SPEECH_TOKENS = ("<|nospeech|>", "<|nocaptions|>")   # large-v3, earlier checkpoints


@functools.lru_cache(maxsize=1)
def whisper_languages() -> dict[str, str]:
    """Whisper's language codes -> names (transformers' table, read once)."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return dict(LANGUAGES)


@dataclass(frozen=True)
class WhisperOptions:
    """The options of `encoder = "whisper"` besides its weights: all of them change the text."""

    task: str = value("translate", spec="encoder", choices=TASKS)   # translate (English text) | transcribe (the spoken language)
    language: str | None = value(None, spec="encoder")   # the spoken language, forced (a Whisper code: en, zh, ...); unset: detected per clip
    max_new_tokens: int = value(128, spec="encoder", min=1, max=440)   # tokens decoded per 30 s window

    def extra_problems(self, where: str) -> list[str]:
        if self.language is None:
            return []
        codes = whisper_languages()
        if self.language not in codes:
            by_name = {v: k for k, v in codes.items()}
            hint = (f"use its code {by_name[self.language.lower()]!r}" if self.language.lower() in by_name else
                    f"use a Whisper language code ({', '.join(list(codes)[:8])}, ...)")
            return [f"{where}.language = {self.language!r}: not a Whisper language code; {hint}, or leave it unset "
                    "to detect the language of each clip"]
        return []


@dataclass(frozen=True, kw_only=True)
class AsrSettings(WhisperOptions):
    """[extract.asr]: subtitles from speech (`emollama extract --asr`), one text set per clip."""

    enabled: bool = policy(False)               # write the ASR text set (--asr)
    model: str = value("", spec="encoder")      # a Whisper hub id or local folder; empty: the profile's (paper: openai/whisper-large-v3; tiny: a random fixture)
    revision: str | None = value(None, spec="encoder")   # a hub revision of the model (commit, tag or branch)

    def options(self) -> WhisperOptions:
        """The encoder's options (task, language, decoding)."""
        return WhisperOptions(**{f.name: getattr(self, f.name) for f in fields(WhisperOptions)})

    def source(self, profile: str, home: Path | None = None) -> ModelSource:
        """The model: `model`, else the profile's (the tiny one is built here on first use)."""
        model = self.model or (PAPER_ASR if profile == "paper" else str(ensure_tiny_whisper(home)))
        return ModelSource(model, self.revision)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' generation notes (max_length vs max_new_tokens, ...) off while decoding."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(level)


@register_encoder
class WhisperAsr(Encoder):
    """A Whisper checkpoint that turns each clip's waveform into one text row (see the module docstring)."""

    name = "whisper"
    input = WAVEFORM
    pooling = {"text": text_rows.POOLING}
    Options = WhisperOptions
    table = "extract.asr"          # where its weights are set (messages about a missing model name it)
    role = "speech recognition (whisper, --asr)"

    def __init__(self, model, processor, options: WhisperOptions | None, *, weights: str, device: str = "auto",
                 batch_size: int = 32):
        super().__init__(model, weights=weights, device=device, batch_size=batch_size)
        self.options = options or WhisperOptions()
        self.processor, self.tokenizer = processor, processor.tokenizer
        sr = int(getattr(processor.feature_extractor, "sampling_rate", SAMPLE_RATE) or SAMPLE_RATE)
        if sr != SAMPLE_RATE:
            raise ValueError(f"the Whisper feature extractor expects {sr} Hz audio; this project feeds 16 kHz")
        gen = copy.deepcopy(model.generation_config)
        if not getattr(gen, "lang_to_id", None) or not getattr(gen, "task_to_id", None):
            raise ValueError("this Whisper checkpoint's generation_config.json has no lang_to_id / task_to_id (an "
                             "English-only model, or an old config): use a multilingual Whisper such as "
                             f"{PAPER_ASR}, whose generation config names its language and task tokens")
        if self.options.task not in gen.task_to_id:
            raise ValueError(f"task {self.options.task!r} is not in this checkpoint's task_to_id "
                             f"({', '.join(gen.task_to_id)})")
        if self.options.language is not None and f"<|{self.options.language}|>" not in gen.lang_to_id:
            raise ValueError(f"language {self.options.language!r} is not among this checkpoint's languages")
        gen.max_length, gen.num_beams, gen.do_sample = None, 1, False
        self.generation = gen
        self.languages = {tid: tok.strip("<|>") for tok, tid in gen.lang_to_id.items()}
        vocab = self.tokenizer.get_vocab()
        self.no_speech = next((vocab[t] for t in NO_SPEECH_TOKENS if t in vocab), None)
        self.layer = "generate"
        self.declare_outputs({"text": (None,)})
        self.params = {
            "model_type": getattr(model.config, "model_type", None), "architecture": type(model).__name__,
            "processor": type(processor).__name__, "task": self.options.task,
            "language": self.options.language or "detected", "max_new_tokens": self.options.max_new_tokens,
            "decoding": f"greedy, one clip at a time, equal windows of at most {WINDOW_S} s; language from the "
                        "first window",
            "content": text_rows.CONTENT,
            "fields": ["text", "language", "detected", "task", "no_speech_prob"],
        }

    @classmethod
    def from_pretrained(cls, folder, name, kwargs, options, *, identity, device, batch_size, source):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        model = WhisperForConditionalGeneration.from_pretrained(name, **kwargs)
        processor = WhisperProcessor.from_pretrained(name, **kwargs)
        return cls(model, processor, options, weights=identity, device=device, batch_size=batch_size)

    # --- decoding -------------------------------------------------------------------------------

    def _features(self, wave: np.ndarray):
        feats = self.processor.feature_extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        return feats.to(self.device, self.dtype)

    def _detect(self, feats) -> tuple[str, float | None]:
        """The language of the audio (the most likely language token after <|startoftranscript|>) and the
        probability of the no-speech token there."""
        import torch

        start = torch.full((feats.shape[0], 1), self.generation.decoder_start_token_id, device=self.device)
        logits = self.model(input_features=feats, decoder_input_ids=start, use_cache=False).logits[0, -1].float()
        ids = list(self.languages)
        lang = self.languages[ids[int(logits[ids].argmax())]]
        p = None if self.no_speech is None else float(logits.softmax(-1)[self.no_speech])
        return lang, p

    def transcribe(self, wave: np.ndarray) -> dict[str, Any]:
        """One clip's text object (the row's content)."""
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"expected a mono waveform [samples], got shape {wave.shape}")
        row: dict[str, Any] = {"task": self.options.task, "text": "", "language": None, "detected": None,
                               "no_speech_prob": None}
        if wave.size == 0 or not np.any(wave):
            return row      # no sound: nothing was said
        n = -(-wave.size // (WINDOW_S * SAMPLE_RATE))      # windows of equal length, none over 30 s
        step = -(-wave.size // n)
        texts = []
        with _quiet_transformers():
            for i in range(0, wave.size, step):
                feats = self._features(wave[i:i + step])
                if i == 0:
                    row["detected"], row["no_speech_prob"] = self._detect(feats)
                    row["language"] = self.options.language or row["detected"]
                ids = self.model.generate(feats, generation_config=self.generation, task=self.options.task,
                                          language=row["language"], max_new_tokens=self.options.max_new_tokens)
                texts.append(self.tokenizer.decode(ids[0], skip_special_tokens=True).strip())
        row["text"] = " ".join(t for t in texts if t)
        return row

    def _encode(self, inputs):
        return [{"text": text_rows.encode_row(self.transcribe(w))} for w in inputs]


# --- the tiny fixture --------------------------------------------------------------------------------

TINY_VOCAB = 400
TINY_WHISPER = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80,
                    max_source_positions=1500, max_target_positions=448)
_TINY_CORPUS = """
Oh no, my phone and wallet are all in my bag. Why are you looking at me like this?
I didn't expect to see you here today! We won the game last night. Please tell me it's going to be fine.
My brother is coming to visit this weekend. I lost my job and I don't know what to do.
the a and to of in is it you that he was for on are with as I his they be at one have this from
"""


def _special_tokens() -> list[str]:
    """Whisper's special tokens after <|endoftext|>, in its order (no timestamp tokens)."""
    return (["<|startoftranscript|>"] + [f"<|{code}|>" for code in whisper_languages()]
            + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
               "<|notimestamps|>"])


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_files() -> tuple[str, str]:
    """(vocab JSON, merges JSON) of the tiny byte-level BPE, trained on a fixed corpus (same bytes each time)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [ln.strip() for ln in _TINY_CORPUS.strip().splitlines()] * 4
    tok.train_from_iterator(lines, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    return json.dumps(model["vocab"]), json.dumps(merges)


def tiny_processor():
    """The tiny Whisper's processor: a WhisperFeatureExtractor (80 mel bins) and a tiny WhisperTokenizer."""
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    vocab, merges = _tiny_tokenizer_files()
    tok = WhisperTokenizer(vocab=json.loads(vocab), merges=[tuple(m) for m in json.loads(merges)])
    tok.add_special_tokens({"additional_special_tokens": _special_tokens()})
    fe = WhisperFeatureExtractor(feature_size=TINY_WHISPER["num_mel_bins"], sampling_rate=SAMPLE_RATE)
    return WhisperProcessor(feature_extractor=fe, tokenizer=tok)


def _tiny_suppressed(tok) -> list[int]:
    """What the tiny model never writes: the special tokens (but <|endoftext|>) and the pieces that are not
    printable ASCII (random byte pieces would make invalid UTF-8), so its text is plain ASCII words."""
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    out = [tok.convert_tokens_to_ids(t) for t in _special_tokens()]
    for i in range(len(tok)):
        piece = tok.decode([i])
        if i != eot and i not in out and not (piece.isascii() and piece.isprintable()):
            out.append(i)
    return sorted(out)


def _tiny_whisper(size: str):
    """A random tiny WhisperForConditionalGeneration with a generation config for task / language."""
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    if size != "tiny":
        raise ValueError(f"unknown size {size!r} for whisper: only 'tiny' (a test fixture)")
    tok = tiny_processor().tokenizer
    ids = tok.convert_tokens_to_ids
    eot, sot = ids("<|endoftext|>"), ids("<|startoftranscript|>")
    cfg = WhisperConfig(vocab_size=len(tok), pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
                        decoder_start_token_id=sot, suppress_tokens=None, begin_suppress_tokens=None, init_std=0.2,
                        **TINY_WHISPER)
    model = WhisperForConditionalGeneration(cfg)
    # a fresh config (not one derived from the model config, whose extra keys a reload would drop)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=TINY_WHISPER["max_target_positions"], begin_suppress_tokens=[eot],
        suppress_tokens=_tiny_suppressed(tok),
        is_multilingual=True, no_timestamps_token_id=ids("<|notimestamps|>"),
        lang_to_id={f"<|{c}|>": ids(f"<|{c}|>") for c in whisper_languages()},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")})
    return model


def _save_tiny_whisper(model, folder: Path) -> None:
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)


RECIPES.setdefault("whisper", Recipe(_tiny_whisper, _save_tiny_whisper))


def ensure_tiny_whisper(home: Path | None = None) -> Path:
    """The folder of the tiny random Whisper (model, processor, generation config) under
    `<home>/models/tiny/whisper`, built on first use (`extract.models.ensure_tiny`). A test fixture."""
    return ensure_tiny("whisper", home)
