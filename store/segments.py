"""Segment arrays: ``sets/<key>/<segment>``, one sharded Zarr v3 array per (set, committed batch).

The layout of an array (chunk and shard shapes, codecs, dimension names) and its row I/O: writing the
rows of a batch shard by shard, and reading the rows of many clips with one read per segment (on a local
disk through :class:`~._fastread.ShardReader`, elsewhere through Zarr). Rows are addressed by the
:class:`~.marks.ClipCopy` of each clip, which the commit log's replay gives.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from ._backend import Backend, LocalBackend
from ._fastread import ShardReader, supports
from .marks import ClipCopy
from .spec import FeatureSpec

log = logging.getLogger("emollama.store.store")  # the store's one logger (its lines read as they always did)

__all__ = ["SETS", "CHUNK_BYTES", "SHARD_BYTES", "Segments", "dimension_names", "layout", "compressors",
           "settle_zarr_writes"]

SETS = "sets"
CHUNK_BYTES = 64 * 1024  # raw bytes per chunk: the unit a random read decodes
SHARD_BYTES = 128 * 1024 * 1024  # raw bytes per shard file (one segment = one file up to this size)
_WINDOW_BYTES = 64 * 1024 * 1024  # rows read at once when a compaction copies a segment


def dimension_names(spec: FeatureSpec) -> list[str]:
    """Names of an array's dimensions: ``clip`` (fixed shape) or ``row`` (variable length), then the
    spec's ``params["dimension_names"]`` or ``feature`` / ``token, feature`` / ``dim_<i>``."""
    names = spec.params.get("dimension_names") if isinstance(spec.params, Mapping) else None
    lead = "row" if spec.variable else "clip"
    trailing = len(spec.row_shape)
    if isinstance(names, list) and len(names) == trailing:
        return [lead, *map(str, names)]
    if trailing == 1:
        return [lead, "feature"]
    if trailing == 2:
        return [lead, "token", "feature"]
    return [lead, *[f"dim_{i}" for i in range(1, trailing + 1)]]


def layout(spec: FeatureSpec, n_rows: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunk and shard shapes for an array of ``n_rows`` rows."""
    row = spec.row_shape
    row_bytes = max(1, int(np.prod(row)) * np.dtype(spec.dtype).itemsize)
    c = max(1, min(max(n_rows, 1), CHUNK_BYTES // row_bytes))
    per_shard = max(1, SHARD_BYTES // (c * row_bytes)) * c
    shard_rows = min(per_shard, math.ceil(max(n_rows, 1) / c) * c)
    return (c, *row), (shard_rows, *row)


def compressors() -> list[Any]:
    # blosc-lz4 with byte shuffle (fp16 exponent bytes compress), then a checksum so verify() and
    # reads catch any flipped byte in a chunk. lz4, not zstd: on this kind of CPU zstd decodes
    # fp16 features at ~0.6 GB/s (~100 us per 64 KB chunk), lz4 at >5 GB/s, and the read target
    # (at least as fast as one .npy per clip) leaves no room for zstd. fp16 alone meets the size target.
    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]


def settle_zarr_writes(timeout_s: float = 30.0) -> None:
    """Wait until the tasks pending in zarr's event loop (chunk writes still running after a sibling failed)
    are done. Best effort: zarr's loop is internal, and without it there is nothing to wait for."""
    try:
        from zarr.core.sync import _get_loop

        loop = _get_loop()
    except Exception:  # noqa: BLE001 - a zarr without this internal: nothing pending to find
        return
    if loop is None or not loop.is_running():
        return

    async def _wait() -> None:
        me = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not me]
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    try:
        asyncio.run_coroutine_threadsafe(_wait(), loop).result(timeout_s + 5)
    except Exception as e:  # noqa: BLE001 - the caller removes what it can either way
        log.debug("could not wait for zarr's pending writes: %s", e)


class Segments:
    """The segment arrays of one store: create and write them, read rows from them.

    Opened arrays and shard readers are cached per (set key, segment); :meth:`keep` drops those of
    segments that are gone. ``fast_reads`` (default on for a local store) reads shards directly.
    """

    def __init__(self, backend: Backend) -> None:
        self._b = backend
        self._arrays: dict[tuple[str, str], Any] = {}
        self._readers: dict[tuple[str, str], ShardReader | None] = {}
        self.fast_reads = isinstance(backend, LocalBackend)  # read local shards directly (see _fastread)

    # -------------------------------------------------------------- where
    @staticmethod
    def path(key: str, seg: str) -> str:
        """The array's path under the store root."""
        return f"{SETS}/{key}/{seg}"

    def set_folders(self) -> list[str]:
        """The set keys that have a folder under ``sets/`` (metadata and temporary files left out)."""
        return [k for k in self._b.listdir(SETS) if not k.startswith(".") and not k.startswith("zarr.")]

    def keep(self, live: set[str]) -> None:
        """Forget the cached arrays and readers of segments not in ``live``."""
        self._arrays = {k: v for k, v in self._arrays.items() if k[1] in live}
        self._readers = {k: v for k, v in self._readers.items() if k[1] in live}

    # -------------------------------------------------------------- arrays
    def array(self, key: str, seg: str) -> Any:
        """The segment's Zarr array, opened once (read-only)."""
        a = self._arrays.get((key, seg))
        if a is None:
            a = self.open_array(key, seg)
            self._arrays[(key, seg)] = a
        return a

    def open_array(self, key: str, seg: str) -> Any:
        """The segment's Zarr array, opened afresh (read-only): what ``verify()`` checks."""
        return zarr.open_array(store=self._b.zstore, path=self.path(key, seg), mode="r")

    def reader(self, key: str, seg: str) -> ShardReader | None:
        """The direct shard reader of a local array in the store's own layout, else None (read through Zarr)."""
        if not self.fast_reads:
            return None
        if (key, seg) not in self._readers:
            rel = self.path(key, seg)
            meta = json.loads(self._b.read_bytes(f"{rel}/zarr.json"))
            self._readers[(key, seg)] = ShardReader(Path(self._b.abspath(rel)), meta) if supports(meta) else None
        return self._readers[(key, seg)]

    def create(self, spec: FeatureSpec, key: str, seg: str, n_rows: int, attrs: dict) -> tuple[Any, int]:
        """Create the (empty) array of ``n_rows`` rows; returns it and its rows per shard."""
        chunks, shards = layout(spec, n_rows)
        arr = zarr.create_array(
            store=self._b.zstore,
            name=self.path(key, seg),
            shape=(n_rows, *spec.row_shape),
            dtype=spec.dtype,
            chunks=chunks,
            shards=shards,
            compressors=compressors(),
            fill_value=0,
            dimension_names=dimension_names(spec),
            attributes=attrs,
            overwrite=True,
            # an all-zero chunk is still written: a missing shard file then always means damage
            config={"write_empty_chunks": True},
        )
        return arr, shards[0]

    # -------------------------------------------------------------- writing
    def write_rows(self, spec: FeatureSpec, key: str, seg: str, clips: list[str],
                   arrays: Iterator[np.ndarray] | list[np.ndarray], lengths: list[int] | None,
                   origin: list[str] | None = None) -> dict:
        """Write one segment array of ``clips`` (shard by shard); returns the mark entry for the set.
        ``lengths`` (rows per clip) is required for a variable-length set; ``origin`` (compaction) keeps
        each clip's replay order."""
        if spec.variable:
            if lengths is None:
                raise ValueError(f"internal: writing variable-length set {key} needs the rows of each clip")
            offsets = np.zeros(len(clips) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            n_rows = int(offsets[-1])
        else:
            offsets, n_rows = None, len(clips)
        attrs: dict[str, Any] = {"set": key, "name": spec.name, "segment": seg, "clips": list(clips)}
        if offsets is not None:
            attrs["offsets"] = offsets.tolist()
        arr, shard_rows = self.create(spec, key, seg, n_rows, attrs)
        buf = np.empty((min(shard_rows, n_rows), *spec.row_shape), dtype=spec.dtype)
        start = fill = 0
        for x in arrays:
            x = x.reshape((-1, *spec.row_shape))
            i = 0
            while i < len(x):
                take = min(len(x) - i, len(buf) - fill)
                buf[fill : fill + take] = x[i : i + take]
                fill += take
                i += take
                if fill == len(buf):
                    arr[start : start + fill] = buf
                    start += fill
                    fill = 0
                    buf = np.empty((min(shard_rows, n_rows - start), *spec.row_shape), dtype=spec.dtype)
        if fill:
            arr[start : start + fill] = buf[:fill]
            start += fill
        if start != n_rows:
            raise RuntimeError(f"internal: wrote {start} rows of {n_rows} into {key}/{seg}")
        entry: dict[str, Any] = {"clips": list(clips)}
        if offsets is not None:
            entry["offsets"] = offsets.tolist()
        if origin is not None:
            entry["origin"] = list(origin)
        return entry

    def discard(self, seg: str) -> None:
        """Remove the arrays an uncommitted write of ``seg`` left in every set.

        zarr writes a slice's chunks as concurrent tasks and does not cancel the others when one fails
        (a full disk): they finish in zarr's event loop after the error reached us. They are waited for
        first, or a late chunk would land after the removal as an orphan."""
        settle_zarr_writes()
        for key in self.set_folders():
            if self._b.exists(self.path(key, seg)):
                self._b.remove_tree(self.path(key, seg))

    # -------------------------------------------------------------- reading
    def read(self, key: str, copies: Sequence[ClipCopy]) -> list[np.ndarray]:
        """The rows of each copy (a clip's array, in the stored dtype), with one read per segment touched."""
        out: list[np.ndarray | None] = [None] * len(copies)
        by_seg: dict[str, list[tuple[int, int, int | None]]] = {}
        for pos, cp in enumerate(copies):
            by_seg.setdefault(cp.segment, []).append((pos, cp.start, cp.stop))
        for seg, items in by_seg.items():
            reader = self.reader(key, seg)
            fixed = items[0][2] is None  # a row per clip
            if reader is not None:
                got = reader.read_spans([(a, a + 1) if fixed else (a, b) for _, a, b in items])
                for (pos, _, _), x in zip(items, got):
                    out[pos] = x[0] if fixed else x
                continue
            arr = self.array(key, seg)
            if fixed:
                idx = np.fromiter((a for _, a, _ in items), dtype=np.int64, count=len(items))
                uniq, inv = np.unique(idx, return_inverse=True)
                lo, hi = int(uniq[0]), int(uniq[-1]) + 1
                if hi - lo <= 2 * len(uniq):
                    data = arr[lo:hi]
                    uniq = uniq - lo
                    for (pos, _, _), j in zip(items, inv):
                        out[pos] = data[uniq[j]].copy()
                else:
                    data = arr.oindex[uniq]
                    for (pos, _, _), j in zip(items, inv):
                        out[pos] = data[j].copy()
            else:
                spans = sorted({(a, b) for _, a, b in items})
                lo, hi = spans[0][0], spans[-1][1]
                need = sum(b - a for a, b in spans)
                if hi - lo <= 2 * need:
                    data = arr[lo:hi]
                    where = {(a, b): a - lo for a, b in spans}
                else:
                    rows = np.concatenate([np.arange(a, b) for a, b in spans])
                    data = arr.oindex[rows]
                    where, p = {}, 0
                    for a, b in spans:
                        where[(a, b)] = p
                        p += b - a
                for pos, a, b in items:
                    s = where[(a, b)]
                    out[pos] = data[s : s + b - a].copy()
        return out  # type: ignore[return-value]

    def iter_rows(self, spec: FeatureSpec, key: str, copies: Sequence[ClipCopy]) -> Iterator[np.ndarray]:
        """Rows of ``copies`` (sorted by segment, position) read in large contiguous windows."""
        row_bytes = int(np.prod(spec.row_shape)) * np.dtype(spec.dtype).itemsize
        window = max(1, _WINDOW_BYTES // max(row_bytes, 1))
        i = 0
        while i < len(copies):
            seg = copies[i].segment
            arr = self.array(key, seg)
            j = i
            lo = copies[i].start
            while j < len(copies) and copies[j].segment == seg:
                end = copies[j].rows[1]
                if end - lo > window and j > i:
                    break
                j += 1
            hi = copies[j - 1].rows[1]
            data = arr[lo:hi]
            for cp in copies[i:j]:
                yield data[cp.start - lo] if cp.stop is None else data[cp.start - lo : cp.stop - lo]
            i = j
