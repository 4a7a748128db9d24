"""Subtitles from speech in stage two: the ASR text fills the prompt of a clip without a subtitle, a
dataset's subtitle is kept, in training data, eval and infer alike (asserted on the encoded prompts).
The tiny Whisper's text is random tokens, and the tiny LM is random: test fixtures, never results."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emollama.pipeline.cli import app
from emollama.store import FeatureStore
from emollama.store import text as T
from emollama.train import subtitles as S

runner = CliRunner()
BLANK = ("sample_00000002", "sample_00000005")      # clips whose dataset subtitle is removed


@pytest.fixture(scope="module")
def asr_run(tmp_path_factory):
    """A sample whose two clips have no subtitle, extracted with --asr (short texts), a tiny run on it."""
    from emollama.extract.sample import write_sample

    tmp = tmp_path_factory.mktemp("asr-subtitles")
    data = write_sample(tmp / "data", clips=8, seed=11)
    table = data / "transcription_en_all.csv"
    rows = list(csv.reader(table.open()))
    subs = {r[0]: r[1] for r in rows[1:]}
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([rows[0]] + [[n, "" if n in BLANK else s] for n, s in rows[1:]])
    (tmp / "stage1.toml").write_text("[extract.asr]\nenabled = true\nmax_new_tokens = 6\n")
    store, run = tmp / "store.zarr", tmp / "run"
    res = runner.invoke(app, ["extract", "-c", str(tmp / "stage1.toml"), "--dataset", "merr", "--data", str(data),
                              "--store", str(store), "--profile", "tiny", "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--data", str(data), "--store", str(store), "--out", str(run), "--profile",
                              "tiny", "--steps", "2", "-b", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "from speech" in res.output and S.TINY_ASR_NOTE in res.output
    st = FeatureStore.open(store)
    [key] = T.text_sets(st)
    asr = {c: r["text"] for c, r in T.read_texts(st, key, sorted(st.complete(key))).items()}
    assert all(asr[c] for c in BLANK)
    return {"data": data, "store": store, "run": run, "key": key, "asr": asr,
            "subs": {n: s for n, s in subs.items() if n not in BLANK}}


def _says(prompts, clip, task="emotion") -> str:
    """The encoded inference prompt of ``clip``, decoded."""
    return prompts.tokenizer.decode(prompts.prompt(clip, task).ids)


def _same_ids_as(prompts, clip, subtitle) -> bool:
    """Whether ``clip``'s encoded prompt is, id for id, the one of the same clip with ``subtitle``."""
    from dataclasses import replace

    return prompts.prompt(clip, "emotion").ids == prompts.prompt(replace(clip, subtitle=subtitle), "emotion").ids


def test_choose_keeps_a_dataset_subtitle_and_fills_in_the_asr_text():
    assert S.choose("hello", "asr words") == ("hello", "dataset")
    assert S.choose(None, "asr words") == ("asr words", "asr") == S.choose("  ", "asr words")
    assert S.choose(None, "") == (None, None)
    assert S.choose("hello", "asr words", "asr") == ("asr words", "asr")
    assert S.choose(None, "asr words", "dataset") == (None, None)
    with pytest.raises(ValueError, match="choose one of"):
        S.choose("a", "b", "speech")


def _recipe(asr_run, tmp_path, **data):
    from emollama.train.config import load_train_config
    from emollama.train.loop import Recipe

    cfg = load_train_config(None, {"data": {"root": str(asr_run["data"]), "store": str(asr_run["store"]), **data},
                                   "model": {"profile": "tiny"}, "optim": {"batch_size": 2},
                                   "run": {"out": str(tmp_path / "r")}})
    r = Recipe(cfg)
    r.setup_data()
    return r


def test_training_prompts_take_the_asr_text_where_a_clip_has_no_subtitle(asr_run, tmp_path):
    r = _recipe(asr_run, tmp_path)
    r.setup_model()
    r.setup_batches()
    seen = set()
    for data in (r.train_data, r.eval_data):
        for e in data.examples:
            cid, enc = e.clip.id, data.prompts.example(e.clip, e.task, e.answer)
            text = data.prompts.tokenizer.decode(enc.ids)
            if cid in BLANK:
                assert e.clip.subtitle == asr_run["asr"][cid] and e.clip.meta["subtitle_from"] == "asr"
                assert f"says: {asr_run['asr'][cid]}" in text
            else:
                assert e.clip.subtitle == asr_run["subs"][cid] and e.clip.meta["subtitle_from"] == "dataset"
                assert asr_run["subs"][cid].rstrip(".") in text and asr_run["asr"][cid] not in text
            assert _same_ids_as(data.prompts, e.clip, e.clip.subtitle)
            seen.add(cid)
    assert set(BLANK) <= seen
    assert r.subtitles.counts == {"dataset": 6, "asr": 2, "none": 0} and r.subtitles.asr_set == asr_run["key"]
    # the run records the text set it read
    saved = json.loads((asr_run["run"] / "subtitles.json").read_text())
    assert saved["asr_set"] == asr_run["key"] and saved["counts"] == {"dataset": 6, "asr": 2, "none": 0}


def test_data_subtitles_chooses_dataset_only_or_asr_only(asr_run, tmp_path):
    only = _recipe(asr_run, tmp_path, subtitles="dataset")
    clips = {c.id: c for c in only.corpus.clips}
    assert all(clips[c].subtitle is None for c in BLANK) and only.subtitles.asr_set is None
    asr = _recipe(asr_run, tmp_path, subtitles="asr")
    assert all(c.subtitle == asr_run["asr"][c.id] for c in asr.corpus.clips)
    assert asr.subtitles.counts == {"dataset": 0, "asr": 8, "none": 0}


def test_asr_subtitles_without_a_text_set_or_a_text_set_as_a_feature_are_refused(asr_run, tmp_path):
    from emollama.train.config import TrainSetupError

    plain = tmp_path / "plain.zarr"
    res = runner.invoke(app, ["extract", "--dataset", "merr", "--data", str(asr_run["data"]), "--store", str(plain),
                              "--profile", "tiny", "--no-progress"])
    assert res.exit_code == 0, res.output
    with pytest.raises(TrainSetupError, match="extract --asr"):
        _recipe({**asr_run, "store": plain}, tmp_path, subtitles="asr")
    default = _recipe({**asr_run, "store": plain}, tmp_path)        # dataset-then-asr: the dataset's alone
    assert default.subtitles.counts == {"dataset": 6, "asr": 0, "none": 2}
    with pytest.raises(TrainSetupError, match="text set"):
        _recipe(asr_run, tmp_path, features=["audio.hubert.mean", "asr.whisper.text"])


class Captured:
    """``score_labels`` as eval (``pipeline.scores``) and infer (``train.evaluate``) call it, remembering the
    prompts and clips it scored."""

    def __init__(self, monkeypatch):
        import emollama.pipeline.scores as S_
        import emollama.train.evaluate as E

        self.calls, real = [], E.score_labels

        def spy(model, prompts, batcher, clips, *a, **k):
            self.calls.append((prompts, list(clips)))
            return real(model, prompts, batcher, clips, *a, **k)

        monkeypatch.setattr(E, "score_labels", spy)
        monkeypatch.setattr(S_, "score_labels", spy)


def test_eval_prompts_take_the_asr_text_where_a_clip_has_no_subtitle(asr_run, monkeypatch):
    from emollama.pipeline.evaluation import EvalOptions, evaluate

    spy = Captured(monkeypatch)
    res = evaluate(EvalOptions(run=str(asr_run["run"]), split="all", generate=False, device="cpu"))
    [(prompts, clips)] = spy.calls
    assert {c.id for c in clips} == set(asr_run["asr"])
    for c in clips:
        want = asr_run["asr"][c.id] if c.id in BLANK else asr_run["subs"][c.id]
        assert c.subtitle == want and _same_ids_as(prompts, c, want)
        if c.id in BLANK:
            assert f"says: {want}" in _says(prompts, c)
    assert res["subtitles"]["asr_set"] == asr_run["key"] and res["subtitles"]["counts"]["asr"] == 2
    assert res["subtitles"]["note"] == S.TINY_ASR_NOTE


def test_infer_uses_the_asr_text_and_shows_it(asr_run, monkeypatch, tmp_path):
    from emollama.pipeline.inference import Predictor, write_predictions

    spy = Captured(monkeypatch)
    kept, blank = sorted(asr_run["subs"])[0], BLANK[0]
    videos = [asr_run["data"] / "video" / f"{c}.mp4" for c in (kept, blank)]
    p = Predictor.from_run(asr_run["run"], device="cpu")
    results = p.predict(videos, subtitles={kept: "I said this myself."}, reason=False)
    by_id = {r.id: r for r in results}
    assert by_id[kept].subtitle == "I said this myself." and by_id[kept].subtitle_from == "given"
    assert by_id[blank].subtitle == asr_run["asr"][blank] and by_id[blank].subtitle_from == "asr"
    assert by_id[blank].asr_text == asr_run["asr"][blank] and by_id[blank].asr_language
    assert S.TINY_ASR_NOTE in by_id[blank].warnings and not by_id[kept].error and not by_id[blank].error
    [(prompts, clips)] = spy.calls
    for c in clips:
        assert _same_ids_as(prompts, c, by_id[c.id].subtitle)
    assert f"says: {asr_run['asr'][blank]}" in _says(prompts, next(c for c in clips if c.id == blank))
    out = write_predictions(results, tmp_path / "out.csv", p.labels)
    rows = {r["id"]: r for r in csv.DictReader(out.open())}
    assert rows[blank]["subtitle"] == asr_run["asr"][blank] and rows[blank]["subtitle_from"] == "asr"
    assert rows[blank]["asr_text"] == asr_run["asr"][blank] and rows[kept]["subtitle_from"] == "given"
    # --subtitle-source dataset: no ASR text in the prompt
    [r] = p.predict([videos[1]], reason=False, subtitle_source="dataset")
    assert r.subtitle is None and r.subtitle_from is None


def test_infer_transcribes_a_new_real_clip_into_the_eval_store(asr_run, samples_dir):
    clip = sorted(samples_dir.glob("*.mp4"))[1]
    res = runner.invoke(app, ["infer", "--run", str(asr_run["run"]), str(clip), "--no-reason", "--json"])
    assert res.exit_code == 0, res.output
    [r] = json.loads(res.output[res.output.index("[\n"):])
    assert r["extracted"] and r["subtitle_from"] == "asr" and r["subtitle"] == r["asr_text"] and r["asr_language"]
    st = FeatureStore.open(Path(asr_run["run"]) / "eval-store.zarr", create=False)
    assert r["id"] in st.complete(asr_run["key"])                       # the run's text set, same key
    text = runner.invoke(app, ["infer", "--run", str(asr_run["run"]), str(clip), "--no-reason"])
    assert f"subtitle from speech ({r['asr_language']})" in text.output and "random Whisper" in text.output
