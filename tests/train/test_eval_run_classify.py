"""Evaluation of a trained run: reloading reproduces training's closed set, greedy generation is the
plain greedy loop, reports are written, DFEW folds and zero-shot label mapping, the CLI."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from emollama.pipeline.cli import app
from train_helpers import FakeJudge
from emollama.corpora import clip_id_for
from emollama.pipeline.evaluation import EvalError, candidates, parse_label_map, target_probabilities

runner = CliRunner()
VIEWS3 = ["local.vit_mae.mean", "temporal.videomae.mean", "audio.hubert.mean"]


def _train(small_store, out, features):
    from emollama.train.config import load_train_config
    from emollama.train.loop import train

    data, store = small_store
    cfg = load_train_config(None, {
        "data": {"root": str(data), "store": str(store), "features": features},
        "model": {"profile": "tiny"}, "lora": {"alpha": 64},
        "optim": {"lr": 3e-3, "min_lr": 1e-5, "warmup_steps": 1, "steps": 3, "batch_size": 4},
        "run": {"out": str(out), "save_every": 1000, "eval_every": 0, "seed": 3}})
    result = train(cfg)
    return data, store, out, result


@pytest.fixture(scope="module")
def tiny_run(small_store, tmp_path_factory):
    """A tiny run trained for a few steps on the small store (12 train clips, 4 test)."""
    return _train(small_store, tmp_path_factory.mktemp("evalrun") / "run", VIEWS3)


@pytest.fixture(scope="module")
def visual_run(small_store, tmp_path_factory):
    """Face views only. DFEW has no sound (silence is encoded), and the tiny HuBERT maps silence to an
    all-zero vector, which the store cannot read back yet (zarr skips writing an all-fill chunk and
    store/_fastread.py expects the shard file; reported to the lead)."""
    return _train(small_store, tmp_path_factory.mktemp("evalrun") / "visual", VIEWS3[:2])


def test_eval_cli_reproduces_training_closed_set_and_writes_the_report(tiny_run):
    data, store, run, result = tiny_run
    res = runner.invoke(app, ["eval", "--run", str(run), "--dataset", "merr", "--data", str(data),
                              "--max-new-tokens", "6"])
    assert res.exit_code == 0, res.output
    assert "random tiny fixture" in res.output and "closed set" in res.output and "generated answer" in res.output
    out = run / "eval" / "merr"
    for name in ("metrics.json", "report.md", "confusion-closed-set.png", "confusion-generated.png",
                 "predictions-closed-set.csv", "predictions-generated.csv"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["tiny"] and "random tiny fixture" in m["note"] and "random tiny fixture" in (out / "report.md").read_text()
    assert m["n"] == result.metrics["n"] and m["labels"] == result.metrics["labels"]
    assert m["extraction"] == {"extracted": 0, "reused": m["n"], "failed": [],       # all from the store
                               "not_in_imported_sets": {}, "eval_store": str(run / "eval-store.zarr")}
    assert not (run / "eval-store.zarr").exists()       # nothing to extract: no eval store made
    # the reloaded run (adapter + projectors + standardization from disk) predicts what training predicted
    preds = {json.loads(l)["id"]: json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()}
    assert {k: v["closed_set"] for k, v in preds.items()} == result.metrics["predictions"]
    assert m["closed_set"]["accuracy"] == pytest.approx(result.metrics["accuracy"])
    for p in preds.values():
        assert sum(p["probabilities"].values()) == pytest.approx(1.0)
        assert p["parsed"] is None or p["parsed"] in m["labels"]
    gen = m["generated"]
    assert gen["unparsed"] == sum(p["parsed"] is None for p in preds.values())
    assert len(gen["unparsed_examples"]) == gen["unparsed"]
    assert sum(map(sum, gen["confusion"])) == m["n"] - gen["unparsed"]     # never silently a class
    # the predictions CSV rescored by `emollama score` gives the same numbers
    again = runner.invoke(app, ["score", "--pred", str(out / "predictions-closed-set.csv"), "--labels",
                                ",".join(m["labels"]), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["weighted_f1"] == pytest.approx(m["closed_set"]["weighted_f1"])


def test_generation_is_the_plain_greedy_loop_and_batching_does_not_change_it(tiny_run):
    from emollama.store import FeatureStore
    from emollama.corpora import load_corpus
    from emollama.train.data import Batch
    from emollama.train.generate import generate
    from emollama.train.run import load_run
    from emollama.pipeline.features import feature_batcher

    data, store, run_dir, _ = tiny_run
    run = load_run(run_dir, device="cpu")
    clips = [c for c in load_corpus("merr", data).clips if c.subtitle][:3]
    clips[1] = type(clips[1])(**{**clips[1].__dict__, "subtitle": None})      # prompts of different lengths
    features, usable, missing = feature_batcher(run, FeatureStore.open(store), clips)
    assert missing == [] and len(usable) == 3
    prompts = run.prompt_encoder()
    one = generate(run.model, prompts, features, usable, "reason", max_new_tokens=5, batch_size=1)
    three = generate(run.model, prompts, features, usable, "reason", max_new_tokens=5, batch_size=3)
    assert one == three
    tok = run.tokenizer
    for clip, text in zip(usable, one):          # greedy by hand: full recompute, no cache, no padding
        b = Batch.build([prompts.prompt(clip, "reason")], features([clip.id]), prompts.pad_id, [clip.id], ["reason"])
        ids = b.input_ids
        new = []
        with torch.no_grad():
            for _ in range(5):
                emb = run.model.embed({"input_ids": ids, "features": b.features, "feat_mask":
                                       torch.cat([b.feat_mask, torch.zeros(1, ids.shape[1] - b.feat_mask.shape[1],
                                                                           dtype=torch.bool)], 1)})
                nxt = int(run.model.llm(inputs_embeds=emb).logits[0, -1].argmax())
                new.append(nxt)
                if nxt == tok.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert tok.decode(new, skip_special_tokens=True).strip() == text


def test_label_map_and_probabilities():
    targets = ["happy", "sad", "fear"]
    lm = parse_label_map(["worried=fear", " Anger = sad "], targets)
    assert lm == {"worried": "fear", "anger": "sad"}
    cands = candidates(targets, lm)
    assert cands == ["happy", "sad", "fear", "worried", "anger"]
    logp = np.log(np.array([[0.1, 0.2, 0.1, 0.5, 0.1]]))
    p = target_probabilities(logp, cands, targets, lm)
    assert p.shape == (1, 3) and p.sum() == pytest.approx(1.0)
    assert p[0].tolist() == pytest.approx([0.1, 0.3, 0.6])
    with pytest.raises(EvalError, match="not a label of the evaluated set"):
        parse_label_map(["worried=doubt"], targets)
    with pytest.raises(EvalError, match="FROM=TO"):
        parse_label_map(["worried"], targets)


def test_clip_ids_from_paths_do_not_collide(tmp_path):
    a, b = tmp_path / "a" / "x.mp4", tmp_path / "b" / "x.mp4"
    assert clip_id_for(a) != clip_id_for(b) and clip_id_for(a).startswith("x-") and clip_id_for(a) == clip_id_for(a)


def _dfew(tmp: Path, data: Path) -> Path:
    """A DFEW-layout corpus from 8 sample clips: 12 JPEG frames each, the same 8 clips in the test list
    of every fold (numbers 1-7; worried clips become fear, 7)."""
    import av

    from emollama.corpora import load_corpus

    codes = {"happy": 1, "sad": 2, "neutral": 3, "angry": 4, "surprise": 5, "worried": 7}
    root = tmp / "dfew"
    clips = load_corpus("merr", data).clips[:8]
    rows = []
    for i, c in enumerate(clips, 1):
        folder = root / "Clip" / "clip_224x224" / f"{i:05d}"
        folder.mkdir(parents=True)
        with av.open(str(c.source)) as f:
            for j, frame in enumerate(f.decode(video=0)):
                if j >= 12:
                    break
                frame.to_image().save(folder / f"{j + 1:05d}.jpg")
        rows.append((i, codes[c.label]))
    for split in ("train", "test"):
        d = root / "EmoLabel_DataSplit" / f"{split}(single-labeled)"
        d.mkdir(parents=True)
        for k in range(1, 6):
            with open(d / f"set_{k}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["video_name", "label"])
                w.writerows(rows if split == "test" else [(99, 1)])   # no such folder: rejected
    return root


def test_dfew_all_folds_zero_shot_with_label_map_extracts_missing_clips(visual_run, tmp_path):
    from emollama.store import FeatureStore

    data, store, run, _ = visual_run
    root = _dfew(tmp_path, data)
    res = runner.invoke(app, ["eval", "--run", str(run), "--dataset", "dfew", "--data", str(root), "--all-folds",
                              "--label-map", "worried=fear", "--no-generate", "--out", str(tmp_path / "ev"),
                              "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{"):])
    assert summary["tiny"] and set(summary["folds"]) == {"1", "2", "3", "4", "5"}
    per = [json.loads((tmp_path / "ev" / f"dfew-fold{k}" / "metrics.json").read_text()) for k in range(1, 6)]
    first = per[0]
    assert first["labels"] == ["happy", "sad", "neutral", "angry", "surprise", "disgust", "fear"]
    assert first["zero_shot"] and first["label_map"] == {"worried": "fear"} and "worried" in first["candidates"]
    assert first["extraction"]["extracted"] == 8, (first["extraction"], first["missing"])
    assert per[1]["extraction"]["extracted"] == 0   # cache reused
    assert all(p["n"] == 8 for p in per)
    mean = summary["mean"]["closed_set"]
    assert mean["uar"] == pytest.approx(np.mean([p["closed_set"]["uar"] for p in per]))
    assert mean["war"] == pytest.approx(np.mean([p["closed_set"]["accuracy"] for p in per]))
    assert (tmp_path / "ev" / "dfew" / "report.md").is_file()
    # the DFEW clips went into the run's eval store with exactly the run's feature-set keys; the
    # training store was only read
    st = FeatureStore.open(run / "eval-store.zarr", create=False)
    keys = json.loads((run / "feature_sets.json").read_text())
    assert set(keys) <= set(st.sets()) <= set(FeatureStore.open(store).sets())   # the same set keys
    assert all({f"{i:05d}" for i in range(1, 9)} <= st.complete(k) for k in keys)
    assert not any({f"{i:05d}" for i in range(1, 9)} & FeatureStore.open(store).complete(k) for k in keys)


def test_eval_errors_are_clear(tiny_run, tmp_path):
    data, store, run, _ = tiny_run
    res = runner.invoke(app, ["eval", "--run", str(tmp_path / "nope"), "--dataset", "merr", "--data", str(data)])
    assert res.exit_code == 2 and "run folder not found" in res.output
    res = runner.invoke(app, ["eval", "--run", str(run), "--dataset", "merr", "--data", str(data), "--fold", "2"])
    assert res.exit_code == 2 and "dfew" in res.output
    res = runner.invoke(app, ["eval", "--run", str(run), "--dataset", "merr", "--data", str(data),
                              "--label-map", "worried=nothing"])
    assert res.exit_code == 2 and "not a label" in res.output


def test_emer_through_the_cli_with_a_loopback_judge_then_cached_then_proxy(tiny_run, tmp_path, monkeypatch):
    from emollama.corpora import load_corpus

    data, store, run, _ = tiny_run
    clips = [c for c in load_corpus("merr", data).split("test") if c.texts.get("reason")][:3]
    csv_path = tmp_path / "emer.csv"          # no videos beside it: the clips' features are in the store
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "chinese", "english"])
        w.writerows([(c.id, "", c.texts["reason"]) for c in clips])
    judge = FakeJudge(["I cannot say.", '{"clue_overlap": 6, "label_overlap": 8}',            # malformed, then ok
                    '{"clue_overlap": 14, "label_overlap": 2}', "Clue overlap: 3; label overlap: 5",   # out of range
                    '{"clue_overlap": 9, "label_overlap": 9}'])
    for var in ("EMOLLAMA_JUDGE_URL", "EMOLLAMA_JUDGE_MODEL", "EMOLLAMA_JUDGE_KEY", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "ev"
    args = ["eval", "--run", str(run), "--dataset", "emer", "--data", str(csv_path), "--reason-tokens", "8",
            "--out", str(out)]
    res = runner.invoke(app, args + ["--judge-url", judge.url, "--judge-model", "j1"])
    assert res.exit_code == 0, res.output
    assert "random tiny fixture" in res.output and "llm-judge:j1" in res.output
    m = json.loads((out / "emer" / "metrics.json").read_text())
    e = m["emer"]
    assert e["method"] == "llm-judge:j1" and e["n"] == 3 and e["invalid"] == [] and e["requests"] == 5
    assert e["clue_overlap"] == pytest.approx(6.0) and e["label_overlap"] == pytest.approx(22 / 3)
    assert len(judge.seen) == 5 and clips[0].texts["reason"] in judge.seen[0][2]["messages"][1]["content"]
    rows = [json.loads(l) for l in (out / "emer" / "emer-rows.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [c.id for c in clips] and all(isinstance(r["prediction"], str) for r in rows)
    # a rerun asks nothing (judgements cached in the report folder), through the environment this time
    monkeypatch.setenv("EMOLLAMA_JUDGE_URL", judge.url)
    monkeypatch.setenv("EMOLLAMA_JUDGE_MODEL", "j1")
    again = runner.invoke(app, args + ["--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output[again.output.index("{"):])["emer"]["requests"] == 0 and len(judge.seen) == 5
    # no judge: the lexical proxy, named as such, never mixed with judge scores
    monkeypatch.delenv("EMOLLAMA_JUDGE_URL")
    proxy = runner.invoke(app, args + ["--out", str(tmp_path / "px")])
    assert proxy.exit_code == 0, proxy.output
    assert "lexical-proxy" in proxy.output and "not the EMER judge metric" in proxy.output
    pm = json.loads((tmp_path / "px" / "emer" / "metrics.json").read_text())
    assert pm["proxy"] and pm["emer"]["method"] == "lexical-proxy" and 1 <= pm["emer"]["clue_overlap"] <= 10
    report = (tmp_path / "px" / "emer" / "report.md").read_text()
    assert "lexical-proxy" in report
    # the report has no (empty) classification table and names only the files it wrote
    assert "| method |" not in report and "predictions-" not in report
    assert "Files: metrics.json, report.md, emer-rows.jsonl." in report
    assert all((tmp_path / "px" / "emer" / f).is_file() for f in ("metrics.json", "report.md", "emer-rows.jsonl"))
