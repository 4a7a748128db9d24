"""Fault suite, nothing of the user's is written over (issue 20, defects 1, 2, 9, 10 and 12):

- ``emollama sample`` into a folder of the user's refuses, and never replaces a file it did not write;
- ``train --out`` on a finished run refuses unless ``--resume`` continues it or ``--overwrite`` replaces it
  whole (old checkpoints, TensorBoard, eval reports); a folder of other files is never deleted;
- two writers of one run folder: the second gets exit 5 naming the first; a stale lock file never blocks;
- ``--resume`` with another batch size, other features, or a ``state.json`` step beyond the schedule is
  one line with exit 2;
- ``eval --limit 3`` after a full eval writes its own folder; an eval of another scope into a report's
  folder is refused;
- ``store export`` onto an existing file, ``store rm --clip nosuch``: exit 2, nothing changed;
- ``score`` of a predictions file that lists a clip twice: exit 2 naming it, not counted twice.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emollama.pipeline.cli import app
from emollama.store import FeatureSpec, FeatureStore

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------------ defect 1: sample


def test_sample_refuses_a_users_folder_and_never_replaces_their_files(tmp_path):
    user = tmp_path / "mine"
    (user / "video").mkdir(parents=True)
    (user / "video" / "interview.mp4").write_bytes(b"my own video")
    (user / "MERR_coarse_grained.txt").write_text("interview 100 happy 0.5\n")
    before = snapshot(user)
    res = runner.invoke(app, ["sample", str(user), "--clips", "2"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    [err] = error_lines(res.output)
    assert "not an emollama sample" in err and "MERR_coarse_grained.txt" in err and "--force" in err
    assert snapshot(user) == before
    # --force writes beside a user's files, never over them: this sample would replace one
    res = runner.invoke(app, ["sample", str(user), "--clips", "2", "--force"])
    assert res.exit_code == 2 and "MERR_coarse_grained.txt" in error_lines(res.output)[0]
    assert snapshot(user) == before

    # beside files it does not replace, --force writes the sample and keeps them
    notes = tmp_path / "beside"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    assert runner.invoke(app, ["sample", str(notes), "--clips", "2"]).exit_code == 2
    res = runner.invoke(app, ["sample", str(notes), "--clips", "2", "--force"])
    assert res.exit_code == 0, res.output
    assert (notes / "notes.txt").read_text() == "keep me" and (notes / "video" / "sample_00000002.mp4").is_file()


def test_sample_rewrites_its_own_earlier_sample_but_not_a_file_edited_since(tmp_path):
    root = tmp_path / "data"
    assert runner.invoke(app, ["sample", str(root), "--clips", "3"]).exit_code == 0
    marker = json.loads((root / ".emollama-sample.json").read_text())
    assert marker["clips"] == 3 and set(marker["files"]) >= {"split.csv", "video/sample_00000003.mp4"}
    # its own earlier sample only: rewritten, and the clip the new one has not is gone
    res = runner.invoke(app, ["sample", str(root), "--clips", "2", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (root / "video").iterdir()) == ["sample_00000001.mp4", "sample_00000002.mp4"]
    assert json.loads((root / ".emollama-sample.json").read_text())["seed"] == 1
    # a sample file the user edited is theirs now
    (root / "split.csv").write_text("name,split\nsample_00000001,test\n")
    before = snapshot(root)
    for extra in ([], ["--force"]):
        res = runner.invoke(app, ["sample", str(root), "--clips", "2", *extra])
        assert res.exit_code == 2 and "split.csv" in error_lines(res.output)[0]
    assert snapshot(root) == before


# ------------------------------------------------------------------------ defect 2: run folders


def train_args(tiny_store, out: Path, *extra: str, steps: int = 2, batch: int = 2, feature: str = "audio.hubert.mean"):
    data, store = tiny_store
    return ["train", "--data", str(data), "--store", str(store), "--out", str(out), "--profile", "tiny",
            "--steps", str(steps), "-b", str(batch), "-f", feature, "--no-progress", *extra]


@pytest.mark.slow
def test_train_twice_into_one_out_refuses_and_overwrite_replaces_the_run_whole(tiny_store, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, train_args(tiny_store, run))
    assert res.exit_code == 0, res.output
    (run / "eval" / "merr").mkdir(parents=True)
    (run / "eval" / "merr" / "report.md").write_text("an earlier eval")
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    # the second run into the same folder: refused, one line, nothing touched
    res = runner.invoke(app, train_args(tiny_store, run, steps=3))
    assert res.exit_code == 2 and "Traceback" not in res.output
    [err] = error_lines(res.output)
    assert "holds a run already" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(run) == before
    # --overwrite: the old run goes whole (its step-2 checkpoint, events, eval report); the user's file stays
    res = runner.invoke(app, train_args(tiny_store, run, "--overwrite", steps=3))
    assert res.exit_code == 0, res.output
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000003"]
    assert len(list((run / "tb").iterdir())) == 1 and not (run / "eval").exists()
    assert json.loads((run / "metrics.json").read_text())["step"] == 3
    assert (run / "notes.txt").read_text() == "mine" and not (run / ".lock").exists()
    # --resume continues it (nothing to do: the run is finished at its schedule)
    res = runner.invoke(app, train_args(tiny_store, run, "--resume", steps=3))
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output and "at step 3" in res.output


def test_an_out_with_other_files_or_that_is_a_file_is_refused_and_never_deleted(tiny_store, tmp_path):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')   # a model folder, not a run
    (mine / "sub" / "weights.bin").write_bytes(b"\0" * 16)
    before = snapshot(mine)
    for extra in ([], ["--overwrite"], ["--resume"]):
        res = runner.invoke(app, train_args(tiny_store, mine, *extra))
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        [err] = error_lines(res.output)
        assert "not an emollama run" in err and "config.json" in err and "sub" in err
        assert snapshot(mine) == before and not (mine / ".lock").exists()
    afile = tmp_path / "out.txt"
    afile.write_text("x")
    res = runner.invoke(app, train_args(tiny_store, afile))
    assert res.exit_code == 2 and "is a file" in error_lines(res.output)[0] and afile.read_text() == "x"
    res = runner.invoke(app, train_args(tiny_store, tmp_path / "new", "--resume", "--overwrite"))
    assert res.exit_code == 2 and "choose one" in error_lines(res.output)[0]


def test_import_checkpoint_into_a_run_refuses_and_overwrite_replaces_it(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from test_released import released_state, write_released

    ck = write_released(tmp_path / "Emotion_LLaMA.pth", released_state())
    out = tmp_path / "released"
    args = ["import-checkpoint", str(ck), "--out", str(out), "--profile", "tiny"]
    assert runner.invoke(app, args).exit_code == 0
    (out / "eval").mkdir()
    before = snapshot(out)
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "holds a run already" in error_lines(res.output)[0]
    assert snapshot(out) == before
    res = runner.invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out / "eval").exists() and (out / "imported.json").is_file() and not (out / ".lock").exists()


HOLD_THE_LOCK = """
import sys, time
from emollama.train.runfolder import lock
with lock(sys.argv[1], "emollama train"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_gets_exit_5_and_a_stale_lock_never_blocks(tiny_store, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for cmd in (train_args(tiny_store, run), train_args(tiny_store, run, "--resume")):
            res = runner.invoke(app, cmd)
            assert res.exit_code == 5, res.output
            [err] = error_lines(res.output)
            assert f"{run} is in use by another emollama process (pid {holder.pid}: emollama train, since " in err
            assert "wait for it to finish, or choose another --out" in err
        assert not (run / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without letting go: its lock file stays, and blocks nobody
    info = json.loads((run / ".lock").read_text())
    assert info["pid"] == holder.pid and info["command"] == "emollama train"
    from emollama.train.runfolder import lock

    with lock(run, "emollama eval"):
        assert json.loads((run / ".lock").read_text())["command"] == "emollama eval"
    assert not (run / ".lock").exists()


@pytest.mark.slow
def test_two_trainings_at_once_the_second_gets_exit_5(tiny_store, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "emollama.pipeline.cli", *train_args(tiny_store, run, steps=4)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and first.poll() is None:
            if (run / ".lock").is_file() and (run / ".lock").read_text():
                break
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        res = runner.invoke(app, train_args(tiny_store, run, steps=4))
        assert res.exit_code == 5, res.output
        assert f"(pid {first.pid}: emollama train, since " in error_lines(res.output)[0]
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, out + err
    # only the first run's weights, whole
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000004"]
    assert json.loads((run / "metrics.json").read_text())["step"] == 4


# ------------------------------------------------------------------------ defects 9 and 10: --resume


@pytest.mark.slow
def test_resume_refuses_other_settings_other_features_and_a_step_beyond_the_schedule(tiny_store, tmp_path):
    run = tmp_path / "run"
    res = runner.invoke(app, train_args(tiny_store, run, "--max-steps", "1", steps=4))
    assert res.exit_code == 0, res.output
    before = snapshot(run)

    res = runner.invoke(app, train_args(tiny_store, run, "--resume", steps=4, batch=4))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    [err] = error_lines(res.output)
    assert "optim.batch_size = 4 (the run has 2)" in err and "--resume" in err
    res = runner.invoke(app, train_args(tiny_store, run, "--resume", steps=4, feature="local.vit_mae.mean"))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "data.features = ['local.vit_mae.mean'] (the run has ['audio.hubert.mean'])" in error_lines(res.output)[0]
    assert snapshot(run) == before

    state = run / "checkpoints" / "step-0000001" / "state.json"
    good = json.loads(state.read_text())
    for bad, says in ((999999, "at step 999999, beyond this run's schedule of 4 steps"), ("x", "is damaged")):
        state.write_text(json.dumps({**good, "step": bad}))
        res = runner.invoke(app, train_args(tiny_store, run, "--resume", steps=4))
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert says in error_lines(res.output)[0]
    state.write_text(json.dumps({**good, "feature_keys": ["audio.other.mean-0000"]}))
    res = runner.invoke(app, train_args(tiny_store, run, "--resume", steps=4))
    assert res.exit_code == 2 and "trained with feature sets ['audio.other.mean-0000']" in error_lines(res.output)[0]
    state.write_text(json.dumps(good))   # runtime settings may change: the device, --max-steps, ...
    res = runner.invoke(app, train_args(tiny_store, run, "--resume", "--device", "cpu", steps=4))
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.output and json.loads((run / "metrics.json").read_text())["step"] == 4


# ------------------------------------------------------------------------ defect 12: store export and rm


SPEC = FeatureSpec("audio.ow.utt", "audio", "hubert", "sha256:00", "last_hidden_state", "mean", (8,))


def _store(root: Path) -> FeatureStore:
    st = FeatureStore.open(root)
    st.ensure_set(SPEC)
    with st.writer() as w:
        for c in ("a", "b"):
            w.add(c, {SPEC.key: np.full(8, ord(c), np.float32)}, {"source": f"/v/{c}.mp4"})
    return st


def test_store_export_never_replaces_an_existing_file_without_force(tmp_path):
    _store(tmp_path / "s.zarr")
    dest = tmp_path / "mine.h5"
    dest.write_bytes(b"my own results")
    res = runner.invoke(app, ["store", "export", str(tmp_path / "s.zarr"), str(dest), "--set", SPEC.name])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "exists: pass --force" in error_lines(res.output)[0] and dest.read_bytes() == b"my own results"
    folder = tmp_path / "npy"
    folder.mkdir()
    (folder / "a.npy").write_bytes(b"mine")
    res = runner.invoke(app, ["store", "export", str(tmp_path / "s.zarr"), str(folder), "--set", SPEC.name,
                              "--format", "npy"])
    assert res.exit_code == 2 and "not empty" in error_lines(res.output)[0] and (folder / "a.npy").read_bytes() == b"mine"
    res = runner.invoke(app, ["store", "export", str(tmp_path / "s.zarr"), str(dest), "--set", SPEC.name, "--force"])
    assert res.exit_code == 0, res.output
    import h5py

    with h5py.File(dest) as f:
        assert sorted(f[SPEC.key]) == ["a", "b"] and f[SPEC.key]["b"][0] == ord("b")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []   # no temporary left


def test_store_rm_of_an_unknown_clip_exits_2_and_removes_nothing(tmp_path):
    st = _store(tmp_path / "s.zarr")
    res = runner.invoke(app, ["store", "rm", str(tmp_path / "s.zarr"), "--clip", "nosuch", "--clip", "a"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    [err] = error_lines(res.output)
    assert "no clip 'nosuch'" in err and "nothing removed" in err
    st.refresh()
    assert st.complete(SPEC.key) == {"a", "b"}
    res = runner.invoke(app, ["store", "rm", str(tmp_path / "s.zarr"), "--clip", "a"])
    assert res.exit_code == 0 and "removed 1 clip(s)" in res.output
    res = runner.invoke(app, ["store", "rm", str(tmp_path / "s.zarr"), "--clip", "a", "--set", SPEC.name])
    assert res.exit_code == 2 and f"no clip 'a' in {SPEC.name} of" in error_lines(res.output)[0]


def test_score_refuses_a_clip_listed_twice_instead_of_counting_it_twice(tmp_path):
    """Defect 12: `score` counted a duplicate id twice (its accuracy then weighed that clip double)."""
    import csv

    pred = tmp_path / "p.csv"
    with open(pred, "w", newline="") as f:
        csv.writer(f).writerows([("name", "label", "prediction"), ("a", "happy", "happy"), ("a", "happy", "sad"),
                                 ("b", "sad", "sad")])
    res = runner.invoke(app, ["score", "--pred", str(pred), "--dataset", "mer2023"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        f"error: {pred}: clips listed more than once: a (each clip must have one row: which prediction counts "
        "is ambiguous)"]
    ok = tmp_path / "ok.csv"
    ok.write_text("name,label,prediction\na,happy,happy\nb,sad,happy\n")
    res = runner.invoke(app, ["score", "--pred", str(ok), "--dataset", "mer2023", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["accuracy"] == 0.5


@pytest.mark.slow
def test_a_quick_eval_never_replaces_the_full_report_and_another_scope_is_refused(tiny_store, tmp_path):
    """Defect 2: `eval --limit 3` overwrote the full report of an earlier eval."""
    import shutil

    data, _ = tiny_store
    run = tmp_path / "run"
    res = runner.invoke(app, train_args(tiny_store, run))
    assert res.exit_code == 0, res.output
    evals = ["eval", "--run", str(run), "--split", "train", "--no-generate", "--no-progress", "--json"]
    res = runner.invoke(app, evals)
    assert res.exit_code == 0, res.output
    full = run / "eval" / "merr-train"
    assert json.loads((full / "metrics.json").read_text())["scope"]["limit"] is None
    before = snapshot(full)
    res = runner.invoke(app, [*evals, "--limit", "3"])
    assert res.exit_code == 0, res.output
    quick = run / "eval" / "merr-train-first3"
    assert json.loads((quick / "metrics.json").read_text())["n"] == 3
    assert snapshot(full) == before                  # the full report as it was
    # the same dataset name from another folder: another scope, so the report is not replaced
    other = tmp_path / "other-data"
    shutil.copytree(data, other)
    res = runner.invoke(app, [*evals, "--data", str(other)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    [err] = error_lines(res.output)
    assert str(full) in err and "another evaluation (data " in err and "--out DIR" in err and "--overwrite" in err
    assert snapshot(full) == before
    # a rerun of the same scope replaces its own report
    res = runner.invoke(app, evals)
    assert res.exit_code == 0 and json.loads((full / "metrics.json").read_text())["scope"]["limit"] is None
