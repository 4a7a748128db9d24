"""The frozen encoders: tiny profile builds, identities, shapes, determinism, batching, offline errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from emollama.extract import encoders as E
from emollama.extract.encoders import VIEWS
from emollama.extract.models import TINY_DIMS, build_model, ensure_tiny

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("emollama-home")


@pytest.fixture(scope="module")
def encs(home) -> dict[str, E.Encoder]:
    return E.load_encoders(E.profile("tiny", home=home), device="cpu", offline=True, batch_size=3, home=home)


def _inputs(view: str, n: int, seed: int = 0) -> list:
    """n random inputs of the kind the view's encoder declares."""
    rng = np.random.default_rng(seed)
    make = {
        "waveform": lambda: [rng.standard_normal(int(16000 * s)).astype(np.float32) * 0.1
                             for s in rng.uniform(0.5, 3.0, n)],
        "face_frames": lambda: [rng.integers(0, 256, (int(k), 224, 224, 3), dtype=np.uint8)
                                for k in rng.integers(1, 5, n)],
        "face_clip": lambda: [rng.integers(0, 256, (16, 224, 224, 3), dtype=np.uint8) for _ in range(n)],
        "frame": lambda: [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8)
                          for h, w in zip(rng.integers(120, 500, n), rng.integers(160, 700, n))],
    }
    return make[E.encoder_class(E.VIEW_ENCODERS[view]).input]()


def _shape_ok(declared: tuple, actual: tuple) -> bool:
    return len(declared) == len(actual) and all(d is None or d == a for d, a in zip(declared, actual))


# --- profiles, building, identity ----------------------------------------------------------

def test_unknown_profile_lists_names():
    with pytest.raises(ValueError) as e:
        E.profile("nope")
    assert "paper" in str(e.value) and "tiny" in str(e.value)


def test_paper_profile_names_hub_ids():
    cfg = E.profile("paper")
    assert cfg.names == VIEWS and [e.encoder for e in cfg] == ["hubert", "vit_mae", "videomae", "eva"]
    assert cfg.source("audio") == E.ModelSource("TencentGameMate/chinese-hubert-large")
    assert cfg.source("global").model.startswith("timm/eva_giant_patch14")
    assert E.EncodersConfig.from_dict(cfg.to_dict()) == cfg


def test_config_from_dict_overrides_one_view(tmp_path):
    (tmp_path / "my-hubert").mkdir()
    cfg = E.EncodersConfig.from_dict({"audio": "my-hubert", "global": {"model": "org/eva", "revision": "v1"}},
                                     base=tmp_path)
    assert cfg.source("audio").model == str((tmp_path / "my-hubert").resolve())
    assert cfg.source("global") == E.ModelSource("org/eva", "v1")
    assert cfg.source("local") == E.profile("paper").source("local")
    with pytest.raises(ValueError, match="not one of the profile's views"):
        E.EncodersConfig.from_dict({"video": "x/y"})


def test_tiny_builds_are_byte_identical_and_identity_tracks_weights(home, tmp_path):
    other = tmp_path / "other-home"
    a = E.profile("tiny", home=home)
    b = E.profile("tiny", home=other)
    for view in VIEWS:
        assert Path(a.source(view).model) == home / "models" / "tiny" / view
        ida = E.weights_identity(a.source(view), offline=True, home=home)
        idb = E.weights_identity(b.source(view), offline=True, home=other)
        assert ida.startswith("sha256:") and len(ida) == 7 + 64
        assert ida == idb, view
    assert len({E.weights_identity(a.source(v), offline=True, home=home) for v in VIEWS}) == 4
    # change one weight: the identity changes (the hash cache notices the new size/mtime)
    from safetensors.numpy import load_file, save_file

    changed = tmp_path / "changed"
    shutil.copytree(other / "models" / "tiny" / "audio", changed)
    tensors = load_file(changed / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + np.float32(1e-3)
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    assert E.weights_identity(E.ModelSource(str(changed)), offline=True, home=home) != \
        E.weights_identity(a.source("audio"), offline=True, home=home)
    assert (home / "hashes.json").is_file()


def test_ensure_tiny_is_reused_not_rebuilt(home):
    folder = ensure_tiny("local", home)
    before = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny("local", home) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == before
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no leftover temp folders


def test_concurrent_tiny_builds_are_safe(tmp_path):
    code = ("import sys; from pathlib import Path; from emollama.extract.models import ensure_tiny; "
            "print(ensure_tiny('temporal', Path(sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    folder = tmp_path / "models" / "tiny" / "temporal"
    assert {o[0].strip() for o in outs} == {str(folder)}
    assert sorted(p.name for p in folder.iterdir()) == [".emollama-tiny-files.json", "config.json", "emollama-tiny.json",
                                                        "model.safetensors"]   # the file list checks the build
    assert [p.name for p in folder.parent.iterdir()] == ["temporal"]


def test_reload_matches_the_in_memory_model_exactly(encs):
    for view in VIEWS:
        fresh = E.wrap_model(view, build_model(view, "tiny"), weights="mem", device="cpu")
        x = _inputs(view, 2, seed=5)
        got, want = encs[view].encode(x), fresh.encode(x)
        for g, w in zip(got, want):
            for k in w:
                np.testing.assert_array_equal(g[k], w[k], err_msg=f"{view}/{k}")


# --- outputs ------------------------------------------------------------------------------

def test_declared_attributes_and_output_shapes(encs):
    names = {"audio": "hubert", "local": "vit_mae", "temporal": "videomae", "global": "eva"}
    for view, enc in encs.items():
        assert (enc.modality, enc.name, enc.dim) == (view, names[view], TINY_DIMS[view])
        assert enc.weights.startswith("sha256:")
        out = enc.encode(_inputs(view, 3))
        assert len(out) == 3
        for o in out:
            assert set(o) == set(enc.outputs)
            for k, a in o.items():
                assert a.dtype == np.float32 and np.isfinite(a).all()
                assert _shape_ok(enc.outputs[k].shape, a.shape), (view, k, a.shape)
        import json
        json.dumps(enc.describe())  # JSON-able for the store spec
    assert encs["audio"].frame_rate == 50.0
    assert encs["global"].outputs["tokens"].shape == (1025, TINY_DIMS["global"])
    assert encs["global"].layer == "blocks[:2]" and encs["global"].params["blocks"] == 2
    assert encs["temporal"].params["tokens"] == 1568


def test_deterministic_and_batch_independent(encs):
    for view, enc in encs.items():
        batch = _inputs(view, 5, seed=1)  # batch_size 3: crosses a chunk boundary
        together = enc.encode(batch)
        again = enc.encode(batch)
        for i, x in enumerate(batch):
            alone = enc.encode([x])[0]
            for k in alone:
                np.testing.assert_array_equal(together[i][k], again[i][k], err_msg=f"{view}/{k} not deterministic")
                np.testing.assert_allclose(together[i][k], alone[k], atol=1e-5, rtol=1e-4,
                                           err_msg=f"{view}/{k} depends on batch mates")


def test_local_keeps_patch_order_without_masking(encs):
    """The fixed noise ramp: no patch masked, ids_restore is the identity, output = patch-token mean."""
    import torch

    enc = encs["local"]
    crop = _inputs("local", 1, seed=3)[0][:1]
    x = enc._pixels(crop, enc.mean, enc.std)
    noise = torch.arange(enc.n_patches, dtype=torch.float32)[None]
    with torch.inference_mode():
        ref = enc.model(pixel_values=x, noise=noise)
    assert ref.mask.sum() == 0
    assert torch.equal(ref.ids_restore[0], torch.arange(enc.n_patches))
    np.testing.assert_allclose(enc.encode([crop])[0]["mean"], ref.last_hidden_state[0, 1:].mean(0).numpy(),
                               atol=1e-6)


def test_audio_frames_follow_the_50hz_grid_and_long_audio_is_windowed(encs):
    enc = encs["audio"]
    rng = np.random.default_rng(2)
    long = rng.standard_normal(16000 * 70).astype(np.float32)
    out = enc.encode([long])[0]
    assert out["frames"].shape == ((long.size - 400) // 320 + 1, enc.dim) == (3499, enc.dim)
    # a window boundary leaves the frames before it untouched: the first 30 s of a 70 s clip match a
    # 30 s clip (without the per-clip normalisation, which depends on the whole clip)
    raw = E.HubertEncoder(enc.model, weights=enc.weights, normalize=False, device="cpu")
    head = raw.encode([long[: 16000 * 30 + 80]])[0]["frames"]
    assert head.shape[0] == 1500
    np.testing.assert_allclose(raw.encode([long])[0]["frames"][:1500], head, atol=1e-5)


def test_long_and_short_audio_batched_together_match_alone(encs):
    enc = encs["audio"]
    rng = np.random.default_rng(4)
    clips = [rng.standard_normal(int(16000 * s)).astype(np.float32) for s in (65.0, 0.02, 31.5, 2.0)]
    together = enc.encode(clips)
    for clip, t in zip(clips, together):
        alone = enc.encode([clip])[0]
        assert t["frames"].shape == alone["frames"].shape
        np.testing.assert_allclose(t["frames"], alone["frames"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 50, 399, 400, 1600])
def test_very_short_audio(encs, n):
    out = encs["audio"].encode([np.random.default_rng(n).standard_normal(n).astype(np.float32)])[0]
    assert out["frames"].shape == (max(1, (max(n, 400) - 400) // 320 + 1), encs["audio"].dim)
    assert np.isfinite(out["mean"]).all()


def test_bad_inputs_say_what_is_wrong(encs):
    with pytest.raises(ValueError, match="empty"):
        encs["audio"].encode([np.zeros(0, np.float32)])
    with pytest.raises(ValueError, match="mono"):
        encs["audio"].encode([np.zeros((2, 1600), np.float32)])
    with pytest.raises(ValueError, match="16"):
        encs["temporal"].encode([np.zeros((8, 224, 224, 3), np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        encs["global"].encode([np.zeros((64, 64, 3), np.float32)])


def test_eva_hub_checkpoint_at_224_loads_at_448(tmp_path):
    """Hub EVA checkpoints are trained at 224: loading at 448 resamples the position embedding."""
    import timm
    from timm.models import save_for_hf

    from emollama.extract.models import EVA_ARCH, eva_args

    args = dict(eva_args("tiny"), img_size=224)
    save_for_hf(timm.create_model(EVA_ARCH, **args), str(tmp_path / "eva224"), safe_serialization=True)
    enc = E.load_encoder("global", E.ModelSource(str(tmp_path / "eva224")), device="cpu", offline=True,
                         home=tmp_path)
    assert enc.outputs["tokens"].shape == (1025, TINY_DIMS["global"])
    assert enc.encode(_inputs("global", 1))[0]["tokens"].shape == (1025, TINY_DIMS["global"])


# --- offline ------------------------------------------------------------------------------

def test_offline_missing_hub_checkpoint_fails_at_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    cfg = E.profile("paper")
    with pytest.raises(E.MissingWeightsError) as e:
        E.load_encoders(cfg, device="cpu", home=tmp_path)
    msg = str(e.value)
    assert "TencentGameMate/chinese-hubert-large" in msg and "hf download" in msg
    with pytest.raises(E.MissingWeightsError, match="timm/eva_giant"):
        E.load_encoder("global", cfg.source("global"), device="cpu", home=tmp_path)
    with pytest.raises(E.MissingWeightsError, match="facebook/vit-mae-large"):
        E.weights_identity(cfg.source("local"), offline=True)


def test_offline_hub_id_loads_from_the_hf_cache(monkeypatch, tmp_path, home):
    """A hub id whose snapshot is in the HF cache loads offline; its identity names the commit."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-videomae"
    shutil.copytree(ensure_tiny("temporal", home), repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    src = E.ModelSource("someone/tiny-videomae")
    assert E.weights_identity(src, offline=True) == f"hub:someone/tiny-videomae@{sha}"
    enc = E.load_encoder("temporal", src, device="cpu", home=home)
    assert enc.weights == f"hub:someone/tiny-videomae@{sha}" and enc.dim == TINY_DIMS["temporal"]


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        E.weights_identity(E.ModelSource(str(tmp_path / "nowhere")), offline=True)


def test_import_is_cheap_and_side_effect_free():
    code = "import sys, emollama.extract.encoders; print(sorted(m for m in ('torch','transformers','timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_info_names_the_same_feature_sets_as_the_loaded_encoders_and_survives_json(encs):
    """What the cache keeps of an encoder (`Encoder.info()`) gives the same specs, hence keys, as the
    loaded encoder: a rerun with nothing to do can name its sets without loading any model."""
    import json

    from emollama.extract.step import ExtractSettings, build_specs

    settings = ExtractSettings(encoders=None)
    infos = {view: E.EncoderInfo.from_dict(json.loads(json.dumps(enc.info().to_dict()))) for view, enc in encs.items()}
    want = {name: spec.key for name, spec in build_specs(encs, settings).items()}
    assert {name: spec.key for name, spec in build_specs(infos, settings).items()} == want
    assert len(want) == 5
