"""A researcher's own videos, end to end (docs/your-videos.md): a folder of real clips with a labels CSV is
extracted, trained on and evaluated with `--dataset folder --labels-csv`; infer takes folders, subtitles
from a CSV and writes a CSV; a clip a store holds is read (found by its content), not extracted again; an
imported released run infers with nothing but --run. Tiny profile: random fixtures, so labels are
checked for being well formed, never for being right."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emollama.pipeline.cli import app

runner = CliRunner()
pytestmark = [pytest.mark.slow, pytest.mark.samples]

CLIPS = ["sample_00000338", "sample_00003462", "sample_00000669", "sample_00001073"]   # the last two in sub/
LABELS = {"sample_00000338": ("sad", "train"), "sample_00003462": ("angry", "train"),
          "sample_00000669": ("angry", "test"), "sample_00001073": ("happy", "test")}


def _json(output: str):
    return json.loads(output[min(i for i in (output.find("{"), output.find("[")) if i >= 0):])


@pytest.fixture(scope="module")
def own(tmp_path_factory, samples_dir):
    """My videos: four real clips (two in a subfolder), a labels CSV with splits, a subtitles CSV; extracted
    (tiny), then trained on with --dataset folder --labels-csv."""
    tmp = tmp_path_factory.mktemp("own")
    vids = tmp / "my_videos"
    (vids / "sub").mkdir(parents=True)
    rel = {}
    for i, name in enumerate(CLIPS):
        r = f"sub/{name}" if i >= 2 else name
        shutil.copyfile(samples_dir / f"{name}.mp4", vids / f"{r}.mp4")
        rel[name] = r
    with open(vids / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "label", "split"])
        for name, (label, split) in LABELS.items():
            w.writerow([rel[name], label, split])
    subs = {row["name"]: row["sentence"] for row in csv.DictReader(open(samples_dir / "transcription_en.csv"))}
    with open(tmp / "subtitles.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "sentence"])
        for name in CLIPS:                   # by file name, and for one clip by its relative path
            w.writerow([rel[name] if name == CLIPS[2] else name, subs[name]])
    store = tmp / "mine.zarr"
    res = runner.invoke(app, ["extract", "--dataset", "folder", "--data", str(vids), "--labels-csv", "labels.csv",
                              "--store", str(store), "--profile", "tiny", "--no-progress"])
    assert res.exit_code == 0, res.output
    run = tmp / "runs" / "mine"
    res = runner.invoke(app, ["train", "--dataset", "folder", "--data", str(vids), "--labels-csv", "labels.csv",
                              "--store", str(store), "--out", str(run), "--profile", "tiny", "--steps", "2", "-b", "1",
                              "-f", "local.vit_mae.mean", "-f", "temporal.videomae.mean", "-f", "audio.hubert.mean",
                              "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    return {"tmp": tmp, "vids": vids, "store": store, "run": run, "rel": rel, "subs": subs}


def test_train_and_eval_a_folder_dataset_with_a_labels_csv(own):
    run = own["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert sorted(metrics["labels"]) == ["angry", "sad"]        # the train split's labels, from the CSV
    cfg = json.loads((run / "config.json").read_text())["data"]
    assert cfg["dataset"] == "folder" and cfg["options"] == {"labels_csv": "labels.csv"}
    # eval with nothing but --run: the dataset, its folder and its labels CSV come from the run's config;
    # the CSV's test split is evaluated
    res = runner.invoke(app, ["eval", "--run", str(run), "--max-new-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    out = _json(res.output)
    assert out["dataset"] == "folder" and out["split"] == "test" and out["n"] == 2
    assert out["feature_profile"] == "tiny" and out["extraction"]["extracted"] == 0
    assert sorted(out["labels"]) == ["angry", "happy", "sad"]   # the run's labels and the clips' own
    report = run / "eval" / "folder"
    assert (report / "report.md").is_file() and json.loads((report / "metrics.json").read_text())["n"] == 2
    # every labelled clip, a quick look at two: their own folders, the full report untouched
    res = runner.invoke(app, ["eval", "--run", str(run), "--split", "all", "--limit", "2", "--no-generate", "--json"])
    assert res.exit_code == 0, res.output
    assert _json(res.output)["n"] == 2 and (run / "eval" / "folder-all-first2" / "metrics.json").is_file()
    assert json.loads((report / "metrics.json").read_text())["n"] == 2
    # the same folder with another scope is refused, --overwrite replaces it
    res = runner.invoke(app, ["eval", "--run", str(run), "--labels", "angry,happy", "--no-generate"])
    assert res.exit_code == 2 and "holds the report of another evaluation" in res.output and "--overwrite" in res.output
    res = runner.invoke(app, ["eval", "--run", str(run), "--labels", "angry,happy", "--no-generate", "--overwrite",
                              "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads((report / "metrics.json").read_text())["labels"] == ["angry", "happy"]
    # a folder without labels: the message says how to give them
    res = runner.invoke(app, ["eval", "--run", str(run), "--dataset", "folder", "--data", str(own["vids"]),
                              "--option", "labels_csv=nope.csv"])
    assert res.exit_code == 2 and "nope.csv" in res.output


def test_infer_a_folder_with_subtitles_from_a_csv_and_a_csv_out(own):
    run, vids = own["run"], own["vids"]
    out_csv = own["tmp"] / "predictions.csv"
    res = runner.invoke(app, ["infer", "--run", str(run), str(vids), "--subtitles", str(own["tmp"] / "subtitles.csv"),
                              "--max-new-tokens", "3", "--out", str(out_csv), "--json"])
    assert res.exit_code == 0, res.output
    rows = _json(res.output)
    ids = sorted(r["id"] for r in rows)
    assert ids == sorted(own["rel"][n].replace("/", "%2F") for n in CLIPS)   # the folder dataset's ids
    labels = json.loads((run / "metrics.json").read_text())["labels"]
    for r in rows:
        name = Path(r["file"]).stem
        assert r["subtitle"] == own["subs"][name]                          # per clip, by name or relative path
        assert r["label"] in labels and sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["extracted"] is False                                     # all four are in the training store
        assert r["face"]["found"] is True and 0 < r["face"]["frames"]
    assert not (run / "eval-store.zarr").exists()                          # nothing was extracted
    table = list(csv.DictReader(open(out_csv)))
    assert sorted(t["id"] for t in table) == ids
    for t in table:
        assert sum(float(t[f"p_{l}"]) for l in labels) == pytest.approx(1.0, abs=1e-5)
        assert t["label"] in labels and t["face_found"] == "1"
    # the subfolder alone: its clips are the store's (found by content, under the ids it holds them by);
    # the terminal table names each clip and where its features came from
    res = runner.invoke(app, ["infer", "--run", str(run), str(vids / "sub"), "--no-reason"])
    assert res.exit_code == 0, res.output
    rows = [ln.split() for ln in res.output.splitlines() if ln.startswith("sub%2F")]
    assert sorted(r[0] for r in rows) == ["sub%2Fsample_00000669", "sub%2Fsample_00001073"]
    assert all(r[-1] == "store" and r[3] == "found" for r in rows)


def test_infer_reads_a_clip_the_store_holds_under_another_name(own, samples_dir):
    """A copy under another name is found by its content (the sha256 extraction recorded): read, not
    extracted; a clip the store lacks is extracted into the run's eval store once."""
    run, tmp = own["run"], own["tmp"]
    other = tmp / "elsewhere"
    other.mkdir()
    copy = other / "renamed.mp4"
    shutil.copyfile(own["vids"] / "sample_00000338.mp4", copy)
    res = runner.invoke(app, ["infer", "--run", str(run), "--store", str(own["store"]), str(copy), "--no-reason",
                              "--json"])
    assert res.exit_code == 0, res.output
    [r] = _json(res.output)
    assert r["id"] == "sample_00000338" and r["extracted"] is False and r["file"] == str(copy)
    assert not (run / "eval-store.zarr").exists()
    # a clip the store does not hold: extracted into the eval store, read from it the next time
    new = other / "another.mp4"
    shutil.copyfile(samples_dir / "sample_00003358.mp4", new)
    res = runner.invoke(app, ["infer", "--run", str(run), str(new), "--no-reason", "--json"])
    assert res.exit_code == 0, res.output
    [r] = _json(res.output)
    assert r["extracted"] is True and r["id"].startswith("another-")
    assert (run / "eval-store.zarr").is_dir()
    res = runner.invoke(app, ["infer", "--run", str(run), str(new), "--no-reason", "--json"])
    assert _json(res.output)[0]["extracted"] is False


def test_the_python_api_loads_quietly_and_returns_typed_results(own, capfd):
    from emollama.pipeline.inference import FaceInfo, Prediction, Predictor

    capfd.readouterr()
    p = Predictor.from_run(own["run"])
    err = capfd.readouterr()
    assert "Loading" not in err.err + err.out and "%|" not in err.err + err.out
    [r] = p.predict([own["vids"] / "sample_00003462.mp4"], subtitle="Do you believe that you push me around?",
                    reason=False)
    assert isinstance(r, Prediction) and isinstance(r.face, FaceInfo)
    assert r.label in p.labels and r.subtitle.startswith("Do you") and r.error is None and r.reasoning is None
    d = r.to_dict()
    assert d["face"]["weak"] is False and set(d["probabilities"]) == set(p.labels)


def test_an_imported_run_infers_with_nothing_but_run(tmp_path, samples_dir):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from test_released import released_state, write_released   # the released key layout at tiny sizes

    from emollama.train.released import RELEASED_LABELS

    ck = write_released(tmp_path / "Emotion_LLaMA.pth", released_state())
    run = tmp_path / "released"
    res = runner.invoke(app, ["import-checkpoint", str(ck), "--out", str(run), "--profile", "tiny"])
    assert res.exit_code == 0, res.output
    clip = samples_dir / "sample_00004671.mp4"
    res = runner.invoke(app, ["infer", "--run", str(run), str(clip), "--max-new-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    [r] = _json(res.output)
    assert r["label"] in RELEASED_LABELS and set(r["probabilities"]) == set(RELEASED_LABELS)
    assert r["extracted"] is True and (run / "eval-store.zarr").is_dir()
    res = runner.invoke(app, ["infer", "--run", str(run), str(clip), "--no-reason", "--json"])
    assert res.exit_code == 0, res.output
    [again] = _json(res.output)
    assert again["extracted"] is False and again["label"] == r["label"]
    assert again["probabilities"] == pytest.approx(r["probabilities"])


def _video_only(src: Path, dst: Path, seconds: float = 1.5) -> Path:
    """The first seconds of a real clip's picture, re-encoded without its sound."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vin = inp.streams.video[0]
        rate = vin.average_rate or 25
        vs = out.add_stream("mpeg4", rate=rate)
        vs.width, vs.height, vs.pix_fmt = vin.codec_context.width, vin.codec_context.height, "yuv420p"
        for frame in inp.decode(vin):
            if frame.time is not None and frame.time > seconds:
                break
            for packet in vs.encode(frame.reformat(format="yuv420p")):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
    return dst


def test_infer_a_clip_without_sound_takes_the_missing_audio_the_message_suggests(own, samples_dir):
    run, tmp = own["run"], own["tmp"]
    mute = _video_only(samples_dir / "sample_00004136.mp4", tmp / "mute.mp4")
    res = runner.invoke(app, ["infer", "--run", str(run), str(mute), "--no-reason", "--json"])
    assert res.exit_code == 1, res.output
    [r] = _json(res.output)
    assert r["label"] is None and "--missing-audio silence" in r["error"]
    res = runner.invoke(app, ["infer", "--run", str(run), str(mute), "--no-reason", "--missing-audio", "silence",
                              "--json"])
    assert res.exit_code == 0, res.output
    [r] = _json(res.output)
    assert r["label"] is not None and r["extracted"] is True


def test_an_imported_set_that_cannot_be_computed_names_both_ways_on(own, samples_dir, tmp_path):
    """A run reading released (imported) local features: a new clip lacks them, and the message names the
    set, the encoder settings that would compute the view, and --feature with a set the store can extract."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from test_released import released_state, write_released

    store = tmp_path / "mixed.zarr"
    shutil.copytree(own["store"], store)
    released = tmp_path / "MER2023" / "mae_340_UTT"
    released.mkdir(parents=True)
    for cid in ("sample_00000338", "sample_00003462"):
        np.save(released / f"{cid}.npy", np.random.default_rng(0).standard_normal((1, 1024)).astype(np.float32))
    res = runner.invoke(app, ["store", "import", str(store), str(released)])
    assert res.exit_code == 0, res.output
    ck = write_released(tmp_path / "Emotion_LLaMA.pth", released_state(dims=(1024, 24, 32)))
    run = tmp_path / "released"
    assert runner.invoke(app, ["import-checkpoint", str(ck), "--out", str(run), "--profile", "tiny"]).exit_code == 0
    new = samples_dir / "sample_00004671.mp4"
    res = runner.invoke(app, ["infer", "--run", str(run), "--store", str(store), str(new), "--no-reason",
                              "--feature", "local=local.mae_340_utt.released", "--json"])
    assert res.exit_code == 1, res.output
    [r] = _json(res.output)
    assert "local.mae_340_utt.released" in r["error"] and "[extract.encoders.local]" in r["error"]
    # the tiny local set is 40-d, so no set of the store can stand in: the message says what to extract
    assert "--feature local=SET" in r["error"]
