"""[extract.perturb]: audio noise at an SNR and blurred faces, deterministic, and off in every key by default."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from emollama.extract import perturb as P
from emollama.extract.registry import FACE_CLIP, FACE_FRAMES, FRAME, INPUTS, WAVEFORM
from emollama.extract.step import ExtractSettings, input_params


def _wave(n=16000, seed=0):
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.2 * np.random.default_rng(seed).random(n))).astype(np.float32)


@pytest.mark.parametrize("snr", [20.0, 10.0, 0.0, -5.0])
def test_noise_has_the_asked_snr_and_the_same_samples_for_the_same_seed(snr):
    w = _wave()
    a, b, c = P.add_noise(w, snr, 7), P.add_noise(w, snr, 7), P.add_noise(w, snr, 8)
    noise = a.astype(np.float64) - w
    measured = 10 * np.log10(np.mean(w.astype(np.float64) ** 2) / np.mean(noise ** 2))
    assert abs(measured - snr) < 0.15
    assert a.dtype == np.float32 and a.shape == w.shape
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_silence_stays_silent_and_the_seed_follows_the_content():
    assert not P.add_noise(np.zeros(800, np.float32), 0.0, 1).any()
    assert P.clip_seed({"id": "a", "sha256": "ff"}) == P.clip_seed({"id": "b", "sha256": "ff"})
    assert P.clip_seed({"id": "a"}) != P.clip_seed({"id": "b"})


def test_blur_changes_the_crops_and_only_the_face_square_of_the_frame():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    crops = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    box = np.array([40.0, 20.0, 100.0, 80.0])
    inputs = {WAVEFORM: _wave(800), FACE_FRAMES: crops, FACE_CLIP: crops[:2], FRAME: frame}
    out = P.apply(inputs, P.PerturbSettings(face_blur=0.1), seed=1, frame_box=box)
    assert out[WAVEFORM] is inputs[WAVEFORM]                # the audio is not touched
    assert out[FACE_FRAMES].shape == crops.shape and out[FACE_FRAMES].dtype == np.uint8
    assert np.abs(out[FACE_FRAMES].astype(int) - crops).mean() > 20   # noise blurred towards its mean
    inside = np.zeros(frame.shape[:2], bool)
    inside[20:80, 40:100] = True
    diff = (out[FRAME] != frame).any(-1)
    assert diff[inside].mean() > 0.9 and not diff[~inside].any()
    assert np.array_equal(inputs[FRAME], frame)             # the inputs themselves are not changed
    # blurring is smoothing: the face square's pixel-to-pixel differences shrink
    grad = lambda a: np.abs(np.diff(a[20:80, 40:100].astype(int), axis=1)).mean()   # noqa: E731
    assert grad(out[FRAME]) < 0.3 * grad(frame)


def test_perturbations_are_in_no_key_at_their_defaults_and_in_their_inputs_keys_when_on():
    base = ExtractSettings(encoders=None)
    for kind in INPUTS:
        assert "perturb" not in input_params(base, kind)
    noisy = dataclasses.replace(base, perturb=P.PerturbSettings(audio_snr_db=10.0))
    assert input_params(noisy, WAVEFORM)["perturb"] == {"audio_snr_db": 10.0}
    assert all("perturb" not in input_params(noisy, k) for k in (FACE_FRAMES, FACE_CLIP, FRAME))
    blurred = dataclasses.replace(base, perturb=P.PerturbSettings(face_blur=0.05))
    assert "perturb" not in input_params(blurred, WAVEFORM)
    assert all(input_params(blurred, k)["perturb"] == {"face_blur": 0.05} for k in (FACE_FRAMES, FACE_CLIP, FRAME))
