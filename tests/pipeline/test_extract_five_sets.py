"""A fifth feature set end to end: `emollama extract` with the four tiny views plus two generic
Hugging Face encoders (a tiny wav2vec2 and a tiny CLIP vision tower, built locally), then training on
five sets through the normal training entry point."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from emollama.extract.models import ensure_tiny
from emollama.store.cache import default_home
from emollama.extract.sample import write_sample
from emollama.pipeline.cli import app
from emollama.store import FeatureStore

runner = CliRunner()

FIVE = ["local.vit_mae.mean", "temporal.videomae.mean", "audio.hubert.mean", "global.eva.tokens", "wav2vec2.hf.mean"]


@pytest.mark.slow
def test_two_hf_encoders_extract_and_a_run_trains_on_five_sets(tmp_path):
    from emollama.train.config import load_train_config
    from emollama.train.loop import train

    data = write_sample(tmp_path / "data", clips=8, seed=5)
    home = default_home()
    toml = tmp_path / "extract.toml"
    toml.write_text(f"""
[extract.encoders.wav2vec2]
encoder = "hf"
model = "{ensure_tiny('wav2vec2', home)}"
input = "waveform"
pooling = "mean"

[extract.encoders.clip]
encoder = "hf"
model = "{ensure_tiny('clip_vision', home)}"
input = "face_frames"
layer = -2
pooling = ["mean", "cls"]
""")
    store = tmp_path / "store.zarr"
    result = runner.invoke(app, ["extract", "--config", str(toml), "--dataset", "merr", "--data", str(data),
                                 "--store", str(store), "--profile", "tiny", "--workers", "0", "--no-progress",
                                 "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output[result.output.index("{"):])
    assert len(out["ok"]) == 8 and out["failed"] == []
    st = FeatureStore.open(store)
    sets = {spec.name: (key, spec) for key, spec in st.sets().items()}
    assert set(sets) == {"audio.hubert.frames", "audio.hubert.mean", "local.vit_mae.mean", "temporal.videomae.mean",
                         "global.eva.tokens", "wav2vec2.hf.mean", "clip.hf.mean", "clip.hf.cls"}
    for key, _ in sets.values():
        assert st.complete(key) == set(out["ok"])
    w2v = sets["wav2vec2.hf.mean"][1]
    assert (w2v.modality, w2v.encoder, w2v.shape, w2v.layer) == ("wav2vec2", "hf", (28,), "last_hidden_state")
    assert sets["clip.hf.cls"][1].layer == "hidden_states[-2]" and sets["clip.hf.cls"][1].shape == (36,)
    # the set records the whole extraction config, the named encoders included
    recorded = st.set_attrs(sets["wav2vec2.hf.mean"][0])["config"]["extract"]["encoders"]["wav2vec2"]
    assert recorded["encoder"] == "hf" and recorded["input"] == "waveform"

    run = tmp_path / "run"
    cfg = load_train_config(None, {
        "data": {"root": str(data), "store": str(store), "features": FIVE, "standardize": True},
        "model": {"profile": "tiny"}, "lora": {"alpha": 64},
        "optim": {"lr": 3e-3, "min_lr": 1e-5, "warmup_steps": 1, "steps": 3, "batch_size": 2},
        "run": {"out": str(run), "save_every": 1000, "eval_every": 0, "seed": 7},
    })
    res = train(cfg)
    assert [h["step"] for h in res.history] == [1, 2, 3]
    assert all(math.isfinite(h["loss"]) for h in res.history)
    used = json.loads((run / "feature_sets.json").read_text())
    assert sorted(v["name"] for v in used.values()) == sorted(FIVE)
    assert set(used) == {sets[n][0] for n in FIVE}
    projectors = json.loads((run / "projectors.json").read_text())["projectors"]
    assert len(projectors) == 6    # one per vector set, and the EVA tokens' patches + CLS
    assert {p["set_key"] for p in projectors} == set(used)
    assert [p["modality"] for p in projectors if p["set_name"] == "wav2vec2.hf.mean"] == ["wav2vec2"]
