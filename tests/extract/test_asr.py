"""Speech recognition (extract/asr.py) with the tiny random Whisper: one text row per clip, what reaches
its key, its settings checked all at once. The tiny model's text is random tokens: a test fixture, never
a transcript (nothing here looks at what it says, only at where it goes)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from emollama.extract import asr as A
from emollama.extract.encoders import EncoderEntry, ModelSource
from emollama.extract.registry import ENCODERS
from emollama.extract.settings import settings_fields
from emollama.extract.step import ExtractSettings, build_specs
from emollama.store import text as T


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("asr-home")


@pytest.fixture(scope="module")
def tiny(home):
    return A.ensure_tiny_whisper(home)


def _load(tiny, home, **options):
    entry = EncoderEntry("asr", "whisper", ModelSource(str(tiny)), A.WhisperOptions(max_new_tokens=6, **options))
    return entry.load(device="cpu", offline=True, home=home)


def _wave(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def test_the_tiny_whisper_is_a_real_whisper_checkpoint(tiny):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(tiny, local_files_only=True)
    proc = WhisperProcessor.from_pretrained(tiny, local_files_only=True)
    gen = model.generation_config
    for token in ("<|startoftranscript|>", "<|en|>", "<|zh|>", "<|translate|>", "<|transcribe|>",
                  "<|notimestamps|>", "<|endoftext|>"):
        assert token in proc.tokenizer.get_vocab(), token
    assert gen.lang_to_id["<|zh|>"] == proc.tokenizer.convert_tokens_to_ids("<|zh|>")
    assert set(gen.task_to_id) == {"translate", "transcribe"}
    feats = proc.feature_extractor(_wave(1.0), sampling_rate=16000, return_tensors="pt").input_features
    out = model.generate(feats, task="transcribe", language="en", max_new_tokens=4)   # as on a real checkpoint
    assert out.shape[0] == 1
    assert A.ensure_tiny_whisper(tiny.parents[2]) == tiny           # built once, then found


def test_one_text_row_per_clip_with_its_language_and_task(tiny, home):
    enc = _load(tiny, home)
    assert enc.outputs["text"].pooling == T.POOLING and enc.outputs["text"].shape == (None,)
    rows = enc.encode([_wave(2.0), np.zeros(16000, np.float32), _wave(31.0, seed=1)])
    objs = [T.decode_row(r["text"]) for r in rows]
    assert all(r["text"].dtype == np.uint8 and r["text"].ndim == 1 for r in rows)
    speech, silence, long = objs
    assert speech["task"] == "translate" and speech["language"] in A.whisper_languages()
    assert speech["detected"] == speech["language"] and 0 <= speech["no_speech_prob"] <= 1
    assert isinstance(speech["text"], str) and speech["text"]        # random words: a fixture's text
    assert silence == {"task": "translate", "text": "", "language": None, "detected": None, "no_speech_prob": None}
    assert long["text"]                                              # two 30 s windows, joined
    # one clip at a time: a clip's text does not depend on its batch mates
    assert T.decode_row(enc.encode([_wave(2.0)])[0]["text"]) == speech
    forced = T.decode_row(_load(tiny, home, task="transcribe", language="fr").encode([_wave(2.0)])[0]["text"])
    assert forced["language"] == "fr" and forced["detected"] == speech["detected"] and forced["task"] == "transcribe"


def test_the_task_the_language_and_the_weights_change_the_text_sets_key(tiny, home, tmp_path):
    settings = ExtractSettings(encoders=None)

    def spec(**options):
        [(name, s)] = build_specs({"asr": _load(tiny, home, **options)}, settings).items()
        assert name == "asr.whisper.text" and T.is_text(s) and s.dtype == "uint8"
        return s

    translate, transcribe, french = spec(task="translate"), spec(task="transcribe"), spec(language="fr")
    assert translate.params["task"] == "translate" and transcribe.params["task"] == "transcribe"
    assert translate.params["language"] == "detected" and french.params["language"] == "fr"
    assert translate.encoder == "whisper" and translate.weights.startswith("sha256:")
    assert len({translate.key, transcribe.key, french.key}) == 3
    assert spec(task="translate").key == translate.key                # the same settings: the same set
    # another checkpoint (here: the same files plus one more) is another set
    import shutil

    other = tmp_path / "whisper-copy"
    shutil.copytree(tiny, other)
    (other / "README.md").write_text("another checkpoint\n")
    entry = EncoderEntry("asr", "whisper", ModelSource(str(other)), A.WhisperOptions(max_new_tokens=6))
    moved = build_specs({"asr": entry.load(device="cpu", offline=True, home=home)}, settings)["asr.whisper.text"]
    assert moved.key != translate.key and moved.weights != translate.weights


def test_every_asr_setting_declares_its_kind_and_every_option_is_a_value():
    assert ENCODERS["whisper"] is A.WhisperAsr
    for f in settings_fields(A.AsrSettings):
        assert f.metadata["emollama"]["kind"] in ("value", "policy")
    assert {f.name for f in settings_fields(A.WhisperOptions)} == {"task", "language", "max_new_tokens"}
    s = A.AsrSettings(enabled=True, task="transcribe", language="zh")
    assert s.options() == A.WhisperOptions(task="transcribe", language="zh")
    assert s.source("paper") == ModelSource(A.PAPER_ASR)
    assert dataclasses.replace(s, model="/some/folder", revision=None).source("paper").model == "/some/folder"


def test_asr_settings_are_checked_with_every_other_problem_at_once(tmp_path):
    from emollama.pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(None, {"dataset": {"kind": "merr", "root": str(tmp_path)},
                           "extract": {"store": str(tmp_path / "s"), "asr": {"enabled": True, "task": "summarize",
                                                                            "language": "English",
                                                                            "max_new_tokens": 0}}})
    problems = e.value.problems
    assert any("extract.asr.task = 'summarize'" in p for p in problems)
    assert any("extract.asr.language = 'English'" in p and "'en'" in p for p in problems)
    assert any("extract.asr.max_new_tokens" in p for p in problems)
    # the command line's flags land in [extract.asr], merged with a config file's table
    cfg = load_config(None, {"dataset": {"kind": "merr", "root": str(tmp_path)},
                             "extract": {"store": "s", "asr": {"model": "org/whisper"}, "asr_enabled": True,
                                         "asr_task": "transcribe"}})
    assert cfg.extract.asr == A.AsrSettings(enabled=True, model="org/whisper", task="transcribe")
