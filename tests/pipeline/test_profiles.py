"""No silent random features: every output names the profile that made the features (read from the
store), and a job whose models are missing fails at once, naming all of them with one download hint,
with no store or run folder left behind, offline as when the hub cannot be reached."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from emollama.extract.sample import write_sample
from emollama.pipeline.cli import app
from emollama.store import FeatureStore

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
PAPER_MODELS = ("TencentGameMate/chinese-hubert-large", "facebook/vit-mae-large", "MCG-NJU/videomae-large",
                "timm/eva_giant_patch14_clip_224.laion400m")
LLAMA = "meta-llama/Llama-2-7b-chat-hf"
TINY_SETS = ("local.vit_mae.mean", "temporal.videomae.mean", "audio.hubert.mean")


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_hub_env(tmp_path: Path) -> dict:
    """A child's environment: online (HF_HUB_OFFLINE unset), the hub on a closed local port, an empty HF cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    return {**env, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "empty-hf")}


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> Path:
    return write_sample(tmp_path_factory.mktemp("sample") / "data", clips=4, seed=3)


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path / "empty-hf" / "hub"


# --- the profile in every output ------------------------------------------------------------

@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Extract the sample (tiny, text summary), rerun it (--json), import one set made elsewhere, train
    on two tiny sets and the imported one: every output of the journey."""
    tmp = tmp_path_factory.mktemp("profiles")
    data = write_sample(tmp / "data", clips=8, seed=4)
    store = tmp / "store.zarr"
    args = ["extract", "--dataset", "merr", "--data", str(data), "--store", str(store), "--profile", "tiny",
            "--workers", "0", "--no-progress"]
    text = runner.invoke(app, args)
    assert text.exit_code == 0, text.output
    again = runner.invoke(app, args + ["--json"])
    assert again.exit_code == 0, again.output
    npy = tmp / "mine"
    npy.mkdir()
    for i, clip in enumerate(sorted(FeatureStore.open(store).clips())):
        np.save(npy / f"{clip}.npy", np.full(16, i, np.float32))
    imported = runner.invoke(app, ["store", "import", str(store), str(npy), "--name", "audio.mine.mean",
                                   "--encoder", "mine", "--modality", "audio"])
    assert imported.exit_code == 0, imported.output
    run = tmp / "run"
    trained = runner.invoke(app, ["train", "--data", str(data), "--store", str(store), "--out", str(run),
                                  "--profile", "tiny", "--steps", "2", "-b", "2", "--no-progress",
                                  "-f", TINY_SETS[0], "-f", TINY_SETS[2], "-f", "audio.mine.mean"])
    assert trained.exit_code == 0, trained.output
    return {"text": text.output, "json": json.loads(again.stdout[again.stdout.index("{"):]), "store": store,
            "train": trained.output, "metrics": json.loads((run / "metrics.json").read_text())}


def test_the_extract_summary_and_its_json_name_the_profile(outputs):
    assert "profile: tiny  (tiny: random tiny encoders, a test fixture; these features say nothing about " \
           "emotion)" in outputs["text"]
    out = outputs["json"]
    assert out["executor"].startswith("nothing to do")          # the rerun: read from the store, no model
    assert out["profile"] == "tiny" and out["profiles"] == {name: "tiny" for name in out["keys"]}
    assert len(out["profiles"]) == 5          # audio.hubert.frames and .mean, local, temporal, global


def test_store_info_names_each_sets_profile_imported_included(outputs):
    st = outputs["store"]
    d = json.loads(runner.invoke(app, ["store", "info", str(st), "--json"]).stdout)
    by_name = {s["name"]: s["profile"] for s in d["sets"]}
    assert by_name == {"audio.hubert.mean": "tiny", "audio.hubert.frames": "tiny", "local.vit_mae.mean": "tiny",
                       "temporal.videomae.mean": "tiny", "global.eva.tokens": "tiny", "audio.mine.mean": "imported"}
    text = runner.invoke(app, ["store", "info", str(st)]).stdout
    assert "profile  tiny (5 sets), imported (1 set)  (tiny: random tiny encoders" in text
    line = next(ln for ln in text.splitlines() if FeatureStore.open(st).resolve("audio.mine.mean") in ln)
    assert line.rstrip().endswith("imported")


def test_the_run_report_names_the_profile_of_its_features(outputs):
    m = outputs["metrics"]
    assert m["feature_profiles"] == {TINY_SETS[0]: "tiny", TINY_SETS[2]: "tiny", "audio.mine.mean": "imported"}
    assert m["feature_profile"] == "tiny (2 sets), imported (1 set)"
    assert "feature profile: tiny (2 sets), imported (1 set)  (tiny: random tiny encoders" in outputs["train"]


# --- missing models: all in one message, nothing left behind -------------------------------

def test_every_missing_paper_model_is_listed_in_one_message_and_no_store_is_left(sample_data, tmp_path,
                                                                                 empty_hf_cache):
    cfg = tmp_path / "five.toml"
    cfg.write_text('[extract.encoders.wav2vec2]\nencoder = "hf"\nmodel = "facebook/wav2vec2-base"\n'
                   'input = "waveform"\n[extract.encoders.mine]\nencoder = "hf"\n'
                   f'model = "{tmp_path / "no-such-folder"}"\ninput = "waveform"\n')
    store = tmp_path / "s.zarr"
    res = runner.invoke(app, ["extract", "--config", str(cfg), "--dataset", "merr", "--data", str(sample_data),
                              "--store", str(store), "--profile", "paper", "--workers", "1"])
    assert res.exit_code == 2, res.output
    msg = res.output
    assert "6 models are missing (offline: HF_HUB_OFFLINE=1 or --offline" in msg
    for model in (*PAPER_MODELS, "facebook/wav2vec2-base"):
        assert re.search(rf"^  - {re.escape(model)}: the \w+ encoder \(\w+\), not in the local HF cache", msg, re.M), model
    assert f"  - {tmp_path / 'no-such-folder'}: the mine encoder (hf), no such folder or weights file" in msg
    assert "[extract.encoders.wav2vec2] model = DIR" in msg
    assert msg.count("hf download") == 1 and "`hf download REPO --local-dir DIR`" in msg
    assert not store.exists()


def test_extract_without_a_profile_is_the_paper_one_offline_on_real_clips(samples_dir, tmp_path, empty_hf_cache,
                                                                         monkeypatch):
    import emollama.pipeline.extraction as extraction

    def no_workers(*a, **kw):  # "at once": before any worker starts or any clip is decoded
        raise AssertionError("an executor was started for a run whose weights are missing")

    monkeypatch.setattr(extraction, "make_executor", no_workers)
    store = tmp_path / "real.zarr"
    res = runner.invoke(app, ["extract", "--dataset", "folder", "--data", str(samples_dir), "--store", str(store),
                              "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "4 models are missing" in res.output and all(m in res.output for m in PAPER_MODELS)
    assert not store.exists()


def test_train_with_the_paper_lm_missing_offline_leaves_no_run_folder(tmp_path, empty_hf_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")                     # --offline alone says it
    (tmp_path / "data").mkdir()
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", "--profile", "paper", "--offline", "--data", str(tmp_path / "data"),
                              "--store", str(tmp_path / "s.zarr"), "--out", str(run), "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "1 model is missing (offline" in res.output and f"  - {LLAMA}: the language model" in res.output
    assert "--llm DIR" in res.output and "`hf download REPO --local-dir DIR`" in res.output
    assert not run.exists()


def test_an_unreachable_hub_fails_after_one_probe_naming_the_models(sample_data, tmp_path):
    """Online (HF_HUB_OFFLINE unset) with the hub on a closed port: one probe, then local files only. Without
    it, huggingface_hub retries each model for about 50 s."""
    env = no_hub_env(tmp_path)
    cli = [sys.executable, "-m", "emollama.pipeline.cli"]
    t0 = time.monotonic()
    ext = subprocess.run(cli + ["extract", "--dataset", "merr", "--data", str(sample_data), "--store",
                                str(tmp_path / "s.zarr"), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    t_extract = time.monotonic() - t0
    assert ext.returncode == 2, ext.stderr
    assert f"the hub at {env['HF_ENDPOINT']} cannot be reached" in ext.stderr
    assert all(m in ext.stderr for m in PAPER_MODELS) and not (tmp_path / "s.zarr").exists()
    t0 = time.monotonic()
    tr = subprocess.run(cli + ["train", "--profile", "paper", "--data", str(sample_data), "--store",
                               str(tmp_path / "s.zarr"), "--out", str(tmp_path / "run"), "--no-progress"],
                        env=env, capture_output=True, text=True, timeout=300)
    t_train = time.monotonic() - t0
    assert tr.returncode == 2, tr.stderr
    assert "cannot be reached" in tr.stderr and LLAMA in tr.stderr and not (tmp_path / "run").exists()
    assert t_extract < 30 and t_train < 30, (t_extract, t_train)   # the whole command, imports included


def test_the_python_loaders_fail_at_once_without_a_hub(tmp_path, monkeypatch):
    import emollama.extract.encoders as E
    from emollama.train.model import MissingModelError, load_llm

    env = no_hub_env(tmp_path)
    for k in ("HF_ENDPOINT", "HF_HOME"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    t0 = time.monotonic()
    with pytest.raises(E.MissingWeightsError, match=r"4 models are missing \(the hub at http://127.0.0.1:\d+ "
                                                    r"cannot be reached"):
        E.load_encoders(E.profile("paper"), device="cpu", home=tmp_path)
    with pytest.raises(MissingModelError, match=r"(?s)Llama-2-7b-chat-hf' \(the hub cannot be reached\).*"
                                                r"`hf download REPO --local-dir DIR`"):
        load_llm(LLAMA)
    assert time.monotonic() - t0 < 15


# --- the probe and the hint ------------------------------------------------------------------

PROBE_BOTH = """
import json, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, HTTPServer
from emollama.extract.sources import hub_reachable as extract_probe
from emollama.train.model import hub_reachable as train_probe

def probe(url):
    os.environ["HF_ENDPOINT"] = url
    return [extract_probe(), train_probe()]

out = {}
for status in (200, 404, 503):
    class Hub(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(status)
            self.end_headers()
        def log_message(self, *args):
            pass
    server = HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out[status] = probe(f"http://127.0.0.1:{server.server_port}")
    server.shutdown()
    server.server_close()
t0 = time.monotonic()
out["closed"] = probe(sys.argv[1])
out["seconds"] = time.monotonic() - t0
print(json.dumps(out))
"""


def test_stage_one_and_stage_two_probe_the_hub_alike(tmp_path):
    """The two probes (train may not import extract's) agree: an answer below 500 is a hub; a server error
    or a closed port is none. Online, in a child: in this process huggingface_hub is offline (conftest)."""
    env = no_hub_env(tmp_path)
    out = subprocess.run([sys.executable, "-c", PROBE_BOTH, env["HF_ENDPOINT"]], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert (got["200"], got["404"], got["503"], got["closed"]) == ([True] * 2, [True] * 2, [False] * 2, [False] * 2)
    assert got["seconds"] < 10


def test_one_download_hint_everywhere_and_the_installed_cli_takes_it():
    from emollama.extract.sources import DOWNLOAD_HINT
    from emollama.train import model

    assert model.DOWNLOAD_HINT == DOWNLOAD_HINT == "`hf download REPO --local-dir DIR`"
    hf = Path(sys.executable).parent / "hf"
    if hf.exists():   # the CLI that huggingface_hub installs
        help_text = subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True,
                                   timeout=120).stdout
        assert "REPO_ID" in help_text and "--local-dir" in help_text
    files = [*REPO.glob("*.md"), *(REPO / "docs").glob("*.md"), REPO / "Makefile"]
    for part in ("extract", "train", "pipeline", "store", "corpora", "scripts"):
        files += (REPO / part).rglob("*.py")
    for f in files:
        text = f.read_text()
        assert "huggingface-cli" not in text, f
        for hit in re.finditer(r"hf download", text):
            assert text[hit.start():].startswith("hf download REPO --local-dir DIR"), (f, text[hit.start():][:60])
