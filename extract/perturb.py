"""Perturbed inputs, for robustness reports: noise added to the audio, faces blurred.

`[extract.perturb]` (`PerturbSettings`) is off by default. Its fields are value fields that name the input
kinds they change, so a perturbed set has a key of its own (its spec params hold `perturb`) and the sets of
other inputs keep theirs; at their defaults they are left out of the spec params (`omit_default`), so every
key made before they existed is unchanged. `emollama eval --conditions` extracts each condition's sets
with these settings into the run's eval store (`pipeline.conditions`); nothing else sets them.

`apply(inputs, settings, seed)` is called by the extraction step on every clip's prepared inputs just before
the encoders see them (`extract.step.encode`), whichever process found the faces, so a preview shows what
was encoded. Both perturbations are deterministic:

- `audio_snr_db`: white Gaussian noise at that signal-to-noise ratio over the whole waveform (the noise
  power is the waveform's mean power / 10^(SNR/10)); the noise is drawn from a generator seeded by the
  clip's content (its sha256, else its id), so a rerun, another executor or another name of the same file
  give the same samples. A silent waveform stays silent.
- `face_blur`: a Gaussian blur of radius `face_blur` x the crop side on every face crop, and on the face's
  square in the whole frame (radius `face_blur` x that square's side, the box the nearest crop was cut
  with; a clip with no face: the centre square its crops come from). Pillow's GaussianBlur, on uint8.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageFilter

from emollama.extract.registry import FACE_CLIP, FACE_FRAMES, FRAME, WAVEFORM
from emollama.extract.settings import value


@dataclass(frozen=True, kw_only=True)
class PerturbSettings:
    """[extract.perturb]: inputs perturbed on purpose (robustness conditions); off by default."""

    # white noise over the audio at this signal-to-noise ratio in dB (unset: none)
    audio_snr_db: float | None = value(None, inputs=(WAVEFORM,), omit_default=True, min=-40, max=80)
    # Gaussian blur of the faces, radius as a fraction of the face square's side (0: none; 0.05 hides an expression)
    face_blur: float = value(0.0, inputs=(FACE_FRAMES, FACE_CLIP, FRAME), omit_default=True, min=0, max=1)

    @property
    def active(self) -> bool:
        return self.audio_snr_db is not None or self.face_blur > 0


def clip_seed(record: Mapping[str, Any]) -> int:
    """A clip's noise seed: from its content hash where recorded (files), else its id (frame folders)."""
    text = record.get("sha256") or f"id:{record.get('id')}"
    return int.from_bytes(hashlib.sha256(str(text).encode()).digest()[:8], "little")


def add_noise(wave: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    """``wave`` (float32) plus white Gaussian noise at ``snr_db`` dB, drawn from ``seed``."""
    w = np.asarray(wave, np.float32)
    power = float(np.mean(np.square(w, dtype=np.float64))) if w.size else 0.0
    if power == 0.0:
        return w.copy()
    sigma = np.sqrt(power / 10.0 ** (snr_db / 10.0))
    noise = np.random.default_rng(seed).standard_normal(w.shape)
    return (w + sigma * noise).astype(np.float32)


def _blur(img: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).filter(ImageFilter.GaussianBlur(radius)),
                      dtype=np.uint8)


def blur_crops(crops: np.ndarray, fraction: float) -> np.ndarray:
    """Every crop of [N, S, S, 3] blurred with radius ``fraction`` x S."""
    crops = np.asarray(crops)
    radius = fraction * crops.shape[1]
    return np.stack([_blur(c, radius) for c in crops]) if len(crops) else crops.copy()


def blur_box(frame: np.ndarray, box: np.ndarray, fraction: float) -> np.ndarray:
    """``frame`` with the part of square ``box`` (x1, y1, x2, y2 in frame pixels) inside it blurred, radius
    ``fraction`` x the square's side (the pixels around it are blurred in, so the edge is soft)."""
    out = np.array(frame, np.uint8, copy=True)
    h, w = out.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    radius = fraction * max(1, x2 - x1)
    pad = int(np.ceil(3 * radius))
    X1, Y1, X2, Y2 = max(0, x1), max(0, y1), min(w, x2), min(h, y2)
    if X2 <= X1 or Y2 <= Y1:
        return out
    P1, Q1, P2, Q2 = max(0, X1 - pad), max(0, Y1 - pad), min(w, X2 + pad), min(h, Y2 + pad)
    region = _blur(out[Q1:Q2, P1:P2], radius)
    out[Y1:Y2, X1:X2] = region[Y1 - Q1:Y2 - Q1, X1 - P1:X2 - P1]
    return out


def apply(inputs: Mapping[str, Any], settings: PerturbSettings, seed: int,
          frame_box: np.ndarray | None = None) -> dict[str, Any]:
    """The inputs as the encoders see them under ``settings`` (new arrays; ``inputs`` are not changed:
    they may be read-only views of shared memory). ``frame_box``: the face's square in the whole frame."""
    out = dict(inputs)
    if settings.audio_snr_db is not None and WAVEFORM in out:
        out[WAVEFORM] = add_noise(np.asarray(out[WAVEFORM]), settings.audio_snr_db, seed)
    if settings.face_blur > 0:
        for kind in (FACE_FRAMES, FACE_CLIP):
            if kind in out:
                out[kind] = blur_crops(np.asarray(out[kind]), settings.face_blur)
        if FRAME in out and frame_box is not None:
            out[FRAME] = blur_box(np.asarray(out[FRAME]), frame_box, settings.face_blur)
    return out
