"""`emollama infer` end to end: a real clip from ../shared/samples/mer2023-examples through the run's
exact feature settings into its eval store, label + probabilities + reasoning; same-named files never collide."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emollama.pipeline.cli import app

runner = CliRunner()
SAMPLES = Path(__file__).resolve().parents[2] / "../shared/samples/mer2023-examples"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from tiny_runs import tiny_run

    run, store, data = tiny_run(tmp_path_factory.mktemp("infer"),
                                features=("local.vit_mae.mean", "temporal.videomae.mean", "audio.hubert.mean"))
    return run, store, data


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="../shared/samples/mer2023-examples is absent")
def test_infer_a_real_clip_and_two_files_with_the_same_name(run_dir, tmp_path):
    from emollama.store import FeatureStore

    run, store, data = run_dir
    real = sorted(SAMPLES.glob("*.mp4"))[0]
    twin = tmp_path / real.name                        # another file with the same name (another real clip)
    shutil.copyfile(sorted(SAMPLES.glob("*.mp4"))[1], twin)
    res = runner.invoke(app, ["infer", "--run", str(run), str(real), str(twin), "--max-new-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("[\n"):])
    labels = json.loads((run / "metrics.json").read_text())["labels"]
    assert len(out) == 2 and out[0]["id"] != out[1]["id"] and all(r["id"].startswith(real.stem) for r in out)
    for r in out:
        assert r["extracted"] and r["label"] in labels and "random tiny fixture" in r["note"]
        assert set(r["probabilities"]) == set(labels) and sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        assert isinstance(r["reasoning"], str)
    # the clips are in the run's eval store under every feature set the run reads, with their sources;
    # the training store was only read
    st = FeatureStore.open(run / "eval-store.zarr", create=False)
    keys = json.loads((run / "feature_sets.json").read_text())
    assert set(keys) <= set(st.sets()) <= set(FeatureStore.open(store).sets())   # the same set keys
    assert all({out[0]["id"], out[1]["id"]} <= st.complete(k) for k in keys)
    assert not {out[0]["id"], out[1]["id"]} & FeatureStore.open(store).clips()
    assert st.records()[out[0]["id"]]["source"] == str(real.resolve())
    # a second call reuses the store's features; the text output's table names the clip, its label and
    # its probability, read from the store
    again = runner.invoke(app, ["infer", "--run", str(run), str(real), "--no-reason"])
    assert again.exit_code == 0, again.output
    [row] = [ln.split() for ln in again.output.splitlines() if ln.startswith(out[0]["id"])]
    assert row[1] == out[0]["label"] and float(row[2]) == pytest.approx(max(out[0]["probabilities"].values()), abs=1e-3)
    assert row[-1] == "store" and "random tiny fixture" in again.output
    j = runner.invoke(app, ["infer", "--run", str(run), str(real), "--no-reason", "--json"])
    assert json.loads(j.output[j.output.index("[\n"):])[0]["extracted"] is False


def test_infer_missing_file_is_a_clear_error(run_dir, tmp_path):
    run, _, _ = run_dir
    res = runner.invoke(app, ["infer", "--run", str(run), str(tmp_path / "nope.mp4")])
    assert res.exit_code == 2 and "no such file" in res.output
