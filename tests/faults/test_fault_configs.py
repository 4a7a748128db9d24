"""Fault suite, configs, the model cache and odd inputs (issue 20, items 9 and 10): each fault is one
clear message with its exit status (2 a config or usage error, 4 a cache that cannot be written), never a
traceback, and nothing is written where it would do harm; a damaged tiny model is rebuilt; frames too
small for a face are extracted with whole frames. docs/faults.md tabulates them.

Extraction in this process keeps its loaded encoders (keyed by the settings, not by EMOLLAMA_HOME), so
the runs whose point is what EMOLLAMA_HOME holds run `emollama extract` in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_fault_inputs import write_clip  # noqa: E402 - the fault suite's small real clip
from emollama.pipeline.cli import app
from emollama.store import FeatureStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_released import released_state, write_released  # noqa: E402

runner = CliRunner()
TINY_VIEWS = ("audio", "local", "temporal", "global")


# ------------------------------------------------------------------------------------------ helpers


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or ``root`` itself, a file) with the sha256 of its bytes."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root) if p != root else p.name): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def no_files_in(folder: Path) -> bool:
    """Nothing was made at ``folder``: a run folder the lock created and the failed run left empty is
    removed again (``train.runfolder.lock``)."""
    return not folder.exists()


def one_error(res, code: int) -> str:
    """A CliRunner result: exit ``code``, no traceback, exactly one `error:` line on stderr; that line."""
    assert res.exit_code == code and isinstance(res.exception, SystemExit), (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, res.output
    return errors[0]


def config_problems(res, header: str) -> list[str]:
    """A config refused whole: exit 2, no traceback, `header` then one `  - problem` line each; the problems."""
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output, res.output
    first, *rest = res.stderr.strip().splitlines()
    assert first == header, res.stderr
    assert all(ln.startswith("  - ") for ln in rest), res.stderr
    return [ln[4:] for ln in rest]


def cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    """`emollama ARGS` in a fresh process with EMOLLAMA_HOME=home (offline, as every test)."""
    env = {**os.environ, "EMOLLAMA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "emollama.pipeline.cli", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def extract_args(data: Path, store: Path, *extra: str) -> list[str]:
    return ["extract", "--dataset", "merr", "--data", str(data), "--store", str(store), "--profile", "tiny",
            "--workers", "0", "--no-progress", *extra]


def train_args(tiny_store, out: Path, *extra: str) -> list[str]:
    data, store = tiny_store
    return ["train", "--data", str(data), "--store", str(store), "--out", str(out), "--profile", "tiny",
            "--steps", "1", "-b", "2", "-f", "audio.hubert.mean", "--no-progress", *extra]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """An EMOLLAMA_HOME of this module: a copy of the session's tiny encoders and tiny LM (built there once)."""
    from emollama.extract.models import ensure_tiny
    from emollama.store.cache import default_home
    from emollama.train.tiny import ensure_tiny_llm

    session = default_home()
    for view in TINY_VIEWS:
        ensure_tiny(view, session)
    ensure_tiny_llm(session)
    mine = tmp_path_factory.mktemp("home")
    shutil.copytree(session / "models" / "tiny", mine / "models" / "tiny")
    return mine


# ----------------------------------------------------------------------- 1, 2: values of the wrong type


def test_train_config_values_of_the_wrong_type_are_all_listed_at_once(tiny_store, tmp_path):
    data, store = tiny_store
    out = tmp_path / "run"
    args = ["--data", str(data), "--store", str(store), "--out", str(out), "--no-progress"]
    typed = tmp_path / "typed.toml"
    typed.write_text('[data]\ndataset = 3\nlabels = [1, 2]\n\n[optim]\nlr = nan\nbetas = [0.9, "x"]\n')
    res = runner.invoke(app, ["train", "-c", str(typed), *args])
    assert config_problems(res, "invalid training configuration:") == [
        "data.dataset = 3: expected str",
        "data.labels[0] = 1: expected str",
        "optim.lr = nan: expected a finite number",
        "optim.betas[1] = 'x': expected float"]
    # sections that are no table: listed, while --data/--store still fill [data]
    flat = tmp_path / "flat.toml"
    flat.write_text("data = 5\ndataset = 3\n\n[optim]\nlr = nan\n")
    res = runner.invoke(app, ["train", "-c", str(flat), *args])
    assert config_problems(res, "invalid training configuration:") == [
        "data = 5: expected a table of settings ([data] with key = value lines)",
        "dataset = 3: expected a table of settings ([dataset] with key = value lines)",
        "optim.lr = nan: expected a finite number"]
    assert not out.exists()


def test_extract_config_values_of_the_wrong_type_are_all_listed_and_no_store_is_made(tmp_path):
    store = tmp_path / "s.zarr"
    (tmp_path / "d").mkdir()
    cfg = tmp_path / "e.toml"
    cfg.write_text(f'[dataset]\nkind = "folder"\nroot = "{tmp_path / "d"}"\n\n'
                   f'[extract]\nprofile = "tiny"\nstore = "{store}"\nmicro_batch = "four"\nprep_workers = "two"\n\n'
                   '[extract.frames]\nlocal_frames = nan\nmax_side = "big"\n\n'
                   '[extract.faces]\nmargin = inf\n\n'
                   '[extract.encoders.audio]\nmodel = [1]\n\n'
                   '[extract.encoders.mine]\nmodel = "x"\nencoder = ["hf"]\n')
    res = runner.invoke(app, ["extract", "-c", str(cfg), "--no-progress"])
    assert config_problems(res, "invalid configuration:") == [
        "extract.micro_batch = 'four': expected int",
        "extract.prep_workers = 'two': expected int",
        "extract.frames.local_frames = nan: expected int",
        "extract.frames.max_side = 'big': expected int",
        "extract.faces.margin = inf: expected a finite number",
        "extract.encoders.audio.model = [1]: expected a string",
        "extract.encoders.mine.encoder = ['hf']: expected a string"]
    flat = tmp_path / "flat.toml"
    flat.write_text("dataset = 3\nextract = 4\n")
    res = runner.invoke(app, ["extract", "-c", str(flat), "--data", str(tmp_path / "d"), "--store", str(store)])
    assert config_problems(res, "invalid configuration:") == [
        "dataset = 3: expected a table of settings ([dataset] with key = value lines)",
        "extract = 4: expected a table of settings ([extract] with key = value lines)"]
    assert not store.exists()


# ----------------------------------------------------------------------- 3: a --store that is no store


def _not_a_store(tmp_path: Path, kind: str) -> Path:
    if kind == "file":
        path = tmp_path / "features.zarr"
        path.write_bytes(b"a file of the user's\n")
    elif kind == "zarr group":
        import zarr

        path = tmp_path / "other.zarr"
        zarr.open_group(str(path), mode="w").attrs["owner"] = "another program"
    else:   # a zarr.json that is not JSON
        path = tmp_path / "broken.zarr"
        path.mkdir()
        (path / "zarr.json").write_text("{not json")
    return path


@pytest.mark.parametrize("kind, says", [
    ("file", "is a file, not a feature store (a store is a folder): pass the folder that `emollama extract` "
             "wrote, or a new path for a new store"),
    ("zarr group", "is a Zarr group but not an emollama feature store (its zarr.json has no attributes.emollama, "
                   "or is not JSON): nothing was written into it; pick an empty or new location for a store"),
    ("zarr.json not JSON", "is a Zarr group but not an emollama feature store"),
])
def test_a_store_path_that_is_a_file_or_another_zarr_group_is_refused_untouched(tiny_store, tmp_path, kind, says):
    data, _ = tiny_store
    path = _not_a_store(tmp_path, kind)
    before = snapshot(path)
    err = one_error(runner.invoke(app, extract_args(data, path, "--limit", "2")), 2)
    assert err.startswith(f"error: {path} {says}"), err
    assert snapshot(path) == before
    # train reading it as its stage-one store: the same one line
    out = tmp_path / "run"
    err = one_error(runner.invoke(app, ["train", "--data", str(data), "--store", str(path), "--out", str(out),
                                        "--profile", "tiny", "--no-progress"]), 2)
    assert err.startswith(f"error: {path} {says}"), err
    assert snapshot(path) == before and no_files_in(out)


# ----------------------------------------------------------------------- 4: a damaged tiny model


def test_a_truncated_tiny_model_is_rebuilt_with_a_warning_and_every_rerun_works(tiny_store, home, tmp_path):
    data, _ = tiny_store
    weights = home / "models" / "tiny" / "audio" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 3])     # an interrupted copy
    first = cli(*extract_args(data, tmp_path / "a.zarr", "--limit", "2"), home=home)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (f"WARNING emollama.store.cache: the tiny audio model in {weights.parent}: model.safetensors "
            "missing, truncated or changed; rebuilding it") in first.stderr
    assert "Traceback" not in first.stderr and "2 extracted, 0 failed" in first.stdout
    assert weights.read_bytes() == original                  # the build is deterministic (seeded)
    again = cli(*extract_args(data, tmp_path / "b.zarr", "--limit", "2"), home=home)
    assert again.returncode == 0 and "rebuilding" not in again.stderr, again.stdout + again.stderr
    a, b = FeatureStore.open(tmp_path / "a.zarr", create=False), FeatureStore.open(tmp_path / "b.zarr", create=False)
    key = next(k for k in a.sets() if k.startswith("audio.hubert.mean"))
    assert key in b.sets() and len(a.complete(key)) == 2      # the same set key: the same weights identity


def test_a_truncated_tiny_lm_is_rebuilt_with_a_warning_and_train_runs(tiny_store, home, tmp_path, monkeypatch):
    monkeypatch.setenv("EMOLLAMA_HOME", str(home))
    weights = home / "models" / "tiny" / "llm" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:1000])
    res = runner.invoke(app, train_args(tiny_store, tmp_path / "run"))
    assert res.exit_code == 0, res.output
    assert (f"the tiny language model in {weights.parent}: model.safetensors missing, truncated or changed; "
            "rebuilding it") in res.stderr
    assert weights.read_bytes() == original
    res = runner.invoke(app, train_args(tiny_store, tmp_path / "run2"))
    assert res.exit_code == 0 and "rebuilding" not in res.stderr, res.output


# ----------------------------------------------------------------------- 5: config.json of {}


def test_a_model_folder_whose_config_json_is_empty_is_refused_before_anything_starts(tiny_store, home, tmp_path,
                                                                                    monkeypatch):
    data, _ = tiny_store
    # an encoder folder: refused before the store, before any worker (no executor is made)
    folder = tmp_path / "hubert"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    cfg = tmp_path / "enc.toml"
    cfg.write_text(f'[extract.encoders.audio]\nmodel = "{folder}"\n')

    def no_workers(*a, **k):
        raise AssertionError("an executor was started")

    monkeypatch.setattr("emollama.pipeline.extraction.make_executor", no_workers)
    store = tmp_path / "s.zarr"
    res = runner.invoke(app, extract_args(data, store, "-c", str(cfg), "--workers", "2"))
    err = one_error(res, 2)
    assert err == "error: 1 model is missing (HF cache: " + err.split("(HF cache: ", 1)[1], err
    assert (f"  - {folder}: the audio encoder (hubert), {folder}/config.json names no model (neither transformers' "
            "model_type nor timm's architecture): restore the model's own config.json (download the model again) "
            "or point the setting at a complete folder") in res.stderr
    assert not store.exists()
    # the LM: --llm DIR and the config's model.llm; the folder is a complete tiny LM but for its config.json
    monkeypatch.setenv("EMOLLAMA_HOME", str(home))
    lm = tmp_path / "lm"
    shutil.copytree(home / "models" / "tiny" / "llm", lm)
    (lm / "config.json").write_text("{}")
    toml = tmp_path / "t.toml"
    toml.write_text(f'[model]\nllm = "{lm}"\n')
    for n, extra in enumerate((["--llm", str(lm)], ["-c", str(toml)])):
        out = tmp_path / f"run{n}"
        res = runner.invoke(app, train_args(tiny_store, out, *extra))
        err = one_error(res, 2)
        assert err.startswith(f"error: cannot load the language model '{lm}' (offline): ValueError: Unrecognized "
                              f"model in {lm}. Should have a `model_type` key in its config.json"), err
        assert "  the folder must hold config.json, the weights (*.safetensors) and the tokenizer files" in res.stderr
        assert no_files_in(out)


# ----------------------------------------------------------------------- 6, 7: EMOLLAMA_HOME unusable


def test_emollama_home_that_is_a_file_is_one_line_naming_it(tiny_store, tmp_path, monkeypatch):
    data, _ = tiny_store
    home = tmp_path / "home"
    home.write_text("not a folder\n")
    says = (f"error: the model cache {home} (EMOLLAMA_HOME) is not a folder (a file stands in its path), so the "
            "tiny {what} cannot be built there: set EMOLLAMA_HOME to a folder, or move the file away")
    store = tmp_path / "s.zarr"
    proc = cli(*extract_args(data, store, "--limit", "2"), home=home)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")] == [says.format(what="audio model")]
    assert not store.exists()
    monkeypatch.setenv("EMOLLAMA_HOME", str(home))
    out = tmp_path / "run"
    assert one_error(runner.invoke(app, train_args(tiny_store, out)), 2) == says.format(what="language model")
    assert home.read_text() == "not a folder\n" and no_files_in(out)


def _read_only_home(tmp_path: Path):
    """An empty EMOLLAMA_HOME nobody can write: chmod 0o555, or (where that does not stop this user, e.g.
    root) a read-only tmpfs; skip when neither can be had. Returns (folder, undo)."""
    home = tmp_path / "ro-home"
    home.mkdir()
    home.chmod(0o555)
    if not os.access(home, os.W_OK):
        return home, lambda: home.chmod(0o755)
    home.chmod(0o755)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(home)], capture_output=True,
                          text=True)
    if proc.returncode != 0 or os.access(home, os.W_OK):
        subprocess.run(["umount", str(home)], capture_output=True)
        pytest.skip("chmod does not stop this user (root) and no read-only tmpfs can be mounted here "
                    f"({(proc.stderr or proc.stdout).strip()})")
    return home, lambda: subprocess.run(["umount", "-l", str(home)], capture_output=True)


def test_a_read_only_emollama_home_is_blamed_not_out(tiny_store, tmp_path, monkeypatch):
    home, undo = _read_only_home(tmp_path)
    try:
        monkeypatch.setenv("EMOLLAMA_HOME", str(home))
        out = tmp_path / "run"
        err = one_error(runner.invoke(app, train_args(tiny_store, out)), 4)
        assert err.startswith(f"error: cannot build the tiny language model in the model cache {home} "
                              "(EMOLLAMA_HOME): "), err
        assert err.endswith("; set EMOLLAMA_HOME to a writable folder (or free space there), then rerun"), err
        assert ("Read-only file system" in err or "Permission denied" in err) and "--out" not in err, err
        assert no_files_in(out) and not any(home.iterdir())
    finally:
        undo()


# ----------------------------------------------------------------------- 8: frames under 24 px


@pytest.mark.parametrize("detect_on", ["prep", "encoder"])
def test_frames_smaller_than_a_face_are_extracted_with_whole_frames(tmp_path, detect_on):
    data = tmp_path / "small"
    write_clip(data / "square16.mp4", frames=10, size=(16, 16), audio_s=0.5)
    write_clip(data / "wide20x12.mp4", frames=10, size=(20, 12), audio_s=0.5)
    store = tmp_path / "s.zarr"
    res = runner.invoke(app, ["extract", "--dataset", "folder", "--data", str(data), "--store", str(store),
                              "--profile", "tiny", "--workers", "0", "--detect-on", detect_on, "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "torch.cat" not in res.output and "Traceback" not in res.output
    assert "2 extracted, 0 failed" in res.stdout
    assert "no face found (whole frames used) in 2: square16, wide20x12" in res.stdout
    st = FeatureStore.open(store, create=False)
    records = st.records()
    for cid, (w, h) in (("square16", (16, 16)), ("wide20x12", (20, 12))):
        r = records[cid]
        assert (r["status"], r["width"], r["height"]) == ("ok", w, h)
        assert r["face_found"] is False and r["face_detected"] == 0 and r["face_absent"] == r["sampled_frames"] > 0
        assert all(cid in st.complete(k) for k in st.sets())
    assert st.verify().ok


# ----------------------------------------------------------------------- 9: a truncated .pth


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_truncated_released_checkpoint_says_truncated_not_other_than_tensors(tmp_path, legacy):
    import torch

    full = write_released(tmp_path / "Emotion_LLaMA.pth", released_state())
    if legacy:   # the pre-1.6 torch.save format
        torch.save(torch.load(full, weights_only=True), full, _use_new_zipfile_serialization=False)
    raw = full.read_bytes()
    assert runner.invoke(app, ["import-checkpoint", str(full), "--out", str(tmp_path / "whole"),
                               "--profile", "tiny"]).exit_code == 0     # the whole file imports
    for n in (0, 3, 100, len(raw) // 2, len(raw) - 10):
        cut = tmp_path / f"cut{n}.pth"
        cut.write_bytes(raw[:n])
        if n == 3 and not legacy:
            continue   # 'PK\x03': not yet a zip header, torch unpickles it (see docs/faults.md)
        out = tmp_path / f"run{n}"
        err = one_error(runner.invoke(app, ["import-checkpoint", str(cut), "--out", str(out), "--profile", "tiny"]), 2)
        assert err.startswith(f"error: {cut} is truncated or corrupt ({n:,} bytes; torch cannot read it: "), err
        assert err.endswith("): copy or download it again"), err
        assert "something other than tensors" not in err
        assert not out.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_truncated_weights_file_in_an_encoder_table_is_one_line(tiny_store, tmp_path, suffix):
    import torch

    data, _ = tiny_store
    weights = tmp_path / f"mae{suffix}"
    state = {"cls_token": torch.zeros(1, 1, 40), "pos_embed": torch.zeros(1, 197, 40)}
    if suffix == ".pth":
        torch.save({"model": state}, weights)
    else:
        from safetensors.torch import save_file

        save_file(state, str(weights))
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    cfg = tmp_path / "enc.toml"
    cfg.write_text(f'[extract.encoders.local]\nmodel = "{weights}"\n')
    store = tmp_path / "s.zarr"
    err = one_error(runner.invoke(app, extract_args(data, store, "-c", str(cfg), "--limit", "2")), 2)
    reader = "torch" if suffix == ".pth" else "safetensors"
    assert err.startswith(f"error: {weights} is truncated or corrupt ({len(raw) // 2:,} bytes; {reader} cannot read "
                          "it: "), err
    assert err.endswith("): copy or download it again"), err
    assert not store.exists()     # no clip computed, and the store this run created is not left behind


@pytest.mark.parametrize("kind", ["pickle", "junk", "layout"])
def test_a_weights_file_an_encoder_cannot_use_is_one_line(tiny_store, tmp_path, kind):
    """A refused pickle, bytes that are no checkpoint, and tensors of another model, as an encoder table's
    weights: one line naming the file, exit 2 (was: a WeightsFileError traceback)."""
    import torch

    data, _ = tiny_store
    weights = tmp_path / f"mae-{kind}.pth" if kind != "junk" else tmp_path / "mae.bin"
    if kind == "pickle":
        torch.save({"model": {"w": torch.zeros(2)}, "opt": Path("x")}, weights)   # a class weights_only refuses
    elif kind == "junk":
        weights.write_bytes(random.Random(0).randbytes(4096))
    else:
        torch.save({"model": {"some.other.weight": torch.zeros(3, 3)}}, weights)
    cfg = tmp_path / "enc.toml"
    cfg.write_text(f'[extract.encoders.local]\nmodel = "{weights}"\n')
    store = tmp_path / "s.zarr"
    err = one_error(runner.invoke(app, extract_args(data, store, "-c", str(cfg), "--limit", "2")), 2)
    assert str(weights) in err, err
    assert {"pickle": "refused: loading it would run code stored in the pickle (Unsupported global: GLOBAL pathlib",
            "junk": "is truncated or corrupt (4,096 bytes; torch cannot read it",
            "layout": "not a checkpoint in the MAE repository layout: missing key"}[kind] in err, err
    assert not store.exists()
