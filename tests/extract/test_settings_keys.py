"""Every value-determining settings field reaches the feature-set keys it affects; no other field does.

The settings dataclasses declare each field's kind (extract.settings): value fields must change the
keys of exactly the sets whose input they name (or every set, for a spec attribute such as dtype),
policy and runtime fields must change none. A field added without a kind, or a value field that
lands in no key, fails here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from emollama.extract import encoders as E
from emollama.extract import settings as S
from emollama.extract.hf_encoder import HfOptions
from emollama.extract.models import ensure_tiny
from emollama.extract.registry import ENCODERS, FACE_CLIP, FACE_FRAMES, FACE_INPUTS, FRAME, INPUTS, WAVEFORM
from emollama.extract.step import ExtractSettings, FrameSettings, StepSettings, build_specs
from emollama.extract.faces import FaceSettings
from emollama.extract.perturb import PerturbSettings

CLIP_OPTIONS = HfOptions("face_frames")
WAV_OPTIONS = HfOptions("waveform", -1)


def _entries(home):
    return (*E.profile("tiny", home=home),
            E.EncoderEntry("wav2vec2", "hf", E.ModelSource(str(ensure_tiny("wav2vec2", home))), WAV_OPTIONS),
            E.EncoderEntry("clip", "hf", E.ModelSource(str(ensure_tiny("clip_vision", home))), CLIP_OPTIONS))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("keys-home")


@pytest.fixture(scope="module")
def encs(home):
    cfg = E.EncodersConfig(_entries(home))
    return E.load_encoders(cfg, device="cpu", offline=True, home=home)


def _keys(encs, settings) -> dict[str, str]:
    return {name: spec.key for name, spec in build_specs(encs, settings).items()}


def _other(value, f: dataclasses.Field):
    """A different value of the field's type (a valid choice when there is another one)."""
    choices = S.meta(f).get("choices")
    if isinstance(value, tuple):
        first = next((c for c in (choices or ()) if c != value[0]), None)
        return (first if first is not None else value[0] + 0.05,) + value[1:]
    if choices and len(choices) > 1:
        return next(c for c in choices if c != value)
    if isinstance(value, bool) or value is None:
        return not value
    if isinstance(value, (int, float)):
        return value + (1 if isinstance(value, int) else 0.05)
    return str(value) + "-other"


def _replace(obj, path: tuple[str, ...], value):
    if len(path) == 1:
        return dataclasses.replace(obj, **{path[0]: value})
    return dataclasses.replace(obj, **{path[0]: _replace(getattr(obj, path[0]), path[1:], value)})


SETTINGS_CLASSES = [StepSettings, ExtractSettings, FrameSettings, FaceSettings, PerturbSettings,
                    *(cls.Options for cls in ENCODERS.values() if cls.Options is not None)]


@pytest.mark.parametrize("cls", SETTINGS_CLASSES, ids=lambda c: c.__name__)
def test_every_settings_field_declares_its_kind(cls):
    for f in S.settings_fields(cls):
        assert S.kind_of(f, cls) in S.KINDS


def test_a_field_without_a_kind_or_a_value_landing_nowhere_is_refused():
    @dataclasses.dataclass(frozen=True)
    class Loose:
        x: int = 1

    with pytest.raises(TypeError, match="Loose.x has no kind"):
        S.settings_fields(Loose)
    with pytest.raises(TypeError, match="must say where it lands"):
        S.value(1)


# What each step setting affects, written down independently of the code's declarations: the input
# kinds whose sets' values it changes (ALL: every set), or nothing (where and how the job runs, or
# which clips get features). A new field fails the test until it is listed here. (local_frames can
# also move a face-clip crop through the face track: a known gap, see FrameSettings.)
ALL = set(INPUTS)
AFFECTS = {
    "frames.local_frames": {FACE_FRAMES, FRAME}, "frames.global_frame": {FRAME},
    "frames.max_side": {FACE_FRAMES, FACE_CLIP, FRAME}, "frames.folder_fps": set(),
    **{f"faces.{name}": set(FACE_INPUTS) for name in (
        "detector", "crop_size", "margin", "min_face_size", "thresholds", "detect_side", "detect_every", "track_by",
        "appearance_min", "cut_distance", "detect_on")},
    "sample_rate": {WAVEFORM}, "dtype": ALL, "missing_audio": set(), "offline": set(), "device": set(),
    "batch_size": set(), "micro_batch": set(), "prep_workers": set(), "max_pixels": set(),
    "cpu_threads": ALL,   # encoded on a CPU here (the GPU case: the test below)
    # robustness conditions (eval --conditions): off by default, and then in no key at all
    "perturb.audio_snr_db": {WAVEFORM}, "perturb.face_blur": set(FACE_INPUTS),
}


# "auto" is "prep" where no GPU is seen, so the other value that changes keys here is "encoder"
OTHER = {"faces.detect_on": "encoder"}


def test_every_step_setting_changes_exactly_the_keys_of_the_sets_it_affects(encs):
    base = ExtractSettings(encoders=None)
    before = _keys(encs, base)
    inputs = {name: enc.input_kind for name, enc in encs.items()}
    assert set(inputs.values()) == ALL    # every input kind has a set here
    for path, f, v in S.walk(base):
        name = ".".join(path)
        if name == "encoders":
            continue   # the encoders' weights and options: the tests below
        assert name in AFFECTS, f"{name}: a new setting; list the inputs it affects in AFFECTS"
        after = _keys(encs, _replace(base, path, OTHER.get(name, _other(v, f))))
        changed = {n for n in before if after[n] != before[n]}
        expected = {n for n in before if inputs[n.split(".")[0]] in AFFECTS[name]}
        assert changed == expected, f"{name}: changed {sorted(changed)}, expected {sorted(expected)}"
        assert (S.kind_of(f) == S.VALUE) == bool(expected), f"{name} is declared {S.kind_of(f)}"


def test_every_encoder_option_changes_that_encoders_keys_only(encs, home):
    settings = ExtractSettings(encoders=None)
    before = _keys(encs, settings)
    entry = E.EncoderEntry("clip", "hf", E.ModelSource(str(ensure_tiny("clip_vision", home))), CLIP_OPTIONS)
    # another valid value of every option for a CLIP model (a new option without one fails: KeyError)
    other = {"input": "face_clip", "layer": -2, "pooling": ("cls",)}
    for f in S.settings_fields(HfOptions):
        assert S.kind_of(f) == S.VALUE
        changed = dataclasses.replace(CLIP_OPTIONS, **{f.name: other[f.name]})
        enc = dataclasses.replace(entry, options=changed).load(device="cpu", offline=True, home=home)
        after = _keys({**{k: v for k, v in encs.items() if k != "clip"}, "clip": enc}, settings)
        assert {k: v for k, v in after.items() if not k.startswith("clip.")} == \
            {k: v for k, v in before.items() if not k.startswith("clip.")}, f.name
        new = {v for k, v in after.items() if k.startswith("clip.")}
        assert new and not new & set(before.values()), f"hf option {f.name} did not change the clip set's key"


def test_the_weights_and_the_processor_config_are_in_the_key(encs, home, tmp_path):
    settings = ExtractSettings(encoders=None)
    before = _keys(encs, settings)
    folder = tmp_path / "clip-other-mean"
    shutil.copytree(ensure_tiny("clip_vision", home), folder)
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    pre["image_mean"] = [0.5, 0.5, 0.5]
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    enc = E.EncoderEntry("clip", "hf", E.ModelSource(str(folder)), CLIP_OPTIONS).load(
        device="cpu", offline=True, home=home)
    after = _keys({**encs, "clip": enc}, settings)
    assert after["clip.hf.mean"] != before["clip.hf.mean"]
    assert {k: v for k, v in after.items() if k != "clip.hf.mean"} == \
        {k: v for k, v in before.items() if k != "clip.hf.mean"}


def test_the_paper_views_keep_their_names_inputs_and_the_entries_their_modality(encs):
    specs = build_specs(encs, ExtractSettings(encoders=None))
    assert {n: s.modality for n, s in specs.items()} == {
        "audio.hubert.frames": "audio", "audio.hubert.mean": "audio", "local.vit_mae.mean": "local",
        "temporal.videomae.mean": "temporal", "global.eva.tokens": "global", "wav2vec2.hf.mean": "wav2vec2",
        "clip.hf.mean": "clip"}
    assert {n: e.input_kind for n, e in encs.items()} == {
        "audio": "waveform", "local": "face_frames", "temporal": "face_clip", "global": "frame",
        "wav2vec2": "waveform", "clip": "face_frames"}
    # the HF sets' keys hold the input's settings like the paper views' do
    assert specs["clip.hf.mean"].params["faces"] == specs["local.vit_mae.mean"].params["faces"]
    assert specs["wav2vec2.hf.mean"].params["sample_rate"] == 16000


def test_detect_on_is_resolved_before_the_keys_are_made_and_prep_keeps_the_earlier_keys(encs):
    """faces.detect_on = "auto" becomes "encoder" for a GPU device and "prep" otherwise, in the process that
    makes the keys (the pipeline sends it resolved); "prep" is left out of the key, so sets made before the
    setting existed (all detected clip by clip) keep their keys."""
    from emollama.extract.step import detect_on, resolved

    def with_(**kw):
        faces = FaceSettings(**{k: v for k, v in kw.items() if k == "detect_on"})
        return ExtractSettings(encoders=None, faces=faces, **{k: v for k, v in kw.items() if k != "detect_on"})

    assert detect_on(with_(device="cuda:1")) == "encoder" and detect_on(with_(device="cpu")) == "prep"
    assert detect_on(with_(device="cuda", detect_on="prep")) == "prep"
    assert detect_on(with_(device="cpu", detect_on="encoder")) == "encoder"
    assert resolved(with_(device="cuda")).faces.detect_on == "encoder"
    assert resolved(with_(device="cpu")).faces.detect_on == "prep"
    auto_cpu, prep, on_gpu = (_keys(encs, s) for s in (with_(device="cpu"), with_(detect_on="prep"),
                                                       with_(device="cuda")))
    assert auto_cpu == prep
    assert on_gpu == _keys(encs, with_(detect_on="encoder"))        # the device itself is not in the key
    for name, spec in build_specs(encs, with_(detect_on="prep")).items():
        faces = spec.params.get("faces")
        assert faces is None or "detect_on" not in faces, name
        assert (on_gpu[name] != prep[name]) == (faces is not None), name


def test_auto_asks_the_driver_for_a_gpu_without_importing_torch(monkeypatch):
    """device = "auto": faces.detect_on = "auto" follows what libcuda reports (no torch import, so a rerun
    with nothing to do stays free of model machinery); CUDA_VISIBLE_DEVICES="" hides the GPUs."""
    import ctypes

    from emollama.extract.registry import gpu_visible
    from emollama.extract.step import detect_on

    class Driver:
        def __init__(self, count):
            self.count = count

        def cuInit(self, flags):
            return 0 if self.count else 100        # CUDA_ERROR_NO_DEVICE

        def cuDeviceGetCount(self, ref):
            ref._obj.value = self.count
            return 0

    auto = ExtractSettings(encoders=None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver(2))
    assert gpu_visible() and detect_on(auto) == "encoder"
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver(0))
    assert not gpu_visible() and detect_on(auto) == "prep"

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert not gpu_visible() and detect_on(auto) == "prep"
    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver(2))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not gpu_visible() and detect_on(auto) == "prep"


def test_cpu_threads_is_in_the_keys_of_sets_computed_on_a_cpu_only(encs):
    """Float sums on a CPU depend on the thread count, so a CPU set's key holds `cpu_threads`; a set
    computed on a GPU (float16 compute, as its worker describes it) ignores it and keeps its key."""
    from emollama.extract.step import CPU_THREADS, computes_on_cpu

    on_gpu = {name: dataclasses.replace(enc.info(), compute_dtype="float16") for name, enc in encs.items()}
    assert all(computes_on_cpu(e) for e in encs.values()) and not any(computes_on_cpu(i) for i in on_gpu.values())
    one, four = ExtractSettings(encoders=None), ExtractSettings(encoders=None, cpu_threads=4)
    assert one.cpu_threads == CPU_THREADS == 1
    assert all(s.params["cpu_threads"] == 1 for s in build_specs(encs, one).values())
    assert _keys(on_gpu, one) == _keys(on_gpu, four)
    assert all("cpu_threads" not in s.params for s in build_specs(on_gpu, one).values())
    assert not set(_keys(encs, one).values()) & set(_keys(encs, four).values())
