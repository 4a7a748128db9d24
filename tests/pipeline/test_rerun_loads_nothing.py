"""A rerun with nothing to do loads no model and starts no worker: the feature-set keys come from the
cached encoder descriptions (`extract.encoders.known_outputs`), keyed by the weights identity (local
files hashed once per path, size and mtime). A changed checkpoint file still means new keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import emollama.pipeline.extraction as extraction
from emollama.extract import encoders as E
from emollama.extract import sources, step
from emollama.extract.models import ensure_tiny
from emollama.store.cache import default_home
from emollama.extract.registry import Encoder
from emollama.extract.sample import write_sample
from emollama.extract.step import ExtractSettings, build_specs, describe_encoders
from emollama.pipeline.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home of its own (empty caches), sharing the session's tiny models (built once)."""
    shared = default_home()
    for view in E.VIEWS:
        ensure_tiny(view, shared)
    own = tmp_path / "home"
    own.mkdir()
    (own / "models").symlink_to(shared / "models", target_is_directory=True)
    monkeypatch.setenv("EMOLLAMA_HOME", str(own))
    step._MODELS.clear()   # this process's loaded models belong to the settings of other tests
    return own


def forbid_models(monkeypatch) -> None:
    """Building any encoder or face detector, or starting any executor, fails the test."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded or a worker started for a run with nothing to do")

    monkeypatch.setattr(extraction, "make_executor", boom)
    monkeypatch.setattr(step, "_load_models", boom)
    monkeypatch.setattr(step, "load_encoders", boom)
    monkeypatch.setattr(E, "load_encoders", boom)
    monkeypatch.setattr(Encoder, "load", classmethod(boom))
    monkeypatch.setattr(Encoder, "__init__", boom)


def extract(data: Path, store: Path, *extra: str):
    return runner.invoke(app, ["extract", "--dataset", "merr", "--data", str(data), "--store", str(store),
                               "--profile", "tiny", "--no-progress", *extra])


def summary_of(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


@pytest.mark.slow
def test_a_rerun_with_nothing_to_do_loads_no_model_and_starts_no_worker(home, tmp_path, monkeypatch):
    data = write_sample(tmp_path / "data", clips=2, seed=11)
    store = tmp_path / "s.zarr"
    first = summary_of(extract(data, store, "--workers", "0", "--json"))
    assert len(first["ok"]) == 2 and first["failed"] == []
    assert (home / E.OUTPUTS_FILE).is_file()

    with monkeypatch.context() as m:
        forbid_models(m)
        again = summary_of(extract(data, store, "--workers", "1", "--json"))   # a cluster would be asked for
        assert again["skipped"] == 2 and again["ok"] == [] and again["failed"] == []
        assert again["keys"] == first["keys"]
        text = extract(data, store)
        assert text.exit_code == 0, text.output
        assert "2 in corpus, 2 already complete, 0 extracted, 0 failed" in text.output
        assert extraction.NOTHING_TO_DO in text.output

    # A fresh interpreter: the rerun does not even import torch (no model machinery at all).
    code = ("import json, sys; from emollama.pipeline.config import load_config; "
            "from emollama.pipeline.extraction import run_extract; "
            f"cfg = load_config(None, {{'dataset': {{'kind': 'merr', 'root': {str(data)!r}}}, "
            f"'extract': {{'store': {str(store)!r}, 'profile': 'tiny'}}}}); "
            "s = run_extract(cfg, progress=False); "
            "print(json.dumps({'skipped': s.skipped, 'ok': s.ok, 'keys': s.keys, 'torch': 'torch' in sys.modules}))")
    env = {**os.environ, "EMOLLAMA_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"skipped": 2, "ok": [], "keys": first["keys"], "torch": False}

    # The keys known, a new store: the work is done under the same keys.
    fresh = summary_of(extract(data, tmp_path / "fresh.zarr", "--workers", "0", "--json", "--limit", "1"))
    assert len(fresh["ok"]) == 1 and fresh["keys"] == first["keys"]

    # Work to do again (one clip's features removed): workers start and the same keys are used.
    from emollama.store import FeatureStore

    fs = FeatureStore.open(store)
    some = sorted(first["ok"])[0]
    assert fs.remove([some], list(first["keys"].values())) >= 1
    third = summary_of(extract(data, store, "--workers", "0", "--json"))
    assert third["ok"] == [some] and third["keys"] == first["keys"]


# --- keys from a local checkpoint file ----------------------------------------------------------


@pytest.fixture
def eva_file(home) -> tuple[Path, Path]:
    """A tiny EVA checkpoint file in its authors' layout, and a config json naming its heads; both
    dated a minute ago (a file hashed right after it was written is hashed again next time)."""
    from safetensors.torch import save_file

    from emollama.extract.models import build_model

    model = build_model("global", "tiny")
    file, config = home / "eva.safetensors", home / "eva.json"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(file))
    config.write_text(json.dumps({"num_attention_heads": model.blocks[0].attn.num_heads}))
    past = time.time_ns() - 60 * 10**9
    for p in (file, config):
        os.utime(p, ns=(past, past))
    return file, config


def settings_for(file: Path, config: Path) -> ExtractSettings:
    entry = E.EncoderEntry("global", "eva", E.ModelSource(str(file), config=str(config)))
    return ExtractSettings(encoders=E.EncodersConfig((entry,)), device="cpu", offline=True)


def keys_now(settings: ExtractSettings) -> tuple[dict[str, str], bool]:
    """The run's way to its keys: the cached descriptions, else the encoders loaded once (and cached).
    -> (output name -> key, whether a model was loaded)."""
    known = E.known_outputs(settings.encoders, device=settings.device, offline=True)
    loaded = not known.complete
    if loaded:
        step._MODELS.clear()
        E.remember_outputs(known, describe_encoders(settings))
    return {name: spec.key for name, spec in build_specs(known.infos, settings).items()}, loaded


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The files whose content is hashed from now on (a cache hit hashes nothing)."""
    seen: list[str] = []
    real = sources.file_sha256

    def counting(path):
        seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(sources, "file_sha256", counting)
    return seen


def _rewrite_same_size(file: Path) -> None:
    from safetensors.torch import load_file, save_file

    size = file.stat().st_size
    tensors = load_file(str(file))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(file))
    assert file.stat().st_size == size


def test_a_changed_checkpoint_file_changes_the_keys_and_a_touch_does_not(eva_file, hashed, monkeypatch):
    file, config = eva_file
    settings = settings_for(file, config)
    keys, loaded = keys_now(settings)
    assert loaded and set(keys) == {"global.eva.tokens"}

    with monkeypatch.context() as m:   # unchanged: no model, and no file hashed again
        forbid_models(m)
        hashed.clear()
        assert keys_now(settings) == (keys, False)
        assert hashed == []
        # touched (new mtime, same bytes): hashed again, same identity, same keys, still no model
        later = file.stat().st_mtime_ns + 10**9
        os.utime(file, ns=(later, later))
        assert keys_now(settings) == (keys, False)
        assert hashed == ["eva.safetensors"]

    # new bytes of the same size: a new identity, so the encoder is loaded once and the key differs
    old_mtime = file.stat().st_mtime_ns
    _rewrite_same_size(file)
    os.utime(file, ns=(old_mtime + 10**9, old_mtime + 10**9))
    changed, loaded = keys_now(settings)
    assert loaded and changed["global.eva.tokens"] != keys["global.eva.tokens"]
    with monkeypatch.context() as m:
        forbid_models(m)
        assert keys_now(settings) == (changed, False)

    # the config the file names (its heads reach the params) is part of what the cache is keyed by
    config.write_text(json.dumps({"num_attention_heads": 1}))
    heads1, loaded = keys_now(settings)
    assert loaded and heads1["global.eva.tokens"] not in (keys["global.eva.tokens"], changed["global.eva.tokens"])


def test_a_damaged_cache_is_ignored_and_rewritten(eva_file, home, hashed, monkeypatch, caplog):
    file, config = eva_file
    settings = settings_for(file, config)
    keys, loaded = keys_now(settings)
    assert loaded
    cache = home / E.OUTPUTS_FILE

    cache.write_text('{"format": 1, "entries": {')   # cut short (a crash mid-write elsewhere)
    assert keys_now(settings) == (keys, True)
    assert json.loads(cache.read_text())["format"] == E.OUTPUTS_FORMAT

    data = json.loads(cache.read_text())            # one entry damaged: ignored, said, rewritten
    for entry in data["entries"].values():
        entry["info"]["outputs"] = {"tokens": {"pooling": "none", "shape": "wide"}}
    cache.write_text(json.dumps(data))
    assert keys_now(settings) == (keys, True)
    assert "damaged entry" in caplog.text
    with monkeypatch.context() as m:
        forbid_models(m)
        assert keys_now(settings) == (keys, False)

    # the hash cache: a damaged entry, or a file that is not a table, is hashed again and rewritten
    hashes = home / "hashes.json"
    table = json.loads(hashes.read_text())
    table[str(file.resolve())]["sha256"] = "not a hash"
    hashes.write_text(json.dumps(table))
    hashed.clear()
    assert keys_now(settings) == (keys, False)
    assert hashed == ["eva.safetensors"]
    assert json.loads(hashes.read_text())[str(file.resolve())]["sha256"] == \
        sources.file_sha256(file)
    hashes.write_text("[1, 2, 3]")
    assert keys_now(settings) == (keys, False)
    assert isinstance(json.loads(hashes.read_text()), dict)


def test_encoder_info_round_trips_and_rejects_damage():
    info = E.EncoderInfo(name="eva", input_kind="frame", weights="sha256:" + "0" * 64, layer="blocks[:2]",
                         frame_rate=None, compute_dtype="float32", params={"image_size": [448, 448]},
                         outputs={"tokens": E.OutputInfo("none", (1025, 48))})
    assert E.EncoderInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    for damage in ({"outputs": None}, {"name": 3}, {"outputs": {}}, {"frame_rate": "fast"}):
        with pytest.raises(ValueError, match="not an encoder description"):
            E.EncoderInfo.from_dict({**info.to_dict(), **damage})
