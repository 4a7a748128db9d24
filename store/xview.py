"""A whole feature set as one lazy ``xarray.DataArray`` backed by dask: :meth:`FeatureStore.to_xarray`.

The array covers every complete clip of the set, across all its segments (compacted or not), in storage
order: segment by segment (segment ids sort by time), and by row within a segment. Use
``da.sortby("clip")`` for clip-id order. Nothing is read when it is built: each dask chunk is a run of
clips in one segment (split at ``SHARD_BYTES`` of raw rows, so a chunk is at most about one shard) and
reads them with :meth:`FeatureStore.read_many` when computed. The values are exactly what ``read_many``
and ``FeatureDataset`` return, in the stored dtype.

- A fixed-shape set ``(D,)`` or ``(N, D)``: dims ``("clip", "feature")`` / ``("clip", "token", "feature")``
  (the names the store records on its arrays), and ``da.sel(clip=c)`` is one clip.
- A variable-length set ``(None, D)`` (frames, tokens): there is no rectangular array over clips of
  different lengths, and padding would invent values. The DataArray is the clips' rows concatenated,
  dims ``("row", "feature")``, with ``row`` indexed by a ``(clip, position)`` MultiIndex:
  ``da.sel(clip=c)`` gives that clip's ``[T, D]`` rows, ``da.groupby("clip")`` iterates clips.

``attrs`` hold the set's key, the store's URL and every spec field (name, modality, encoder, weights,
layer, pooling, shape, dtype, frame_rate, params). The view is the store as it was when built: a clip
removed afterwards fails to compute (KeyError), one rewritten with another length raises; build it again.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from . import segments
from .marks import ClipCopy
from .segments import dimension_names
from .spec import FeatureSpec

__all__ = ["to_xarray"]


class ReadableStore(Protocol):
    """What the view reads of a store (``FeatureStore`` is one); declared here, so the view does not import
    the store that offers it."""

    url: str

    def resolve(self, name_or_key: str) -> str: ...
    def spec(self, name_or_key: str) -> FeatureSpec: ...
    def locations(self, key: str) -> dict[str, ClipCopy]: ...
    def read_many(self, clip_ids: Sequence[str], key: str) -> list[np.ndarray]: ...


class _SetRows:
    """The rows of one set's clips, concatenated in view order, as an array-like that dask reads blocks of."""

    def __init__(self, store: ReadableStore, key: str, clips: Sequence[str], lengths: np.ndarray,
                 row_shape: tuple[int, ...], dtype: np.dtype, variable: bool) -> None:
        self.store = store
        self.key = key
        self.clips = list(clips)
        self.variable = variable
        self.stops = np.cumsum(lengths, dtype=np.int64)
        self.starts = self.stops - lengths
        self.shape = (int(self.stops[-1]) if len(lengths) else 0, *row_shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows ``[lo, hi)``, read clip by clip through the store."""
        if hi <= lo:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        i0 = int(np.searchsorted(self.stops, lo, side="right"))
        i1 = int(np.searchsorted(self.starts, hi, side="left"))
        clips = self.clips[i0:i1]
        arrays = self.store.read_many(clips, self.key)
        if self.variable:
            for c, a, want in zip(clips, arrays, self.stops[i0:i1] - self.starts[i0:i1]):
                if len(a) != want:
                    raise RuntimeError(f"clip {c!r} of set {self.key} now has {len(a)} rows, where this view of "
                                       f"{self.store.url} expects {want}: the store changed; call to_xarray() again")
            data = np.concatenate(arrays)
        else:
            data = np.stack(arrays)
        base = int(self.starts[i0])
        return data[lo - base : hi - base]

    def __getitem__(self, index: Any) -> np.ndarray:
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in index):
            k = index.index(Ellipsis)
            index = index[:k] + (slice(None),) * (self.ndim - len(index) + 1) + index[k + 1 :]
        first, rest = (index[0], index[1:]) if index else (slice(None), ())
        n = self.shape[0]
        if isinstance(first, slice):
            start, stop, step = first.indices(n)
            if step == 1:
                return self._rows(start, max(start, stop))[(slice(None), *rest)]
            rows = np.arange(start, stop, step)
        else:
            rows = np.asarray(first)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            rows = np.where(rows < 0, rows + n, rows)
        if rows.size == 0:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)[(slice(None), *rest)]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return self._rows(lo, hi)[(rows - lo, *rest)]


def _chunks(copies: Sequence[ClipCopy], lengths: np.ndarray, row_bytes: int) -> tuple[int, ...]:
    """Rows per dask chunk: runs of clips in one segment, each at most SHARD_BYTES of rows (or one clip)."""
    limit = max(1, segments.SHARD_BYTES // max(row_bytes, 1))
    out: list[int] = []
    seg, rows = None, 0
    for cp, n in zip(copies, lengths.tolist()):
        if cp.segment != seg or (rows and rows + n > limit):
            if rows:
                out.append(rows)
            seg, rows = cp.segment, 0
        rows += n
    if rows or not out:
        out.append(rows)
    return tuple(out)


def to_xarray(store: ReadableStore, key: str) -> Any:
    """See the module docstring and :meth:`FeatureStore.to_xarray`."""
    try:
        import xarray as xr
    except ImportError:
        raise ImportError("FeatureStore.to_xarray needs xarray, which emollama does not install by default: "
                          "pip install xarray") from None
    import dask.array as da   # dask and pandas come with xarray: imported with it, when a view is made
    import pandas as pd
    from dask.base import tokenize

    key = store.resolve(key)
    spec = store.spec(key)
    copies = sorted(store.locations(key).values(), key=lambda cp: (cp.segment, cp.start))
    clips = [cp.clip for cp in copies]
    lengths = np.fromiter((cp.n_rows for cp in copies), dtype=np.int64, count=len(copies))
    row_shape = spec.row_shape
    dtype = np.dtype(spec.dtype)
    rows = _SetRows(store, key, clips, lengths, row_shape, dtype, spec.variable)
    chunks = (_chunks(copies, lengths, dtype.itemsize * int(np.prod(row_shape))), *((d,) for d in row_shape))
    name = "emollama-" + tokenize(store.url, key, [(cp.clip, cp.segment, cp.start, cp.stop) for cp in copies])
    data = da.from_array(rows, chunks=chunks, name=name, lock=False, fancy=False,
                         meta=np.empty((0,) * rows.ndim, dtype=dtype))
    dims = dimension_names(spec)
    attrs = {"key": key, "store": store.url, **spec.to_dict()}
    if not spec.variable:
        return xr.DataArray(data, dims=dims, coords={dims[0]: clips}, name=spec.name, attrs=attrs)
    index = pd.MultiIndex.from_arrays(
        [np.repeat(np.asarray(clips, dtype=object), lengths), np.arange(rows.shape[0]) - np.repeat(rows.starts, lengths)],
        names=["clip", "position"])
    coords = xr.Coordinates.from_pandas_multiindex(index, dims[0])
    return xr.DataArray(data, dims=dims, coords=coords, name=spec.name, attrs=attrs)
