"""The released Emotion-LLaMA / MiniGPT-v2 checkpoints: synthetic files with the exact key layout at tiny
sizes, imported and run, against a reference forward written here from the facts alone (LayerNorm per
EVA token, CLS split, raster-order grouping by 4, feature order local, temporal, audio, CLS, the
released prompt's tokens, LoRA W + alpha/r B A on q_proj and v_proj)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

H, D_EVA, D_LOCAL, D_TEMP, D_AUDIO, R, ALPHA = 64, 48, 40, 24, 32, 64, 16
EMOTION_INSTR = ("Please determine which emotion label in the video represents: happy, sad, neutral, angry, "
                 "worried, surprise, fear, contempt, doubt.")


def _lora_keys(layers: int):
    for i in range(layers):
        for m in ("q_proj", "v_proj"):
            yield i, m


def released_state(*, kind: str = "emotion-llama", hidden=H, eva=D_EVA, dims=(D_LOCAL, D_TEMP, D_AUDIO), layers=2,
                   r=R, device=None, seed=0) -> dict[str, torch.Tensor]:
    """A state dict with the released key names and shapes (random values; meta tensors if device='meta')."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, std=0.05):
        if device == "meta":
            return torch.empty(*shape, device="meta")
        return torch.randn(*shape, generator=g) * std

    s = {"llama_proj.weight": t(hidden, 4 * eva), "llama_proj.bias": t(hidden)}
    if kind == "emotion-llama":
        s["cls_tk_llama_proj.weight"], s["cls_tk_llama_proj.bias"] = t(hidden, eva), t(hidden)
        for j, d in enumerate(dims, 1):
            s[f"feats_llama_proj{j}.weight"], s[f"feats_llama_proj{j}.bias"] = t(hidden, d), t(hidden)
    for i, m in _lora_keys(layers):
        p = f"llama_model.base_model.model.model.layers.{i}.self_attn.{m}"
        s[f"{p}.lora_A.weight"] = t(r, hidden)
        s[f"{p}.lora_B.weight"] = t(hidden, r)
    for i in range(layers):
        s[f"llama_model.base_model.model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = t(hidden // 8)
    for j in range(36):   # the unused module the released code saves
        s[f"attention.block{j // 4}.w{j % 4}"] = t(8, 8)
    return s


def write_released(path: Path, state) -> Path:
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "config": {"run": {"seed": 42}},
                "scaler": None, "epoch": 29}, path)
    return path


@pytest.fixture(scope="module")
def tiny_llm():
    from emollama.store.cache import default_home
    from emollama.train.tiny import ensure_tiny_llm

    return ensure_tiny_llm(default_home())


def reference_logits(llm_dir: Path, state, feats: dict, subtitle: str, answer: str, fresh: dict | None = None):
    """The model of the facts, written out: returns (logits [1, L, V], token ids)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True, dtype=torch.float32).eval()
    get = lambda k: (fresh or {}).get(k, state.get(k))   # noqa: E731
    with torch.no_grad():
        for i, m in _lora_keys(base.config.num_hidden_layers):
            p = f"llama_model.base_model.model.model.layers.{i}.self_attn.{m}"
            lin = getattr(base.model.layers[i].self_attn, m)
            lin.weight += (ALPHA / R) * state[f"{p}.lora_B.weight"] @ state[f"{p}.lora_A.weight"]
    pieces = lambda s: tok(s, add_special_tokens=False)["input_ids"]   # noqa: E731
    head = [tok.bos_token_id] + pieces("[INST] <video>")
    mid = pieces("</video> <feature>")
    tail = pieces(f"</feature> The person in video says: {subtitle}.  [emotion] {EMOTION_INSTR}  [/INST]")
    ans = pieces(answer) + [tok.eos_token_id]
    emb = base.get_input_embeddings()
    g = F.layer_norm(feats["global"][0].float(), (D_EVA,), eps=1e-5)        # [1025, D]: every token, no affine
    cls = g[0] @ get("cls_tk_llama_proj.weight").T + get("cls_tk_llama_proj.bias")
    patches = g[1:].reshape(256, 4 * D_EVA) @ get("llama_proj.weight").T + get("llama_proj.bias")
    one = [feats[v][0] @ get(f"feats_llama_proj{j}.weight").T + get(f"feats_llama_proj{j}.bias")
           for j, v in ((1, "local"), (2, "temporal"), (3, "audio"))]
    e = lambda ids: emb(torch.tensor(ids))   # noqa: E731
    seq = torch.cat([e(head), patches, e(mid), torch.stack(one + [cls]), e(tail + ans)])
    ids = head + [-1] * 256 + mid + [-1] * 4 + tail + ans
    with torch.no_grad():
        return base(inputs_embeds=seq[None]).logits, ids


def _features(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"global": torch.randn(1, 1025, D_EVA, generator=g) * 3 + 1, "local": torch.randn(1, D_LOCAL, generator=g),
            "temporal": torch.randn(1, D_TEMP, generator=g), "audio": torch.randn(1, D_AUDIO, generator=g)}


def _batch(run_or_model, layout, tokenizer, keys_by_modality, feats, subtitle, answer, **kw):
    from emollama.train.data import pad_encoded
    from emollama.train.prompt import encode

    enc = encode(tokenizer, layout, subtitle, "emotion", EMOTION_INSTR, answer, style="emotion-llama", **kw)
    t = pad_encoded([enc], tokenizer.pad_token_id)
    t["features"] = {k: feats[m] for m, k in keys_by_modality.items()}
    return t, enc


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_imported_checkpoint_equals_the_reference_forward(tmp_path, tiny_llm):
    from emollama.pipeline.cli import app
    from emollama.train.run import load_run
    from typer.testing import CliRunner

    state = released_state()
    ck = write_released(tmp_path / "Emotion_LLaMA.pth", state)
    res = CliRunner().invoke(app, ["import-checkpoint", str(ck), "--out", str(tmp_path / "run"), "--profile", "tiny"])
    assert res.exit_code == 0, res.output
    assert "18 tensors used (5 projectors, 8 LoRA tensors), 38 ignored" in res.output
    info = json.loads((tmp_path / "run" / "imported.json").read_text())
    assert info["kind"] == "emotion-llama" and len(info["ignored"]) == 38
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"]["prompt"] == "emotion-llama" and cfg["model"]["ln_vision"] and not cfg["data"]["standardize"]

    run = load_run(tmp_path / "run", device="cpu")
    keys = {run.specs[k].modality: k for k in run.feature_keys}
    feats = _features()
    subtitle, answer = "Well, I can't believe it!", "happy"
    batch, enc = _batch(run, run.model.layout, run.tokenizer, keys, feats, subtitle, answer)
    with torch.no_grad():
        ours = run.model.logits(batch)
    ref, ids = reference_logits(tiny_llm, state, feats, subtitle, answer)
    assert [i if not f else -1 for i, f in zip(enc.ids, enc.feat)] == ids
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-5
    # the answer and </s> carry the loss, nothing else
    assert [l for l in enc.labels if l != -100] == ids[-len(run.tokenizer(answer, add_special_tokens=False)["input_ids"]) - 1:]
    # the adapter is PEFT's own format
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llm, local_files_only=True)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapter"))
    a = dict(peft.named_parameters())["base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight"]
    assert torch.equal(a, state["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"])


def test_public_eval_layout_puts_all_260_embeddings_at_video(tiny_llm):
    from transformers import AutoTokenizer

    from emollama.train.model import layout_for, projector_specs
    from emollama.train.prompt import encode
    from emollama.train.released import _binding_specs

    tok = AutoTokenizer.from_pretrained(tiny_llm, local_files_only=True)
    sets = _binding_specs({"eva_dim": D_EVA, "local": D_LOCAL, "temporal": D_TEMP, "audio": D_AUDIO}, "emotion-llama", {})
    layout = layout_for(projector_specs(sets, H))
    enc = encode(tok, layout, "Hi", "emotion", EMOTION_INSTR, None, style="emotion-llama", eval_layout="public-eval")
    pieces = lambda s: tok(s, add_special_tokens=False)["input_ids"]   # noqa: E731
    want = ([tok.bos_token_id] + pieces("[INST] <video>") + [-1] * 260
            + pieces(f"</video> <feature><FeatureHere></feature> The person in video says: Hi.  [emotion] "
                     f"{EMOTION_INSTR}  [/INST]"))
    assert [i if not f else -1 for i, f in zip(enc.ids, enc.feat)] == want
    with pytest.raises(ValueError, match="only for the emotion-llama prompt style"):
        encode(tok, layout, "Hi", "emotion", "x", None, style="emollama", eval_layout="public-eval")


def test_minigpt_v2_start_equals_the_reference(tmp_path, tiny_llm):
    from emollama.store.spec import FeatureSpec
    from emollama.train.config import load_train_config
    from emollama.train.model import build_model
    from emollama.train.released import ReleasedCheckpointError, init_from_minigpt_v2

    state = released_state(kind="minigpt-v2", seed=3)
    ck = write_released(tmp_path / "minigptv2_checkpoint.pth", state)

    def spec(name, modality, shape):
        return FeatureSpec(name=name, modality=modality, encoder="x", weights="w", layer="", pooling="mean",
                           shape=shape)

    sets = [("kg", spec("global.eva.tokens", "global", (1025, D_EVA))), ("kl", spec("local.x", "local", (D_LOCAL,))),
            ("kt", spec("temporal.x", "temporal", (D_TEMP,))), ("ka", spec("audio.x", "audio", (D_AUDIO,)))]
    data = tmp_path / "data"
    data.mkdir()
    cfg = load_train_config(None, {"data": {"root": str(data), "store": "s.zarr", "prompt": "emotion-llama"},
                                   "model": {"profile": "tiny"}, "run": {"out": str(tmp_path / "r")},
                                   "init": {"minigpt_v2": str(ck)}})
    model, tok = build_model(cfg, sets, torch.device("cpu"))
    fresh = {f"{n}.{p}": getattr(model.projectors.layers[name].linear, p).detach().clone()
             for n, name in (("cls_tk_llama_proj", "global_eva_tokens_cls"), ("feats_llama_proj1", "local_x"),
                             ("feats_llama_proj2", "temporal_x"), ("feats_llama_proj3", "audio_x")) for p in ("weight", "bias")}
    mapped = init_from_minigpt_v2(model, ck)
    assert sorted(mapped.projectors) == ["global_eva_tokens_patches"]
    assert mapped.fresh == ["audio_x", "global_eva_tokens_cls", "local_x", "temporal_x"]
    assert len(mapped.lora) == 8 and len(mapped.ignored) == 38
    model.eval()
    feats = _features(2)
    batch, _ = _batch(model, model.layout, tok, {"global": "kg", "local": "kl", "temporal": "kt", "audio": "ka"},
                      feats, "Fine", "sad")
    with torch.no_grad():
        ours = model.logits(batch)
    ref, _ = reference_logits(tiny_llm, state, feats, "Fine", "sad", fresh=fresh)
    assert (ours - ref).abs().max().item() < 1e-5
    # a released Emotion-LLaMA file is not a MiniGPT-v2 start
    other = write_released(tmp_path / "Emotion_LLaMA.pth", released_state())
    with pytest.raises(ReleasedCheckpointError, match="not MiniGPT-v2's"):
        init_from_minigpt_v2(model, other)
    # the start needs raw ln_vision tokens
    with pytest.raises(ValueError, match="data.standardize = false"):
        load_train_config(None, {"data": {"root": str(data), "store": "s", "standardize": True},
                                 "run": {"out": "r"}, "init": {"minigpt_v2": str(ck)}})


def test_paper_size_layout_maps_completely_on_the_meta_device():
    from emollama.train.config import PAPER_FEATURES, TrainConfig
    from emollama.train.params import LLAMA2_7B, count_for_profile, meta_model, paper_sets
    from emollama.train.released import ReleasedCheckpointError, map_released

    state = released_state(hidden=4096, eva=1408, dims=(1024, 1024, 1024), layers=32, device="meta")
    model = meta_model(LLAMA2_7B, paper_sets(PAPER_FEATURES), TrainConfig())
    mapped = map_released(state, model)
    assert len(mapped.used) == 10 + 128 and len(mapped.lora) == 128 and not mapped.fresh
    assert len(mapped.ignored) == 36 + 32 and all("unused module" in mapped.ignored[f"attention.block{j}.w0"]
                                                    for j in range(9))
    assert mapped.projectors["global_eva_tokens_patches"]["weight"].shape == (4096, 5632)
    counts = count_for_profile("paper")
    assert counts["lora"] == 33_554_432 and counts["projectors_total"] == 41_439_232
    broken = dict(state)
    del broken["llama_model.base_model.model.model.layers.7.self_attn.v_proj.lora_B.weight"]
    broken["feats_llama_proj4.weight"] = torch.empty(4096, 1024, device="meta")
    broken["cls_tk_llama_proj.weight"] = torch.empty(4096, 1024, device="meta")
    with pytest.raises(ReleasedCheckpointError) as e:
        map_released(broken, model, source="Emotion_LLaMA.pth")
    msg = str(e.value)
    assert "missing key llama_model.base_model.model.model.layers.7.self_attn.v_proj.lora_B.weight" in msg
    assert "unexpected key feats_llama_proj4.weight" in msg
    assert "cls_tk_llama_proj.weight: shape [4096, 1024]" in msg and "3 problem(s)" in msg


def test_import_refuses_code_pickles_and_mismatched_lms(tmp_path):
    from emollama.pipeline.cli import app
    from typer.testing import CliRunner

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": {"x": Evil()}}, tmp_path / "evil.pth")
    runner = CliRunner()
    res = runner.invoke(app, ["import-checkpoint", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "r1"),
                              "--profile", "tiny"])
    assert res.exit_code == 2 and "refusing to load it" in res.output and not (tmp_path / "r1").exists()
    ck = write_released(tmp_path / "big.pth", released_state(hidden=96, layers=2))
    res = runner.invoke(app, ["import-checkpoint", str(ck), "--out", str(tmp_path / "r2"), "--profile", "tiny"])
    assert res.exit_code == 2 and "hidden size 96" in res.output and "has 64" in res.output


def _released_folders(root: Path, clips, missing_audio: str) -> dict[str, Path]:
    import numpy as np

    g = np.random.default_rng(5)
    out = {}
    for folder in ("mae_340_UTT", "maeV_399_UTT", "HL-UTT"):
        d = root / folder
        d.mkdir(parents=True)
        for c in clips:
            if folder == "HL-UTT" and c == missing_audio:
                continue
            np.save(d / f"{c}.npy", g.standard_normal((1, 1024)).astype(np.float32))
        out[folder] = d
    return out


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_imported_run_on_a_mixed_store_binds_without_flags(tmp_path, small_store):
    """Released local/temporal/audio features imported beside our extracted EVA set: eval needs no flag, a
    clip missing from an imported set is named and never re-extracted; params and init-from take the run."""
    import shutil

    from emollama.pipeline.cli import app
    from emollama.store import FeatureStore
    from emollama.corpora import load_corpus
    from typer.testing import CliRunner

    data, store0 = small_store
    store = tmp_path / "mixed.zarr"
    shutil.copytree(store0, store)
    corpus = load_corpus("merr", data)
    ids = [c.id for c in corpus.clips]
    test_ids = [c.id for c in corpus.split("test") if c.label]
    lost = test_ids[0]
    runner = CliRunner()
    for folder in _released_folders(tmp_path / "MER2023", ids, lost).values():
        res = runner.invoke(app, ["store", "import", str(store), str(folder)])
        assert res.exit_code == 0, res.output
    ck = write_released(tmp_path / "Emotion_LLaMA.pth", released_state(dims=(1024, 1024, 1024)))
    run = tmp_path / "released"
    res = runner.invoke(app, ["import-checkpoint", str(ck), "--out", str(run), "--profile", "tiny"])
    assert res.exit_code == 0, res.output

    before = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    res = runner.invoke(app, ["eval", "--run", str(run), "--dataset", "merr", "--data", str(data), "--store", str(store),
                              "--split", "test", "--max-new-tokens", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert out["n"] == len(test_ids) - 1 and out["missing"] == [lost]
    assert out["extraction"]["not_in_imported_sets"] == {"audio.hl_utt.released": [lost]}
    assert out["extraction"]["extracted"] == 0
    assert {"closed_set", "generated", "public"} <= set(out) and out["layout"] == "trained"
    assert sum(map(sum, out["public"]["confusion"])) == out["n"]
    after = sorted(p.relative_to(store) for p in store.rglob("*") if p.is_file())
    assert after == before                                   # nothing was extracted or written
    st = FeatureStore.open(str(store), create=False)
    assert lost not in st.complete(st.resolve("audio.hl_utt.released"))
    # the public evaluation layout, and a flag that picks a set explicitly
    res = runner.invoke(app, ["eval", "--run", str(run), "--dataset", "merr", "--data", str(data), "--store", str(store),
                              "--split", "test", "--no-generate", "--layout", "public-eval",
                              "--feature", "audio=audio.hl_utt.released", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["layout"] == "public-eval"
    res = runner.invoke(app, ["eval", "--run", str(run), "--dataset", "merr", "--data", str(data), "--store", str(store),
                              "--split", "test", "--feature", "audio=audio.hubert.mean"])
    assert res.exit_code == 2 and "needs audio [1024]" in res.output

    res = runner.invoke(app, ["params", "--run", str(run), "--json"])
    assert res.exit_code == 0, res.output
    counts = json.loads(res.output)
    assert counts["lora"] == 2 * 2 * 2 * R * H and counts["projectors_total"] == (
        (4 * D_EVA + 1) * H + (D_EVA + 1) * H + 3 * (1024 + 1) * H)

    # train --init-from the imported run, reading the released sets by their own names
    res = runner.invoke(app, ["train", "--data", str(data), "--store", str(store), "--out", str(tmp_path / "ft"),
                              "--profile", "tiny", "--init-from", str(run), "--max-steps", "1", "--steps", "1",
                              "-f", "global.eva.tokens", "-f", "local.mae_340_utt.released",
                              "-f", "temporal.maev_399_utt.released", "-f", "audio.hl_utt.released",
                              "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    from safetensors.torch import load_file

    a, b = load_file(str(run / "projectors.safetensors")), load_file(str(tmp_path / "ft" / "projectors.safetensors"))
    # the released projectors were taken by role (one AdamW step at lr 1e-5 moves each weight by ~1e-5;
    # fresh ones would differ by ~0.05)
    for mine, theirs in (("local_mae_340_utt_released", "local_vit_mae_mean"),
                         ("audio_hl_utt_released", "audio_hubert_mean"),
                         ("global_eva_tokens_patches", "global_eva_tokens_patches")):
        torch.testing.assert_close(b[f"{mine}.weight"], a[f"{theirs}.weight"], atol=3e-5, rtol=0)
