"""Deterministic per-clip values, so any process can recompute what a clip must hold."""

from __future__ import annotations

import zlib

import numpy as np

from emollama.store import FeatureSpec

UTT = FeatureSpec("audio.test.utt", "audio", "hubert", "sha256:00", "last_hidden_state", "mean", (1024,))
FRAMES = FeatureSpec("audio.test.frames", "audio", "hubert", "sha256:00", "last_hidden_state", "none",
                     (None, 32), frame_rate=50.0)
TOKENS = FeatureSpec("global.test.tokens", "global", "vitmae", "sha256:01", "last_hidden_state", "none", (1025, 48))


def value(clip: str, spec: FeatureSpec) -> np.ndarray:
    """float32 values for one clip of one set (length of variable sets depends on the clip)."""
    seed = zlib.crc32(f"{clip}|{spec.key}".encode())
    rng = np.random.default_rng(seed)
    shape = tuple(int(3 + seed % 9) if d is None else d for d in spec.shape)
    return rng.standard_normal(shape).astype(np.float32)


def stored(clip: str, spec: FeatureSpec) -> np.ndarray:
    return value(clip, spec).astype(spec.dtype)
