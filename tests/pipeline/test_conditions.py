"""`emollama eval --conditions`: the robustness report of a run trained on the synthetic sample.

The sample's label shows in the drawn face and in the voice (extract/sample.py), so a run trained on its
face and audio views must lose accuracy when both read zeros. The tiny profile is a random fixture: only
the machinery is tested, and the numbers say nothing about emotion recognition."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emollama.extract.sample import write_sample
from emollama.pipeline.cli import app
from emollama.pipeline.conditions import DEFAULT_CONDITIONS, parse_conditions
from emollama.pipeline.features import EvalError
from emollama.store import FeatureStore

FEATURES = ["local.vit_mae.mean", "temporal.videomae.mean", "audio.hubert.mean"]
DEFAULT_ROWS = ["full", "drop:local", "drop:temporal", "drop:audio", "drop:face", "drop:face+voice",
                "noise:10", "noise:0", "blur:0.05", "no-subtitle"]   # drop:voice = drop:audio here: left out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """48 synthetic clips, tiny profile, a run trained 120 steps on their face and audio views."""
    tmp = tmp_path_factory.mktemp("conditions")
    runner = CliRunner()
    data = write_sample(tmp / "data", clips=48, seed=0)
    store, run = tmp / "store.zarr", tmp / "run"
    res = runner.invoke(app, ["extract", "--dataset", "merr", "--data", str(data), "--store", str(store),
                              "--profile", "tiny", "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    cfg = tmp / "stage1.toml"
    cfg.write_text(f"""[data]
dataset = "merr"
root = "{data}"
store = "{store}"
features = {json.dumps(FEATURES)}
tasks = ["emotion"]
standardize = true
[model]
profile = "tiny"
[lora]
r = 64
alpha = 64
[optim]
lr = 3e-3
min_lr = 1e-5
warmup_steps = 5
steps = 120
batch_size = 8
[run]
out = "{run}"
seed = 42
save_every = 1000
eval_every = 0
""")
    res = runner.invoke(app, ["train", "-c", str(cfg), "--no-progress"])
    assert res.exit_code == 0, res.output
    return run, store, data


def _eval(run, *args):
    res = CliRunner().invoke(app, ["eval", "--run", str(run), "--split", "all", "--no-generate", "--no-progress",
                                   *args])
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.slow
def test_conditions_report_rows_plot_and_dropping_face_and_voice_lowers_accuracy(trained):
    run, store, _ = trained
    out = _eval(run, "--conditions")
    folder = run / "eval" / "merr-all-conditions"
    m = json.loads((folder / "metrics.json").read_text())
    rows = {r["name"]: r for r in m["conditions"]}
    assert [r["name"] for r in m["conditions"]] == DEFAULT_ROWS and not m["skipped"]
    assert m["n"] == 48 and all(r["n"] == 48 for r in rows.values()) and m["tiny"]
    full, blind = rows["full"]["closed_set"]["accuracy"], rows["drop:face+voice"]["closed_set"]["accuracy"]
    assert full >= 0.6, full                      # it learnt what the sample's face and voice carry
    assert blind <= full - 0.25, (full, blind)    # both zeroed: close to chance (1/6)
    assert rows["drop:face+voice"]["drop"] == ["local", "temporal", "audio"]
    # the perturbed conditions read sets of their own for the inputs they change, the run's sets for the rest
    base = rows["full"]["feature_sets"]
    for name in ("noise:10", "noise:0", "blur:0.05"):
        changed = {n for n, k in rows[name]["feature_sets"].items() if k != base[n]}
        assert changed == ({"audio.hubert.mean"} if name.startswith("noise") else
                           {"local.vit_mae.mean", "temporal.videomae.mean"}), name
    assert rows["noise:10"]["feature_sets"]["audio.hubert.mean"] != rows["noise:0"]["feature_sets"]["audio.hubert.mean"]
    cache = FeatureStore.open(run / "eval-store.zarr", create=False)
    key = rows["noise:0"]["feature_sets"]["audio.hubert.mean"]
    assert cache.sets()[key].params["perturb"] == {"audio_snr_db": 0.0} and len(cache.complete(key)) == 48
    assert "perturb" not in FeatureStore.open(store, create=False).sets()[base["audio.hubert.mean"]].params
    # the report: a table, a CSV row per condition, the bar plot, every prediction
    with open(folder / "conditions.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["condition"] for r in table] == DEFAULT_ROWS
    assert float(table[0]["closed_set_accuracy"]) == pytest.approx(full, abs=1e-4)
    assert float(table[5]["delta_accuracy"]) == pytest.approx(blind - full, abs=1e-4)
    assert (folder / "conditions.png").stat().st_size > 20_000
    md = (folder / "report.md").read_text()
    assert "| drop:face+voice | local, temporal, audio zeroed |" in md and "conditions.png" in md
    assert "tiny" in md and "NOTE: tiny profile" in out
    preds = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 48 * len(DEFAULT_ROWS)
    assert "drop:face+voice" in out and "noise:0: extracted 48 clip(s) for audio" in out

    # a rerun extracts nothing and gives the same numbers
    sizes = {k: len(cache.complete(k)) for k in cache.sets()}
    again = _eval(run, "--conditions")
    assert "extracted" not in again
    cache = FeatureStore.open(run / "eval-store.zarr", create=False)
    assert {k: len(cache.complete(k)) for k in cache.sets()} == sizes
    m2 = json.loads((folder / "metrics.json").read_text())
    assert [r["closed_set"] for r in m2["conditions"]] == [r["closed_set"] for r in m["conditions"]]


@pytest.mark.slow
def test_named_conditions_only_and_a_subtitle_condition(trained):
    run, _, _ = trained
    out = _eval(run, "--condition", "full", "--condition", "no-subtitle", "--condition", "drop:audio+local",
                "--out", str(run / "other"))
    m = json.loads((run / "other" / "merr-all-conditions" / "metrics.json").read_text())
    assert [r["name"] for r in m["conditions"]] == ["full", "no-subtitle", "drop:audio+local"]
    assert m["conditions"][1]["subtitle"] is False and m["conditions"][2]["drop"] == ["audio", "local"]
    assert m["scope"]["conditions"] == ["full", "no-subtitle", "drop:audio+local"]
    assert "extracted" not in out


def test_condition_specs_are_checked_all_at_once():
    inputs = {"local": "face_frames", "temporal": "face_clip", "audio": "waveform"}
    conds = parse_conditions([], inputs)
    assert len(DEFAULT_CONDITIONS) == 9 and [c.name for c in conds] == DEFAULT_ROWS
    assert parse_conditions(["noise", "blur", "drop:voice"], inputs)[0].perturb == (("audio_snr_db", 10.0),)
    with pytest.raises(EvalError) as e:
        parse_conditions(["drop:nose", "noise:loud", "blur:2", "smell", "drop:face"], {"audio": "waveform"})
    msg = str(e.value)
    for part in ("drop:nose: 'nose' is not a modality", "noise:loud: 'loud' is not a number", "blur:2: the blur",
                 "smell: expected full | drop", "drop:face: the run reads no face modality"):
        assert part in msg, part


def test_a_bad_condition_is_one_line_with_exit_2(tmp_path):
    from tiny_runs import tiny_run

    run, _, _ = tiny_run(tmp_path, clips=4)
    res = CliRunner().invoke(app, ["eval", "--run", str(run), "--split", "all", "--no-generate", "--no-progress",
                                   "--condition", "drop:tail"])
    assert res.exit_code == 2, res.output
    assert "drop:tail: 'tail' is not a modality of the run (global, local, temporal, audio)" in res.output
    assert not (run / "eval" / "merr-all-conditions").exists()
