"""`emollama extract --asr` end to end (tiny profile): the text set beside the feature sets, its key, one
entry per clip with its language, reruns that extract nothing, a new task that is a new set (and runs
Whisper alone), a real clip, and the one line naming missing Whisper weights offline. The tiny Whisper's
text is random tokens: a test fixture, never a transcript."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emollama.extract.asr import WhisperOptions, ensure_tiny_whisper, whisper_languages
from emollama.extract.sources import ModelSource, weights_identity
from emollama.pipeline.cli import app
from emollama.store import FeatureStore
from emollama.store import text as T

runner = CliRunner()
TEXT = "asr.whisper.text"


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    from emollama.extract.sample import write_sample

    return write_sample(tmp_path_factory.mktemp("asr-sample") / "data", clips=4, seed=5)


def extract(data, store, *extra, dataset="merr"):
    res = runner.invoke(app, ["extract", "--dataset", dataset, "--data", str(data), "--store", str(store),
                              "--profile", "tiny", "--workers", "0", "--no-progress", "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.output[res.output.index("{"):])


def text_key(store, task):
    [key] = [k for k, s in store.sets().items() if s.name == TEXT and s.params["task"] == task]
    return key


def test_extract_asr_writes_a_text_set_keyed_by_model_task_language_then_reruns_extract_nothing(sample, tmp_path):
    path = tmp_path / "store.zarr"
    first = extract(sample, path, "--asr")
    assert len(first["ok"]) == 4 and first["failed"] == [] and first["keys"][TEXT].startswith(TEXT + "-")
    store = FeatureStore.open(path)
    key = first["keys"][TEXT]
    spec = store.spec(key)
    # self-describing: the set's attributes say it is text, and which model, task and language made it
    attrs = store.set_attrs(key)
    assert T.is_text(spec) and attrs["spec"]["pooling"] == "text" and attrs["spec"]["dtype"] == "uint8"
    assert attrs["spec"]["params"]["content"] == T.CONTENT
    assert spec.encoder == "whisper" and spec.modality == "asr"
    assert spec.weights == weights_identity(ModelSource(str(ensure_tiny_whisper())), offline=True)
    assert spec.params["task"] == "translate" and spec.params["language"] == "detected"
    assert attrs["config"]["extract"]["asr"]["enabled"] is True
    ids = sorted(first["ok"])
    assert store.complete(key) == set(ids)                       # one entry per clip ...
    texts = T.read_texts(store, key, ids)
    for cid in ids:
        row = store.read(cid, [key])[key]
        assert row.dtype.name == "uint8" and T.decode_row(row) == texts[cid]
        assert texts[cid]["language"] in whisper_languages() and texts[cid]["task"] == "translate"
    # ... beside the four views' sets
    assert {s.modality for s in store.sets().values()} == {"audio", "local", "temporal", "global", "asr"}

    again = extract(sample, path, "--asr")
    assert again["ok"] == [] and again["skipped"] == 4 and again["keys"][TEXT] == key
    assert "nothing to do" in again["executor"]
    assert FeatureStore.open(path).verify().ok


def test_a_store_extended_with_asr_runs_whisper_alone_and_another_task_is_another_set(sample, tmp_path):
    path = tmp_path / "store.zarr"
    plain = extract(sample, path)
    assert TEXT not in plain["keys"]
    before = FeatureStore.open(path)
    values = {k: before.read_many(sorted(before.complete(k)), k) for k in before.sets()}

    added = extract(sample, path, "--asr")                      # only the text set is missing
    assert len(added["ok"]) == 4 and added["skipped"] == 0
    assert "asr" in added["seconds"] and not {"faces", "audio", "local", "temporal", "global"} & set(added["seconds"])
    store = FeatureStore.open(path)
    for k, rows in values.items():                               # the feature sets are as they were
        assert all((a == b).all() for a, b in zip(store.read_many(sorted(store.complete(k)), k), rows))
    translate = text_key(store, "translate")
    assert store.complete(translate) == set(added["ok"])
    assert all(r.get("face_found") for r in store.records().values())   # the records keep the faces

    transcribe = extract(sample, path, "--asr-task", "transcribe")   # implies --asr
    assert transcribe["keys"][TEXT] != translate and len(transcribe["ok"]) == 4
    store = FeatureStore.open(path)
    assert text_key(store, "transcribe") == transcribe["keys"][TEXT]
    assert {s.params["task"] for s in T.text_sets(store).values()} == {"translate", "transcribe"}
    rows = T.read_texts(store, transcribe["keys"][TEXT], sorted(transcribe["ok"]))
    assert all(r["task"] == "transcribe" for r in rows.values())

    forced = extract(sample, path, "--asr-task", "transcribe", "--asr-language", "zh")
    store = FeatureStore.open(path)
    assert len(T.text_sets(store)) == 3 and store.spec(forced["keys"][TEXT]).params["language"] == "zh"
    assert {r["language"] for r in T.read_texts(store, forced["keys"][TEXT], forced["ok"]).values()} == {"zh"}


def test_extract_asr_on_a_real_clip(samples_dir, tmp_path):
    clip = sorted(samples_dir.glob("*.mp4"))[0]
    folder = tmp_path / "videos"
    folder.mkdir()
    os.symlink(clip, folder / clip.name)                         # the real clip stays where it is
    out = extract(folder, tmp_path / "store.zarr", "--asr", dataset="folder")
    assert len(out["ok"]) == 1 and out["failed"] == []
    store = FeatureStore.open(tmp_path / "store.zarr")
    [(cid, row)] = T.read_texts(store, out["keys"][TEXT], out["ok"]).items()
    assert cid == clip.stem and row["language"] in whisper_languages() and isinstance(row["text"], str)
    assert row["no_speech_prob"] is not None and store.records()[cid]["face_found"]


def test_missing_whisper_weights_offline_is_one_line_naming_the_model_and_how_to_supply_it(sample, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    store = tmp_path / "store.zarr"
    res = runner.invoke(app, ["extract", "--dataset", "merr", "--data", str(sample), "--store", str(store),
                              "--profile", "tiny", "--asr-model", "openai/whisper-large-v3", "--no-progress"])
    assert res.exit_code == 2, res.output
    [line] = [ln for ln in res.output.splitlines() if "openai/whisper-large-v3" in ln]
    assert "speech recognition" in line and "[extract.asr] model = DIR" in line and "not in the local HF cache" in line
    assert "hf download REPO --local-dir DIR" in res.output
    assert "1 model is missing" in res.output and not store.exists()   # nothing was created


def test_whisper_options_name_only_what_changes_the_text():
    assert WhisperOptions().task == "translate" and WhisperOptions().language is None
