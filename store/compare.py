"""How close two feature sets are: per-clip cosine similarity over their common complete clips.

Typical use: our extracted ``local.vit_mae.mean`` against the authors' released ``mae_340_UTT``
imported into the same (or another) store::

    from emollama.store import FeatureStore
    from emollama.store.compare import compare_sets
    st = FeatureStore.open("stores/merr.zarr", create=False)
    r = compare_sets(st, "local.vit_mae.mean", st, "local.mae_340_utt.released", worst=10)
    r["n_common"], r["cosine"]["median"], r["worst"][:3]

Each clip's value is flattened to a float32 vector (a variable-length set, ``[T, D]``, is averaged over
time first), and the cosine is computed in float64. The per-clip shapes (after the time mean) must
be equal. A clip whose vector is all zeros in either set has no cosine: it is counted in
``undefined`` and listed first among the worst (cosine ``None``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .spec import FeatureSpec
from .store import FeatureStore

__all__ = ["compare_sets", "format_comparison"]

BATCH = 512  # clips per read_many call (each call costs ~1 ms, whatever its size)


def _per_clip_shape(spec: FeatureSpec) -> tuple[int, ...]:
    return spec.row_shape if spec.variable else tuple(spec.shape)  # type: ignore[return-value]


def _describe(store: FeatureStore, key: str, spec: FeatureSpec) -> dict[str, Any]:
    return {"store": store.url, "key": key, "name": spec.name, "shape": ["T" if d is None else d for d in spec.shape],
            "dtype": spec.dtype, "time_mean": spec.variable}


def _vectors(store: FeatureStore, key: str, spec: FeatureSpec, clips: Sequence[str]) -> np.ndarray:
    """[len(clips), D] float64: each clip flattened as float32 (time-averaged when variable)."""
    rows = store.read_many(clips, key)
    if spec.variable:
        rows = [r.astype(np.float32).mean(axis=0, dtype=np.float64).astype(np.float32) for r in rows]
    return np.stack([np.asarray(r, dtype=np.float32).reshape(-1) for r in rows]).astype(np.float64)


def compare_sets(store_a: FeatureStore, key_a: str, store_b: FeatureStore | None, key_b: str, *, worst: int = 10,
                 per_clip: bool = False, batch: int = BATCH) -> dict[str, Any]:
    """Compare set ``key_a`` of ``store_a`` with ``key_b`` of ``store_b`` (None: ``store_a``).

    Keys may be set names or keys (resolved as :meth:`FeatureStore.resolve` does: KeyError when unknown
    or ambiguous). Raises ValueError when the per-clip shapes differ. Returns a JSON-able dict::

        {"a": {store, key, name, shape, dtype, time_mean}, "b": {...},
         "n_common": n, "only_a": n, "only_b": n, "undefined": n (zero vectors),
         "cosine": {"min": x, "median": x, "mean": x} (None values when no clip has a cosine),
         "worst": [{"clip": id, "cosine": x}, ...]   (lowest first, at most ``worst``; undefined first),
         "per_clip": {id: cosine}                    (only with per_clip=True)}
    """
    store_b = store_a if store_b is None else store_b
    ka, kb = store_a.resolve(key_a), store_b.resolve(key_b)
    sa, sb = store_a.sets()[ka], store_b.sets()[kb]
    da, db = _per_clip_shape(sa), _per_clip_shape(sb)
    if da != db:
        def what(s: FeatureSpec, d: tuple) -> str:
            shape = "x".join("T" if x is None else str(x) for x in s.shape)
            return f"[{shape}]" + (f" (time mean: [{'x'.join(map(str, d))}])" if s.variable else "")
        raise ValueError(f"cannot compare {sa.name} ({ka}) {what(sa, da)} with {sb.name} ({kb}) {what(sb, db)}: "
                         "the per-clip shapes must be equal (variable-length sets are averaged over time first)")
    ca, cb = store_a.complete(ka), store_b.complete(kb)
    common = sorted(ca & cb)
    cos = np.empty(len(common), dtype=np.float64)
    for i in range(0, len(common), batch):
        part = common[i : i + batch]
        va, vb = _vectors(store_a, ka, sa, part), _vectors(store_b, kb, sb, part)
        na, nb = np.linalg.norm(va, axis=1), np.linalg.norm(vb, axis=1)
        den = na * nb
        with np.errstate(invalid="ignore", divide="ignore"):
            c = np.einsum("ij,ij->i", va, vb) / den
        c[den == 0] = np.nan
        cos[i : i + len(part)] = np.clip(c, -1.0, 1.0)
    ok = np.isfinite(cos)
    good = cos[ok]
    stats = ({"min": float(good.min()), "median": float(np.median(good)), "mean": float(good.mean())} if good.size
             else {"min": None, "median": None, "mean": None})
    # worst first: undefined (NaN) clips, then ascending cosine; ties by clip id (common is sorted)
    order = np.lexsort((np.where(ok, cos, -np.inf), ok))  # primary: ok (False first), then cosine
    out: dict[str, Any] = {
        "a": _describe(store_a, ka, sa), "b": _describe(store_b, kb, sb),
        "n_common": len(common), "only_a": len(ca - cb), "only_b": len(cb - ca), "undefined": int((~ok).sum()),
        "cosine": stats,
        "worst": [{"clip": common[j], "cosine": float(cos[j]) if ok[j] else None} for j in order[: max(worst, 0)]],
    }
    if per_clip:
        out["per_clip"] = {c: (float(x) if np.isfinite(x) else None) for c, x in zip(common, cos)}
    return out


def format_comparison(r: dict[str, Any]) -> str:
    """A short human-readable table of :func:`compare_sets`' result."""
    def side(tag: str, d: dict) -> str:
        shape = "x".join(str(x) for x in d["shape"])
        return f"{tag}  {d['key']}  [{shape}] {d['dtype']}{'  (time mean)' if d['time_mean'] else ''}  {d['store']}"

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    lines = [side("A", r["a"]), side("B", r["b"]),
             f"clips   common {r['n_common']}   only in A {r['only_a']}   only in B {r['only_b']}"
             + (f"   zero vectors {r['undefined']}" if r["undefined"] else "")]
    c = r["cosine"]
    if r["n_common"] == 0:
        lines.append("cosine  no common clips")
    else:
        lines.append(f"cosine  min {num(c['min'])}   median {num(c['median'])}   mean {num(c['mean'])}")
    if r["worst"]:
        lines.append(f"worst {len(r['worst'])}:")
        width = max(len(w["clip"]) for w in r["worst"])
        lines += [f"  {w['clip']:<{width}}  {num(w['cosine'])}" for w in r["worst"]]
    return "\n".join(lines)
