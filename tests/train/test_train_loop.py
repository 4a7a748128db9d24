"""Stage-two mechanics on a small store: exact resume, PEFT/safetensors interop, modality subsets,
NaN guard, refusing pickles, the CLI."""

import json
import pickle

import pytest
import torch

from emollama.train.checkpoint import CheckpointError, latest_checkpoint
from train_helpers import tiny_toml
from emollama.train.loop import TrainingDiverged, train

def n_test(data):
    from emollama.corpora import load_corpus

    return len(load_corpus("merr", data).split("test"))


ALL4 = ["global.eva.tokens", "local.vit_mae.mean", "temporal.videomae.mean", "audio.hubert.mean"]


def losses(result):
    return [h["loss"] for h in result.history]


def test_resume_after_stop_matches_uninterrupted_run_and_same_seed_same_curve(small_store, make_cfg, tmp_path):
    data, store = small_store
    opts = {"optim": {"steps": 8, "batch_size": 2, "grad_accum": 2}, "lora": {"dropout": 0.05, "alpha": 64},
            "data": {"features": ALL4}}
    full = train(make_cfg(data, store, tmp_path / "full", **opts))
    assert len(full.history) == 8 and full.history[-1]["loss"] < full.history[0]["loss"]
    again = train(make_cfg(data, store, tmp_path / "again", **opts))
    assert losses(again) == losses(full)                       # same seed, same curve (bit for bit)

    part = make_cfg(data, store, tmp_path / "part", **opts)
    first = train(part, max_steps=3)
    assert first.step == 3 and latest_checkpoint(tmp_path / "part").name == "step-0000003"
    state = json.loads((latest_checkpoint(tmp_path / "part") / "state.json").read_text())
    assert state["step"] == 3 and state["total_steps"] == 8 and state["position"] == 3 % state["steps_per_epoch"]
    resumed = train(part, resume=True)
    assert resumed.step == 8
    assert max(abs(a - b) for a, b in zip(losses(resumed), losses(full))) < 1e-6
    for name in ("metrics.json", "loss.png", "config.json", "feature_sets.json", "versions.json",
                 "projectors.safetensors", "projectors.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (tmp_path / "part" / name).is_file(), name
    assert list((tmp_path / "part" / "tb").glob("events.out.tfevents.*"))
    keys = json.loads((tmp_path / "part" / "feature_sets.json").read_text())
    assert sorted(v["name"] for v in keys.values()) == sorted(ALL4)


def test_adapter_loads_with_peft_alone_and_projectors_with_safetensors_alone(small_store, make_cfg, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from emollama.train.model import build_model, llm_source

    data, store = small_store
    cfg = make_cfg(data, store, tmp_path / "run", optim={"steps": 3}, data={"features": ALL4})
    train(cfg)
    run = tmp_path / "run"
    # our model, reloaded from the checkpoint through our code
    from emollama.store import FeatureStore
    from emollama.train.checkpoint import load_adapter, load_projectors
    from emollama.train.data import FeatureBatcher, PromptEncoder, TrainData
    from emollama.corpora import load_corpus

    st = FeatureStore.open(store)
    keys = [st.resolve(f) for f in ALL4]
    ours, tok = build_model(cfg, [(k, st.sets()[k]) for k in keys], torch.device("cpu"))
    load_adapter(ours.llm, run)
    load_projectors(ours.projectors, run)
    ours.eval()
    corpus = load_corpus("merr", data)
    td = TrainData(corpus, "test", ["emotion"], PromptEncoder(tok, ours.layout, ["happy", "sad"]),
                   FeatureBatcher.from_store(st, keys))
    batch = td.collate(range(2), 0)
    with torch.no_grad():
        emb = ours.embed(batch)
        expected = ours.logits(batch)

    # the adapter with peft + transformers only
    base = AutoModelForCausalLM.from_pretrained(llm_source(cfg), local_files_only=True)
    peft_model = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        got = peft_model(inputs_embeds=emb, attention_mask=batch.attention_mask).logits
    assert torch.allclose(got, expected, atol=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(inputs_embeds=emb, attention_mask=batch.attention_mask).logits
    assert (plain - expected).abs().max() > 1e-4     # the adapter is trained: it changes the logits

    # the projectors with safetensors only: W ((x - mean) / std) + b, patches grouped 4 by 4
    tensors = load_file(str(run / "projectors.safetensors"))
    meta = json.loads((run / "projectors.json").read_text())
    audio_key = next(p for p in meta["projectors"] if p["set_name"] == "audio.hubert.mean")
    x = batch.features[audio_key["set_key"]]
    n = audio_key["name"]
    manual = ((x - tensors[f"{n}.feature_mean"]) / tensors[f"{n}.feature_std"]) @ tensors[f"{n}.weight"].T + tensors[f"{n}.bias"]
    with torch.no_grad():
        assert torch.allclose(manual, ours.projectors.project(n, x)[:, 0], atol=1e-5)
    patches = next(p for p in meta["projectors"] if p["part"] == "patches")
    assert tensors[f"{patches['name']}.weight"].shape == (64, 4 * 48) and patches["tokens"] == 256
    assert [s[0] for s in meta["layout"]["feature"]][-1].endswith("_cls")


def test_audio_only_from_the_same_store(small_store, make_cfg, tmp_path):
    data, store = small_store
    res = train(make_cfg(data, store, tmp_path / "audio", data={"features": ["audio.hubert.mean"]}))
    meta = json.loads((tmp_path / "audio" / "projectors.json").read_text())
    assert [p["name"] for p in meta["projectors"]] == ["audio_hubert_mean"]
    assert meta["layout"] == {"video": [], "feature": [["audio_hubert_mean", 1]]}
    assert res.params["projectors_total"] == 32 * 64 + 64
    assert res.history[-1]["loss"] < res.history[0]["loss"] and res.metrics["n"] == n_test(data) > 0


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(small_store, make_cfg, tmp_path,
                                                                                 monkeypatch):
    from emollama.train.model import EmoModel

    data, store = small_store
    calls = {"n": 0}
    real = EmoModel.forward

    def poisoned(self, batch):
        calls["n"] += 1
        s, n = real(self, batch)
        return (s * float("nan"), n) if calls["n"] == 4 else (s, n)

    monkeypatch.setattr(EmoModel, "forward", poisoned)
    run = tmp_path / "nan"
    cfg = make_cfg(data, store, run, data={"features": ["audio.hubert.mean"]}, run={"save_every": 2})
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4.*last good checkpoint is .*step-0000002"):
        train(cfg)
    assert latest_checkpoint(run).name == "step-0000002"
    good = json.loads((latest_checkpoint(run) / "state.json").read_text())
    assert good["step"] == 2 and all(h["loss"] == h["loss"] for h in good["history"])
    monkeypatch.setattr(EmoModel, "forward", real)
    resumed = train(cfg, resume=True)          # the last good checkpoint resumes
    assert resumed.step == 6


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED_BY_PICKLE",))


@pytest.mark.parametrize("victim", ["optimizer.pt", "projectors.safetensors", "adapter/adapter_model.safetensors"])
def test_a_planted_pickle_is_refused(small_store, make_cfg, tmp_path, monkeypatch, victim):
    data, store = small_store
    run = tmp_path / "run"
    cfg = make_cfg(data, store, run, data={"features": ["audio.hubert.mean"]}, optim={"steps": 2})
    train(cfg)
    monkeypatch.chdir(tmp_path)
    (latest_checkpoint(run) / victim).write_bytes(pickle.dumps({"state": _Evil()}))
    with pytest.raises(CheckpointError, match="refusing to load"):
        train(cfg, resume=True)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_cli_train_and_params(small_store, tmp_path):
    from typer.testing import CliRunner

    from emollama.pipeline.cli import app

    data, store = small_store
    cfg = tmp_path / "t.toml"
    cfg.write_text(f"""
[data]
root = "{data}"
store = "{store}"
features = ["audio.hubert.mean", "temporal.videomae.mean"]
tasks = ["emotion", "reason_v2"]
standardize = true
[model]
profile = "tiny"
[optim]
lr = 3e-3
steps = 3
batch_size = 4
[run]
out = "{tmp_path / 'cli'}"
""")
    r = CliRunner().invoke(app, ["train", "-c", str(cfg), "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["step"] == 3 and out["metrics"]["n"] == n_test(data) and 0 <= out["metrics"]["accuracy"] <= 1
    saved = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert saved["data"]["tasks"] == ["emotion", "reason_v2"] and saved["lora"]["r"] == 64

    bad = CliRunner().invoke(app, ["train", "--profile", "huge", "--lr", "-1"])
    assert bad.exit_code == 2
    for problem in ("data.root is empty", "data.store is empty", "model.profile", "optim.lr", "run.out"):
        assert problem in bad.output

    r = CliRunner().invoke(app, ["params", "--profile", "paper", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["lora"] == 32 * 2 * 2 * 64 * 4096 == 33_554_432
    assert p["projectors_total"] == (5632 * 4096 + 4096) + (1408 * 4096 + 4096) + 3 * (1024 * 4096 + 4096)
    assert 41e6 < p["projectors_total"] < 42e6
    assert abs(p["lora_percent_peft"] - 100 * 33_554_432 / (6_738_415_616 + 33_554_432)) < 1e-9
    assert round(p["lora_percent_peft"], 3) == 0.495


@pytest.mark.slow
def test_killed_mid_run_then_resumed_gives_the_uninterrupted_curve(small_store, make_cfg, tmp_path):
    """SIGKILL a real `emollama train` process after its second checkpoint, then --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data, store = small_store
    opts = dict(optim={"steps": 30, "batch_size": 4}, data={"features": ["audio.hubert.mean"]},
                run={"save_every": 2})
    full = train(make_cfg(data, store, tmp_path / "full", **opts))
    run = tmp_path / "killed"
    toml = tiny_toml(tmp_path / "k.toml", data, store, run, steps=30)
    proc = subprocess.Popen([sys.executable, "-m", "emollama.pipeline.cli", "train", "-c", str(toml), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "checkpoints" / "step-0000004").exists():
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        killed_at = latest_checkpoint(run)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and killed_at is not None and killed_at.name < "step-0000030"
    resumed = train(make_cfg(data, store, run, **opts), resume=True)
    assert resumed.step == 30
    assert max(abs(a - b) for a, b in zip(losses(resumed), losses(full))) < 1e-6


def test_gradient_checkpointing_gives_the_same_gradients(small_store, make_cfg, tmp_path):
    from emollama.store import FeatureStore
    from emollama.corpora import load_corpus
    from emollama.train.data import FeatureBatcher, PromptEncoder, TrainData
    from emollama.train.model import build_model

    data, store = small_store
    st = FeatureStore.open(store)
    keys = [st.resolve(f) for f in ALL4]
    grads = []
    for gc in (False, True):
        cfg = make_cfg(data, store, tmp_path / "gc", model={"gradient_checkpointing": gc}, lora={"dropout": 0.0})
        model, tok = build_model(cfg, [(k, st.sets()[k]) for k in keys], torch.device("cpu"))
        model.train()
        prompts = PromptEncoder(tok, model.layout, ["happy", "sad", "neutral", "angry", "worried", "surprise"])
        td = TrainData(load_corpus("merr", data), "train", ["emotion", "reason"], prompts,
                       FeatureBatcher.from_store(st, keys))
        s, n = model(td.collate(range(4), 0))
        (s / n).backward()
        grads.append({name: p.grad.clone() for name, p in model.trainable()})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])
    assert any(g.abs().sum() > 0 for g in grads[0].values())
