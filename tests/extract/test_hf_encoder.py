"""The generic Hugging Face encoder on the tiny local fixtures (wav2vec2, CLIP vision): outputs as
declared per input kind, the same values as transformers run by hand, batch independence, and clear
errors for what is missing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from emollama.extract import encoders as E
from emollama.extract.hf_encoder import HfOptions
from emollama.extract.models import TINY_DIMS, ensure_tiny

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("hf-home")


def _load(home, folder, options, **kw):
    entry = E.EncoderEntry("x", "hf", E.ModelSource(str(folder)), options)
    return entry.load(device="cpu", offline=True, home=home, **kw)


def _frames(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_tiny_fixtures_are_built_locally_with_their_processors(home):
    for name in ("wav2vec2", "clip_vision"):
        folder = ensure_tiny(name, home)
        assert (folder / "preprocessor_config.json").is_file() and (folder / "model.safetensors").is_file()
    a = E.weights_identity(E.ModelSource(str(ensure_tiny("wav2vec2", home))), offline=True, home=home)
    assert a.startswith("sha256:")


def test_waveform_outputs_match_transformers_by_hand(home):
    from transformers import AutoFeatureExtractor, AutoModel

    folder = ensure_tiny("wav2vec2", home)
    enc = _load(home, folder, HfOptions("waveform", pooling=("mean", "none")))
    dim = TINY_DIMS["wav2vec2"]
    assert enc.input_kind == "waveform" and enc.frame_rate == 50.0 and enc.layer == "last_hidden_state"
    assert {k: (o.pooling, o.shape) for k, o in enc.outputs.items()} == {
        "mean": ("mean", (dim,)), "frames": ("none", (None, dim))}
    rng = np.random.default_rng(1)
    clips = [rng.standard_normal(16000).astype(np.float32) * 0.1, rng.standard_normal(200).astype(np.float32)]
    out = enc.encode(clips)
    assert out[0]["frames"].shape == (49, dim) and out[1]["frames"].shape == (1, dim)   # short audio: padded
    model, fe = AutoModel.from_pretrained(folder).eval(), AutoFeatureExtractor.from_pretrained(folder)
    with torch.no_grad():
        ref = model(**fe(clips[0], sampling_rate=16000, return_tensors="pt")).last_hidden_state[0].numpy()
    np.testing.assert_allclose(out[0]["frames"], ref, atol=1e-5)
    np.testing.assert_allclose(out[0]["mean"], ref.mean(0), atol=1e-5)
    # layer = i: hidden_states[i] as transformers returns them (here before the final layer norm)
    enc = _load(home, folder, HfOptions("waveform", 1))
    assert enc.layer == "hidden_states[1]"
    with torch.no_grad():
        ref = model(**fe(clips[0], sampling_rate=16000, return_tensors="pt"), output_hidden_states=True)
    np.testing.assert_allclose(enc.encode(clips[:1])[0]["mean"], ref.hidden_states[1][0].numpy().mean(0), atol=1e-5)


def test_image_inputs_pool_per_frame_then_over_frames(home):
    from transformers import AutoImageProcessor, AutoModel

    folder = ensure_tiny("clip_vision", home)
    dim = TINY_DIMS["clip_vision"]
    model, proc = AutoModel.from_pretrained(folder).eval(), AutoImageProcessor.from_pretrained(folder)

    def hidden(frames, layer):
        with torch.no_grad():
            px = proc(images=list(frames), return_tensors="pt")["pixel_values"]
            return model(pixel_values=px, output_hidden_states=True).hidden_states[layer].numpy()

    crops = _frames((3, 224, 224, 3))
    enc = _load(home, folder, HfOptions("face_frames", -2, ("mean", "cls")), batch_size=2)
    assert {k: o.shape for k, o in enc.outputs.items()} == {"mean": (dim,), "cls": (dim,)}
    out = enc.encode([crops, crops[:1]])
    h = hidden(crops, -2)
    np.testing.assert_allclose(out[0]["mean"], h.mean(1).mean(0), atol=1e-5)
    np.testing.assert_allclose(out[0]["cls"], h[:, 0].mean(0), atol=1e-5)
    np.testing.assert_allclose(out[1]["cls"], h[0, 0], atol=1e-5)     # batch mates do not matter

    frame = _frames((300, 400, 3), seed=2)
    enc = _load(home, folder, HfOptions("frame", -1, ("none", "cls")))
    assert {k: o.shape for k, o in enc.outputs.items()} == {"tokens": (17, dim), "cls": (dim,)}
    out = enc.encode([frame])[0]
    np.testing.assert_allclose(out["tokens"], hidden([frame], -1)[0], atol=1e-5)
    assert enc.encode([frame])[0]["tokens"].tobytes() == out["tokens"].tobytes()   # deterministic

    clip = _frames((16, 224, 224, 3), seed=3)
    enc = _load(home, folder, HfOptions("face_clip", -1, ("mean",)), batch_size=5)
    np.testing.assert_allclose(enc.encode([clip])[0]["mean"], hidden(clip, -1).mean(1).mean(0), atol=1e-5)


def test_missing_processor_offline_hub_and_bad_layer_are_clear_errors(home, tmp_path, monkeypatch):
    bare = tmp_path / "clip-without-processor"
    shutil.copytree(ensure_tiny("clip_vision", home), bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(E.MissingWeightsError, match=r"no preprocessor_config.json.*AutoImageProcessor"):
        _load(home, bare, HfOptions("frame"))
    with pytest.raises(ValueError, match=r"layer 9: the model returns 3 hidden states"):
        _load(home, ensure_tiny("clip_vision", home), HfOptions("frame", 9))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    cfg = E.EncodersConfig((E.EncoderEntry("wav2vec2", "hf", E.ModelSource("facebook/wav2vec2-base"),
                                           HfOptions("waveform")),))
    with pytest.raises(E.MissingWeightsError, match=r"(?s)facebook/wav2vec2-base.*`hf download REPO --local-dir DIR`"):
        E.load_encoders(cfg, device="cpu", home=home)
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="accepted by the vit_mae, videomae and eva encoders"):
        _load(home, f, HfOptions("frame"))
