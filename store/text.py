"""Text feature sets: a clip's text (e.g. a speech transcript) kept as a feature set like any other.

A text set is a variable-length set of bytes: each clip's rows are the UTF-8 bytes of one JSON object
(``{"text": "...", "language": "en", ...}``), so an empty transcript is still one non-empty row and
whatever belongs to the text (its detected language) travels with it. Nothing else in the store changes:
the set has a spec and a key, segments, commit marks, compaction, verify and tombstones as every set
does, and a rerun of the job that made it skips its complete clips.

The spec says that the set is text, so any reader can tell without knowing who made it:

    dtype "uint8", shape [T], pooling "text", params["content"] == CONTENT

``encode_row`` / ``decode_row`` turn one object into a row and back; ``read_texts`` reads the objects
of many clips of one set (the complete ones); ``text_sets`` lists a store's text sets.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .spec import FeatureSpec

if TYPE_CHECKING:
    from .store import FeatureStore

__all__ = ["POOLING", "DTYPE", "CONTENT", "is_text", "encode_row", "decode_row", "read_texts", "text_sets"]

POOLING = "text"
DTYPE = "uint8"
CONTENT = "utf-8 json object per clip"


def is_text(spec: FeatureSpec) -> bool:
    """Whether ``spec`` is a text set (its rows are UTF-8 JSON, not numbers)."""
    return spec.pooling == POOLING and spec.dtype == DTYPE and (spec.params or {}).get("content") == CONTENT


def encode_row(obj: Mapping[str, Any]) -> np.ndarray:
    """One clip's object as its rows: the UTF-8 bytes of its JSON (sorted keys), uint8 [T]."""
    raw = json.dumps(dict(obj), ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return np.frombuffer(raw, dtype=np.uint8).copy()


def decode_row(row: np.ndarray) -> dict[str, Any]:
    """A row of a text set back to its object."""
    obj = json.loads(np.asarray(row, dtype=np.uint8).tobytes().decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError(f"a text set's row holds {type(obj).__name__}, not a JSON object")
    return obj


def read_texts(store: "FeatureStore", key: str, clip_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{clip id: its object} for the clips of ``clip_ids`` complete in the text set ``key`` (others left out)."""
    key = store.resolve(key)
    if not is_text(store.spec(key)):
        raise ValueError(f"set {key} is not a text set (its spec says {store.spec(key).pooling} "
                         f"{store.spec(key).dtype})")
    have = store.complete(key)
    ids = [c for c in dict.fromkeys(clip_ids) if c in have]
    if not ids:
        return {}
    return {c: decode_row(row) for c, row in zip(ids, store.read_many(ids, key))}


def text_sets(store: "FeatureStore") -> dict[str, FeatureSpec]:
    """Key -> spec of every text set of ``store``."""
    return {k: s for k, s in store.sets().items() if is_text(s)}
