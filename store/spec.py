"""What a feature set is: everything that determines its values, and the key derived from it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import numpy as np

__all__ = ["FeatureSpec", "canonical_json"]


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text (and equal hashes)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


@dataclass(frozen=True)
class FeatureSpec:
    """A feature set's identity.

    ``shape`` is the per-clip shape; a leading ``None`` marks a variable-length set (e.g. frame-level
    audio ``(None, 1024)``). ``params`` holds everything else that determines the values (frame
    sampling, face settings, sample rate, image size...) and must be JSON-able.
    """

    name: str
    modality: str
    encoder: str
    weights: str
    layer: str
    pooling: str
    shape: tuple[int | None, ...]
    dtype: str = "float16"
    frame_rate: float | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"FeatureSpec.name must be a non-empty name without '/', got {self.name!r}")
        shape = tuple(None if d is None else int(d) for d in self.shape)
        if not shape:
            raise ValueError(f"FeatureSpec {self.name!r}: shape must have at least one dimension, e.g. (1024,)")
        if any(d is None for d in shape[1:]):
            raise ValueError(
                f"FeatureSpec {self.name!r}: only the first dimension may be None (variable length), got {shape}"
            )
        if any(d is not None and d <= 0 for d in shape):
            raise ValueError(f"FeatureSpec {self.name!r}: dimensions must be positive, got {shape}")
        try:
            dtype = np.dtype(self.dtype).name
        except TypeError as e:
            raise ValueError(f"FeatureSpec {self.name!r}: unknown dtype {self.dtype!r} (use 'float16' or 'float32')") from e
        try:
            params = json.loads(canonical_json(dict(self.params)))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"FeatureSpec {self.name!r}: params must be JSON-able (str, numbers, bools, lists, dicts): {e}"
            ) from e
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "params", params)
        if self.frame_rate is not None:
            object.__setattr__(self, "frame_rate", float(self.frame_rate))

    @property
    def variable(self) -> bool:
        """True when the first dimension varies per clip (stored flat with per-clip offsets)."""
        return self.shape[0] is None

    @property
    def key(self) -> str:
        digest = hashlib.sha256(canonical_json(self.to_dict()).encode()).hexdigest()
        return f"{self.name}-{digest[:12]}"

    @property
    def row_shape(self) -> tuple[int, ...]:
        """Shape of one row of the stored array (per clip for fixed sets, per frame for variable ones)."""
        return tuple(self.shape[1:]) if self.variable else tuple(self.shape)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["shape"] = list(self.shape)
        out["params"] = dict(self.params)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureSpec":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"FeatureSpec.from_dict: unknown fields {sorted(unknown)}")
        kw = dict(d)
        kw["shape"] = tuple(kw["shape"])
        return cls(**kw)

    def check(self, clip_id: str, value: np.ndarray) -> np.ndarray:
        """Validate one clip's array against the spec; return it cast to the storage dtype."""
        arr = np.asarray(value)
        if arr.ndim != len(self.shape) or any(s is not None and s != a for s, a in zip(self.shape, arr.shape)):
            want = tuple("T" if s is None else s for s in self.shape)
            raise ValueError(
                f"clip {clip_id!r}, set {self.name!r}: shape {tuple(arr.shape)} does not match the spec {want}"
            )
        if self.variable and arr.shape[0] == 0:
            raise ValueError(f"clip {clip_id!r}, set {self.name!r}: a variable-length feature needs at least one row")
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise ValueError(f"clip {clip_id!r}, set {self.name!r}: dtype {arr.dtype} is not numeric")
        if not np.issubdtype(np.dtype(self.dtype), np.floating) and np.issubdtype(arr.dtype, np.floating):
            raise ValueError(
                f"clip {clip_id!r}, set {self.name!r}: floating values for an integer set ({self.dtype})"
            )
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def __hash__(self) -> int:  # params is a dict: hash by key
        return hash(self.key)
