"""[extract] is built from the settings dataclasses: sections, the flat names of earlier versions, the
encoder tables (every problem at once), the runtime fields by kind, and settings_from copying every
step setting."""

from __future__ import annotations

import pytest

from emollama.extract import settings as S
from emollama.extract.step import StepSettings
from emollama.pipeline.config import RUNTIME_FIELDS, ExtractConfig, job_settings, load_config
from emollama.pipeline.extraction import encoders_config, settings_from
from emollama.train.config import ConfigError


def _cfg(tmp_path, extract: dict):
    return load_config(None, {"dataset": {"kind": "folder", "root": str(tmp_path)},
                              "extract": {"store": str(tmp_path / "s.zarr"), **extract}})


def test_the_runtime_fields_are_those_eval_always_set_itself():
    assert set(RUNTIME_FIELDS) == {"store", "workers", "scheduler", "preview", "compact", "storage_options",
                                   "device", "batch_clips", "micro_batch", "prep_workers", "batch_size",
                                   "max_pixels"}


def test_sections_and_the_flat_names_of_earlier_versions_give_the_same_config(tmp_path):
    flat = _cfg(tmp_path, {"local_frames": 8, "global_frame": "first", "max_side": 640, "crop_size": 112,
                           "face_margin": 0.3, "face_min_size": 30})
    nested = _cfg(tmp_path, {"frames": {"local_frames": 8, "global_frame": "first", "max_side": 640},
                             "faces": {"crop_size": 112, "margin": 0.3, "min_face_size": 30}})
    assert flat == nested
    assert nested.extract.frames.local_frames == 8 and nested.extract.faces.margin == 0.3
    # the flat name (as the command line sets it) wins over the file's table
    both = _cfg(tmp_path, {"frames": {"local_frames": 8, "max_side": 640}, "local_frames": 4})
    assert (both.extract.frames.local_frames, both.extract.frames.max_side) == (4, 640)
    # the resolved config (saved with every set) reads back the same
    again = load_config(None, {"dataset": {"kind": "folder", "root": str(tmp_path)},
                               "extract": nested.to_dict()["extract"]})
    assert again == nested


def test_settings_from_copies_every_step_setting(tmp_path):
    base = ExtractConfig()
    changes = {"frames": {"local_frames": 9, "global_frame": "middle", "max_side": 700, "folder_fps": 30.0},
               "faces": {"crop_size": 100, "margin": 0.1, "min_face_size": 12, "thresholds": [0.5, 0.6, 0.6],
                         "detect_side": 320, "detect_every": 2, "track_by": "position", "appearance_min": 0.5,
                         "cut_distance": 0.3, "detect_on": "encoder"},
               "dtype": "float32", "missing_audio": "silence", "offline": True, "device": "cpu", "batch_size": 3,
               "micro_batch": 2, "prep_workers": 3, "max_pixels": 1000, "cpu_threads": 2,
               "perturb": {"audio_snr_db": 5.0, "face_blur": 0.1}}
    cfg = _cfg(tmp_path, {"profile": "tiny", **changes})
    settings = settings_from(cfg)
    for path, f, _ in S.walk(StepSettings()):
        got = settings
        for p in path:
            got = getattr(got, p)
        want = cfg.extract
        for p in path:
            want = getattr(want, p)
        assert got == want, ".".join(path)
        default = base
        for p in path:
            default = getattr(default, p)
        if len(S.meta(f).get("choices") or (1, 2)) > 1:   # (sample_rate and the detector have one choice)
            assert got != default, f"{'.'.join(path)} was not changed by this test"
    assert settings.faces.thresholds == (0.5, 0.6, 0.6)


def test_a_fifth_encoder_is_a_named_table(tmp_path):
    (tmp_path / "w2v").mkdir()
    cfg = _cfg(tmp_path, {"profile": "paper", "encoders": {
        "wav2vec2": {"encoder": "hf", "model": str(tmp_path / "w2v"), "input": "waveform", "layer": -2,
                     "pooling": ["mean", "none"]},
        "audio": {"model": "org/my-hubert", "revision": "v2"}}})
    enc = encoders_config(cfg)
    assert enc.names == ("audio", "local", "temporal", "global", "wav2vec2")
    w = enc.entry("wav2vec2")
    assert (w.encoder, w.input, w.options.layer, w.options.pooling) == ("hf", "waveform", -2, ("mean", "none"))
    assert enc.source("audio").revision == "v2" and enc.entry("audio").encoder == "hubert"
    # recorded and read back (eval rebuilds the extraction from it)
    again = load_config(None, {"dataset": {"kind": "folder", "root": str(tmp_path)},
                               "extract": cfg.to_dict()["extract"]})
    assert encoders_config(again) == enc
    assert job_settings(cfg.to_dict()["extract"])["encoders"]["wav2vec2"]["pooling"] == ["mean", "none"]


def test_every_encoder_table_problem_is_listed_at_once(tmp_path):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, {"encoders": {
            "wav2vec2": {"model": "org/w2v"},                                       # no encoder, not a view
            "clip": {"encoder": "hf", "model": "org/clip", "pooling": "max"},      # no input, bad pooling
            "whisper": {"encoder": "nope", "model": "org/w"},                       # unknown encoder
            "dino": {"encoder": "hf", "model": "org/d", "input": "frame", "layers": 3},   # unknown option
            "bad.name": {"encoder": "hf", "model": "org/x", "input": "waveform", "pooling": "cls"},
            "audio": {"model": "org/h", "weights": "x"},                            # unknown key of a view
        }})
    msg = str(e.value)
    for needle in ("extract.encoders.wav2vec2: 'wav2vec2' is not one of the profile's views", "set `encoder`",
                   "extract.encoders.clip.input: required", "extract.encoders.clip.pooling = 'max'",
                   "extract.encoders.whisper.encoder = 'nope': unknown encoder",
                   "extract.encoders.dino.layers: unknown setting (known: input, layer, pooling)",
                   "extract.encoders.bad.name: the name 'bad.name'", "'cls' does not apply to a waveform",
                   "extract.encoders.audio: unknown keys ['weights']"):
        assert needle in msg, needle


def test_the_value_fields_of_extract_are_checked_by_their_declarations(tmp_path):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, {"frames": {"global_frame": "last", "local_frames": 0}, "faces": {"margin": 2.0},
                        "dtype": "int8", "profile": "huge", "workers": -1, "micro_batch": 0, "max_pixels": -1})
    msg = str(e.value)
    for needle in ("extract.frames.global_frame = 'last': choose one of first, middle, peak",
                   "extract.frames.local_frames = 0 must be at least 1", "extract.faces.margin = 2.0 must be within",
                   "extract.dtype = 'int8'", "extract.profile = 'huge'", "extract.workers = -1",
                   "extract.micro_batch = 0", "extract.max_pixels = -1"):
        assert needle in msg, needle


def test_a_config_recorded_by_an_earlier_version_rebuilds_the_same_job(tmp_path):
    """Stores made before the settings had their own tables record a flat [extract]: eval re-extracts
    their missing clips with the same settings."""
    old = {"store": "s.zarr", "profile": "paper", "local_frames": 8, "global_frame": "first", "max_side": 1280,
           "max_pixels": 8192 * 8192, "face_margin": 0.25, "face_min_size": 20, "crop_size": 224, "dtype": "float16",
           "missing_audio": "auto", "device": "auto", "offline": None, "workers": 1, "scheduler": None,
           "batch_clips": 8, "micro_batch": 4, "batch_size": 32, "preview": None, "compact": True,
           "storage_options": {},
           "encoders": {"global": {"model": "/m/eva_vit_g.pth", "revision": None, "config": None}}}
    new = _cfg(tmp_path, {"profile": "paper", "frames": {"local_frames": 8, "global_frame": "first"},
                          "faces": {"margin": 0.25}, "workers": 3, "device": "cpu",
                          "encoders": {"global": {"model": "/m/eva_vit_g.pth"}}})
    assert job_settings(old) == job_settings(new.to_dict()["extract"])
    assert not set(RUNTIME_FIELDS) & set(job_settings(old))
