"""Fault suite, evaluation and training (issue 11, defects 5, 7 and 8):

- ``eval`` and ``infer`` never write the run's training store: clips missing from it go into an eval store
  of their own (``<run>/eval-store.zarr`` or ``--cache-store``) under the very same set keys, and a
  read-only training store serves them as it is;
- ``infer`` on a FIFO or a folder that holds no frames fails that path alone, with a reason;
- a checkpoint that cannot be written (a full disk, made with a small tmpfs) keeps the last complete one,
  leaves no temporary files, says so in one line and exits 4; ``--resume`` continues once there is room.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emollama.pipeline.cli import app
from emollama.store import FeatureStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import tiny_toml  # noqa: E402

runner = CliRunner()
VIEWS = ["local.vit_mae.mean", "temporal.videomae.mean", "audio.hubert.mean"]


def _json(output: str):
    start = min(i for i in (output.find("{"), output.find("[\n")) if i >= 0)
    return json.loads(output[start:])


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: sha256 of its bytes and its mtime (ns)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def _mount(args: list[str], what: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount {what} here ({(proc.stderr or proc.stdout).strip() or proc.returncode}): "
                    "mounting needs root or CAP_SYS_ADMIN")


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """8 synthetic clips extracted (tiny profile) and a tiny run trained on them; then the test clips are
    removed from the training store, so evaluating the test split has clips to extract."""
    from emollama.extract.sample import write_sample
    from emollama.corpora import load_corpus

    tmp = tmp_path_factory.mktemp("evaltrain")
    data = write_sample(tmp / "data", clips=8, seed=2)
    store = tmp / "store.zarr"
    res = runner.invoke(app, ["extract", "--dataset", "merr", "--data", str(data), "--store", str(store),
                              "--profile", "tiny", "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    run = tmp / "run"
    res = runner.invoke(app, ["train", "--data", str(data), "--store", str(store), "--out", str(run),
                              "--profile", "tiny", "--steps", "2", "-b", "2", "--no-progress", "--json",
                              *[a for v in VIEWS for a in ("-f", v)]])
    assert res.exit_code == 0, res.output
    test_ids = sorted(c.id for c in load_corpus("merr", data).split("test") if c.label)
    assert test_ids
    # the closed-set probabilities of the test clips while the training store still holds them
    res = runner.invoke(app, ["eval", "--run", str(run), "--dataset", "merr", "--data", str(data), "--split", "test",
                              "--no-generate", "--out", str(tmp / "before"), "--json"])
    assert res.exit_code == 0, res.output
    assert _json(res.output)["extraction"]["extracted"] == 0
    before = {json.loads(l)["id"]: json.loads(l)["probabilities"]
              for l in (tmp / "before" / "merr" / "predictions.jsonl").read_text().splitlines()}
    st = FeatureStore.open(store, create=False)
    keys = json.loads((run / "feature_sets.json").read_text())
    values = {k: dict(zip(test_ids, st.read_many(test_ids, k))) for k in keys}
    st.remove(test_ids)
    assert not any(set(test_ids) & FeatureStore.open(store).complete(k) for k in keys)
    assert not (run / "eval-store.zarr").exists()
    return {"tmp": tmp, "data": data, "store": store, "run": run, "test_ids": test_ids, "keys": list(keys),
            "probs": before, "values": values}


@pytest.mark.slow
def test_eval_and_infer_extract_into_an_eval_store_and_never_write_the_training_store(trained, tmp_path):
    data, store, run, ids = trained["data"], trained["store"], trained["run"], trained["test_ids"]
    before = snapshot(store)
    res = runner.invoke(app, ["eval", "--run", str(run), "--dataset", "merr", "--data", str(data), "--split", "test",
                              "--no-generate", "--out", str(tmp_path / "ev"), "--json"])
    assert res.exit_code == 0, res.output
    m = _json(res.output)
    assert m["n"] == len(ids) and m["missing"] == []
    assert m["extraction"]["extracted"] == len(ids) and m["extraction"]["eval_store"] == str(run / "eval-store.zarr")
    # the eval store holds the run's sets under exactly their keys (and no set the training store's
    # extraction did not make), the clips under each, with the same values
    ev = FeatureStore.open(run / "eval-store.zarr", create=False)
    assert set(trained["keys"]) <= set(ev.sets()) <= set(FeatureStore.open(store).sets())
    for k in trained["keys"]:
        assert set(ids) <= ev.complete(k)
        for cid, x in zip(ids, ev.read_many(ids, k)):
            np.testing.assert_allclose(x, trained["values"][k][cid], rtol=1e-5, atol=1e-6)
    # read back through the eval store, the run predicts what it predicted from the training store
    preds = {json.loads(l)["id"]: json.loads(l)["probabilities"]
             for l in (tmp_path / "ev" / "merr" / "predictions.jsonl").read_text().splitlines()}
    assert preds.keys() == trained["probs"].keys()
    for cid, p in preds.items():
        assert p == pytest.approx(trained["probs"][cid], abs=1e-4)
    # a rerun reuses the eval store: nothing extracted
    res = runner.invoke(app, ["eval", "--run", str(run), "--dataset", "merr", "--data", str(data), "--split", "test",
                              "--no-generate", "--out", str(tmp_path / "ev2"), "--json"])
    assert res.exit_code == 0, res.output
    assert _json(res.output)["extraction"] == {"extracted": 0, "reused": len(ids), "failed": [],
                                               "not_in_imported_sets": {},
                                               "eval_store": str(run / "eval-store.zarr")}
    # infer on copies of two clips under a new name: found by their content (the sha256 extraction
    # recorded) in the stores, read under the ids they hold them by, nothing extracted
    videos = [v for v in sorted((data / "video").glob("*.mp4")) if v.stem in ids][:2]
    new = [tmp_path / "a" / "new clip.mp4", tmp_path / "b" / "new clip.mp4"]
    for src, dst in zip(videos, new):
        dst.parent.mkdir()
        shutil.copyfile(src, dst)
    ev_before = snapshot(run / "eval-store.zarr")
    res = runner.invoke(app, ["infer", "--run", str(run), *map(str, new), "--no-reason", "--json"])
    assert res.exit_code == 0, res.output
    out = _json(res.output)
    assert [r["extracted"] for r in out] == [False, False] and all(r["label"] for r in out)
    assert [r["id"] for r in out] == [v.stem for v in videos]
    assert snapshot(run / "eval-store.zarr") == ev_before
    # the training store: not one byte or mtime changed, no file added
    assert snapshot(store) == before


@pytest.mark.slow
def test_a_read_only_training_store_serves_eval_and_infer(trained, tmp_path):
    """The training store on a read-only bind mount (EROFS for root too): infer and eval read it, write
    their clips into --cache-store; an eval store that cannot be written is exit 4 with one line."""
    store, run, data = trained["store"], trained["run"], trained["data"]
    ro = tmp_path / "ro-store"
    ro.mkdir()
    _mount(["--bind", str(store), str(ro)], "a bind mount")
    try:
        _mount(["-o", "remount,bind,ro", str(ro)], "a read-only remount")
        with pytest.raises(OSError):
            (ro / "probe").write_text("x")
        before = snapshot(store)
        clip = tmp_path / "shared.mp4"
        shutil.copyfile(sorted((data / "video").glob("*.mp4"))[-1], clip)
        cache = tmp_path / "my-cache.zarr"
        res = runner.invoke(app, ["infer", "--run", str(run), str(clip), "--store", str(ro), "--cache-store", str(cache),
                                  "--no-reason", "--json"])
        assert res.exit_code == 0, res.output
        r = _json(res.output)[0]
        assert r["extracted"] and r["label"]
        assert all(r["id"] in FeatureStore.open(cache, create=False).complete(k) for k in trained["keys"])
        res = runner.invoke(app, ["eval", "--run", str(run), "--dataset", "merr", "--data", str(data), "--split", "test",
                                  "--store", str(ro), "--cache-store", str(cache), "--no-generate",
                                  "--out", str(tmp_path / "ev"), "--json"])
        assert res.exit_code == 0, res.output
        assert _json(res.output)["n"] == len(trained["test_ids"])
        # the eval store on the read-only mount: a storage error, one line, exit 4
        other = tmp_path / "other.mp4"
        shutil.copyfile(clip, other)
        res = runner.invoke(app, ["infer", "--run", str(run), str(other), "--store", str(ro),
                                  "--cache-store", str(ro / "eval.zarr"), "--no-reason"])
        assert res.exit_code == 4, res.output
        err = [l for l in res.output.splitlines() if l.startswith("error:")]
        assert len(err) == 1 and "cannot create the eval store" in err[0] and "--cache-store" in err[0]
        assert "Traceback" not in res.output
        # the training store itself is never a cache
        res = runner.invoke(app, ["infer", "--run", str(run), str(other), "--cache-store", str(store), "--no-reason"])
        assert res.exit_code == 2 and "never write" in res.output
        assert snapshot(store) == before
    finally:
        _umount(ro)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_infer_on_a_fifo_or_a_folder_fails_that_path_alone(trained, tmp_path):
    run, data = trained["run"], trained["data"]
    fifo = tmp_path / "stream.mp4"
    os.mkfifo(fifo)                              # opening it would block: it must never be opened
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    (folder / "notes.txt").write_text("no frames here")
    good = tmp_path / "good.mp4"
    shutil.copyfile(sorted((data / "video").glob("*.mp4"))[0], good)
    res = runner.invoke(app, ["infer", "--run", str(run), str(fifo), str(folder), str(good), "--no-reason", "--json"])
    assert res.exit_code == 1, res.output          # some clip failed
    assert "NotADirectoryError" not in res.output and "Traceback" not in res.output
    out = {Path(r["file"]).name: r for r in _json(res.output)}
    assert out["stream.mp4"]["label"] is None and "named pipe (FIFO)" in out["stream.mp4"]["error"]
    assert out["folder.mp4"]["label"] is None and "no image frames" in out["folder.mp4"]["error"]
    assert out["good.mp4"]["label"] in json.loads((run / "metrics.json").read_text())["labels"]
    assert out["good.mp4"]["error"] is None     # a copy of a training clip: read from the store, by its content
    assert not out["stream.mp4"]["extracted"] and not out["folder.mp4"]["extracted"]
    ev = FeatureStore.open(run / "eval-store.zarr", create=False)
    assert out["stream.mp4"]["id"] not in ev.clips() and out["folder.mp4"]["id"] not in ev.clips()
    text = runner.invoke(app, ["infer", "--run", str(run), str(fifo), "--no-reason"])
    assert text.exit_code == 1 and "failed: a named pipe (FIFO), not a video file" in text.output
    # a broken link is named as such
    link = tmp_path / "gone.mp4"
    link.symlink_to(tmp_path / "nowhere.mp4")
    res = runner.invoke(app, ["infer", "--run", str(run), str(link)])
    assert res.exit_code == 2 and "a broken link" in res.output


FILL_AFTER_FIRST_SAVE = """
import os, sys
import emollama.train.loop as loop
real = loop.save_checkpoint
def save_then_fill(run, step, *a, **k):
    out = real(run, step, *a, **k)
    if step == 2:     # the first checkpoint is written: now the disk fills up (leaving 32 KB)
        st = os.statvfs(run)
        with open(os.path.join(os.environ["FILLER"]), "wb") as f:
            f.write(b"\\0" * max(0, st.f_bavail * st.f_frsize - 32 * 1024))
    return out
loop.save_checkpoint = save_then_fill
from emollama.pipeline.cli import app
app(sys.argv[1:])
"""


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.slow
def test_a_full_disk_while_saving_keeps_the_last_checkpoint(trained, tmp_path):
    """The run folder on a 16 MB tmpfs that fills up after the first checkpoint (step 2): the step-4 save
    fails, exit 4 with one line naming the kept checkpoint; no temp folder; a retry on the still-full disk
    fails the same way and leaves nothing more behind; once there is room `--resume` finishes the run."""
    import subprocess as sp
    import sys

    from emollama.train.checkpoint import latest_checkpoint, load_safetensors

    mnt = tmp_path / "disk"
    mnt.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], "a tmpfs")
    try:
        run = mnt / "run"
        toml = tiny_toml(tmp_path / "t.toml", trained["data"], trained["store"], run, steps=6, warmup_steps=1,
                         batch_size=2)
        env = dict(os.environ, FILLER=str(mnt / "filler"))
        proc = sp.run([sys.executable, "-c", FILL_AFTER_FIRST_SAVE, "train", "-c", str(toml), "--no-progress"],
                      capture_output=True, text=True, timeout=600, env=env)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 4, out
        assert "Traceback" not in out and "PytorchStreamWriter" not in out.split("error:")[0]
        err = [l for l in out.splitlines() if l.startswith("error:")]
        assert len(err) == 1, out
        last = run / "checkpoints" / "step-0000002"
        assert f"{last}" in err[0] and "--resume" in err[0] and "free there" in err[0]
        assert "No space left on device" in err[0] and "Error while serializing" not in err[0]
        assert latest_checkpoint(run) == last
        # the kept checkpoint is whole: its state, weights and optimizer load
        assert json.loads((last / "state.json").read_text())["step"] == 2
        assert load_safetensors(last / "projectors.safetensors")
        assert load_safetensors(last / "adapter" / "adapter_model.safetensors")
        assert (last / "optimizer.pt").stat().st_size > 0 and (last / "rng.pt").is_file()
        assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "projectors.safetensors").is_file()
        # no temporary folder or file left behind
        hidden = [str(p.relative_to(run)) for p in run.rglob(".*")]
        assert hidden == [], hidden
        # a retry on the still-full disk: the same error, and nothing grew
        used = _used(mnt)
        proc = sp.run([sys.executable, "-m", "emollama.pipeline.cli", "train", "-c", str(toml), "--resume", "--no-progress"],
                      capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 4 and "Traceback" not in out, out
        assert str(last) in [l for l in out.splitlines() if l.startswith("error:")][0]
        assert [str(p.relative_to(run)) for p in run.rglob(".*")] == []
        assert _used(mnt) <= used, (used, _used(mnt))
        assert latest_checkpoint(run) == last
        # room again: the run resumes from step 2 and finishes
        (mnt / "filler").unlink()
        proc = sp.run([sys.executable, "-m", "emollama.pipeline.cli", "train", "-c", str(toml), "--resume", "--no-progress"],
                      capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"resumed from {last} at step 2" in proc.stdout + proc.stderr
        assert latest_checkpoint(run).name == "step-0000006"
    finally:
        _umount(mnt)


def test_a_failed_torch_save_removes_its_temp_folder_and_names_the_kept_checkpoint(tmp_path, monkeypatch):
    """Without a mount: torch.save failing as it does on a full disk (its own RuntimeError, not an OSError)
    becomes one CheckpointWriteError naming the folder, the free space and the kept checkpoint."""
    import torch

    import emollama.train.checkpoint as ck

    run = tmp_path / "run"
    kept = run / "checkpoints" / "step-0000002"
    kept.mkdir(parents=True)
    (kept / "state.json").write_text('{"step": 2}')
    monkeypatch.setattr(ck, "write_weights", lambda model, folder, meta: (folder / "w.bin").write_bytes(b"x" * 10))

    def full(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ck.CheckpointWriteError) as e:
        ck.save_checkpoint(run, 4, object(), opt, {"step": 4}, {})
    msg = str(e.value)
    assert "\n" not in msg and "the step-4 checkpoint" in msg and str(run) in msg and "free there" in msg
    assert f"the last complete checkpoint {kept} is intact" in msg and "--resume" in msg
    assert "PytorchStreamWriter failed writing file data/0" in msg
    assert e.value.last == kept and ck.latest_checkpoint(run) == kept
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]   # no temp folder
    assert json.loads((kept / "state.json").read_text()) == {"step": 2}
