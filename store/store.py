"""The log-structured Zarr v3 feature store: writer, reader, verify, remove, compact.

Layout under the root (a local directory or any fsspec URL)::

    zarr.json                   root group, attrs {"emollama": {"format": 1, "version": ...}}
    sets/zarr.json              plain group
    sets/<key>/zarr.json        one group per feature set, attrs {key, name, spec, version, config}
    sets/<key>/<segment>/       one sharded array per (set, segment): the clips of one committed batch
    _commits/<segment>.json     the completion mark of a segment, written last in one whole-object write
    _commits/.copies/<seg>.json a copy of that mark, written just before it (``repair()`` restores a
                                damaged mark from it; a copy without a mark is an uncommitted write)
    _commits/.damaged/<seg>.json the bytes of a mark that ``repair()`` replaced (kept, never read)

A segment exists for readers only once its mark exists. Marks are replayed in order: a clip copy's
order is the id of the segment that first wrote it (segment ids sort by time); the first copy of a
clip after the latest tombstone for it wins; clip records merge in order (a later success replaces
an earlier failure). Compaction rewrites many small segments into one and lists them in its mark's
``supersedes``; marks listed there are ignored (and then deleted).

A mark that cannot be read or has the wrong shape hides its clips; every open says so (one warning
line), ``verify()`` lists it and ``repair()`` rebuilds it from its copy or from the segment's own data.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from ._backend import Backend, LocalBackend, open_backend
from ._fastread import ShardReader, supports
from .spec import FeatureSpec

log = logging.getLogger(__name__)

__all__ = ["FeatureStore", "StoreWriter", "VerifyReport", "StorageError", "StoreFullError", "new_segment_id",
           "FORMAT"]

FORMAT = 1
COMMITS = "_commits"
COPIES = f"{COMMITS}/.copies"    # a copy of every mark, for repair()
DAMAGED = f"{COMMITS}/.damaged"  # damaged marks that repair() replaced, kept as they were
SETS = "sets"
CHUNK_BYTES = 64 * 1024  # raw bytes per chunk: the unit a random read decodes
SHARD_BYTES = 128 * 1024 * 1024  # raw bytes per shard file (one segment = one file up to this size)
GRACE_S = 3600.0  # orphan data / old tombstones younger than this are left alone by compact()
_SEGMENT_RE = re.compile(r"^\d{20}-[0-9a-f]{8}$")


class StorageError(OSError):
    """The store cannot be written (disk full, read-only, no permission) or is damaged beyond what the
    operation can handle. Raised after the operation has removed what it had written: nothing committed
    was lost. ``str()`` is one line saying what happened and what to do; ``errno`` is the cause's."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple:  # keeps errno across processes (dask workers)
        return (type(self), (str(self), self.errno))


class StoreFullError(StorageError):
    """No space left on the store's device (ENOSPC, EDQUOT)."""


def _storage_error(url: str, e: OSError, doing: str, need_bytes: int | None = None) -> StorageError:
    code = getattr(e, "errno", None)
    why = e.strerror or str(e) or type(e).__name__
    if code in (errno.ENOSPC, errno.EDQUOT):
        need = f" (it writes up to about {need_bytes / 1e6:.1f} MB)" if need_bytes else ""
        err: StorageError = StoreFullError(
            f"disk full while {doing} in {url}: nothing committed was lost and the partial output was removed; "
            f"free space{need} and rerun", code)
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        err = StorageError(f"{url} is not writable ({why}) while {doing}: nothing committed was lost; "
                           "make it writable or use another store, then rerun", code)
    else:
        err = StorageError(f"storage error while {doing} in {url} ({why}): nothing committed was lost and the "
                           "partial output was removed; fix the cause and rerun", code)
    return err


def _is_list_of(x: Any, t: type) -> bool:
    return isinstance(x, list) and all(isinstance(v, t) and not isinstance(v, bool) for v in x)


def _mark_problem(mark: Any, seg: str) -> str | None:
    """What is wrong with the shape of a parsed commit mark, or None when replay can use it."""
    if not isinstance(mark, dict):
        return f"is a JSON {type(mark).__name__}, not an object"
    if mark.get("segment", seg) != seg:
        return f"names segment {mark.get('segment')!r}, not its own"

    def get(name: str, empty: Any) -> Any:  # a missing or null field is empty; [] where {} belongs is not
        v = mark.get(name)
        return empty if v is None else v

    sets = get("sets", {})
    if not isinstance(sets, dict):
        return "has 'sets' that is not an object"
    for key, info in sets.items():
        if not isinstance(info, dict) or not _is_list_of(info.get("clips"), str):
            return f"has no list of clip ids for set {key}"
        n = len(info["clips"])
        off, origin = info.get("offsets"), info.get("origin")
        if off is not None and not (_is_list_of(off, int) and len(off) == n + 1):
            return f"has offsets for set {key} that do not match its {n} clips"
        if origin is not None and not (_is_list_of(origin, str) and len(origin) == n):
            return f"has origins for set {key} that do not match its {n} clips"
    removed = get("removed", {})
    if not isinstance(removed, dict) or not all(_is_list_of(v, str) for v in removed.values()):
        return "has 'removed' that is not an object of clip id lists"
    removed_at = get("removed_at", {})
    if not isinstance(removed_at, dict) or not all(
            isinstance(v, dict) and all(isinstance(o, str) for o in v.values()) for v in removed_at.values()):
        return "has 'removed_at' of the wrong shape"
    records = get("records", {})
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        return "has 'records' that are not objects"
    rec_origin = get("record_origin", {})
    if not isinstance(rec_origin, dict) or not all(isinstance(o, str) for o in rec_origin.values()):
        return "has 'record_origin' of the wrong shape"
    sup = get("supersedes", [])
    if not _is_list_of(sup, str):
        return "has 'supersedes' that is not a list of segment ids"
    return None


_WARNED: set[tuple[str, str]] = set()  # (store, segment): each damaged mark is reported once per process


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("emollama")
    except Exception:  # noqa: BLE001 - not installed (e.g. run from a checkout)
        return "0+unknown"


def new_segment_id() -> str:
    """Time-sortable, unique: ``<time_ns:020d>-<8 hex>``."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def _segment_age_s(seg: str) -> float:
    try:
        return time.time() - int(seg.split("-", 1)[0]) / 1e9
    except ValueError:
        return math.inf


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    return str(o)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=_json_default, sort_keys=True, separators=(",", ":")).encode()


def _dimension_names(spec: FeatureSpec) -> list[str]:
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


def _layout(spec: FeatureSpec, n_rows: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunk and shard shapes for an array of ``n_rows`` rows."""
    row = spec.row_shape
    row_bytes = max(1, int(np.prod(row)) * np.dtype(spec.dtype).itemsize)
    c = max(1, min(max(n_rows, 1), CHUNK_BYTES // row_bytes))
    per_shard = max(1, SHARD_BYTES // (c * row_bytes)) * c
    shard_rows = min(per_shard, math.ceil(max(n_rows, 1) / c) * c)
    return (c, *row), (shard_rows, *row)


def _compressors() -> list[Any]:
    # blosc-lz4 with byte shuffle (fp16 exponent bytes compress), then a checksum so verify() and
    # reads catch any flipped byte in a chunk. lz4, not zstd: on this kind of CPU zstd decodes
    # fp16 features at ~0.6 GB/s (~100 us per 64 KB chunk), lz4 at >5 GB/s, and the read target
    # (at least as fast as one .npy per clip) leaves no room for zstd. fp16 alone meets the size target.
    return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()]


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    checked_segments: int = 0
    checked_clips: int = 0
    orphans: list[str] = field(default_factory=list)  # data without a commit mark (invisible)

    def __str__(self) -> str:
        head = "store OK" if self.ok else f"store has {len(self.problems)} problem(s)"
        lines = [f"{head} ({self.checked_segments} segments, {self.checked_clips} clips checked)"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


# replay events: (order, rank, ...); rank 0 tombstone, 1 copy, 2 record
_TOMB, _COPY, _REC = 0, 1, 2


def _mark_events(seg: str, mark: Mapping[str, Any]) -> list[tuple]:
    ev: list[tuple] = []
    for key, info in (mark.get("sets") or {}).items():
        clips = info["clips"]
        origin = info.get("origin") or [seg] * len(clips)
        offsets = info.get("offsets")
        if offsets is None:
            for i, (c, o) in enumerate(zip(clips, origin)):
                ev.append((o, _COPY, key, c, seg, i, -1))
        else:
            for i, (c, o) in enumerate(zip(clips, origin)):
                ev.append((o, _COPY, key, c, seg, offsets[i], offsets[i + 1]))
    for key, clips in (mark.get("removed") or {}).items():
        for c in clips:
            ev.append((seg, _TOMB, key, c, seg))
    for key, by_clip in (mark.get("removed_at") or {}).items():
        for c, o in by_clip.items():
            ev.append((o, _TOMB, key, c, seg))
    rec_origin = mark.get("record_origin") or {}
    for c, rec in (mark.get("records") or {}).items():
        ev.append((rec_origin.get(c, seg), _REC, c, rec, seg))
    return ev


def _settle_zarr_writes(timeout_s: float = 30.0) -> None:
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


class FeatureStore:
    """A Zarr v3 feature store; open it with :meth:`FeatureStore.open`."""

    def __init__(self, backend: Backend) -> None:
        self._b = backend
        self.url: str = backend.url
        self._lock = threading.RLock()
        self._specs: dict[str, FeatureSpec] = {}
        self._marks: dict[str, dict] = {}
        self._bad_marks: dict[str, str] = {}
        self._active: list[str] = []
        self._loc: dict[str, dict[str, tuple]] = {}  # key -> clip -> (seg, a, b, order); b == -1: fixed row a
        self._records: dict[str, dict] = {}
        self._rec_src: dict[str, tuple[str, str]] = {}  # clip -> (order, mark seg) of its latest record event
        self._arrays: dict[tuple[str, str], Any] = {}
        self._readers: dict[tuple[str, str], ShardReader | None] = {}
        self.fast_reads = isinstance(backend, LocalBackend)  # read local shards directly (see _fastread)
        self._compact_hook: Callable[[str], None] | None = None  # tests: raise at a step to simulate a crash

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls, url: str | Path, *, create: bool = True, storage_options: dict | None = None
    ) -> "FeatureStore":
        """Open (and by default create) a store at a local path or fsspec URL (``s3://bucket/prefix``)."""
        b = open_backend(url, storage_options)
        try:
            raw = b.read_bytes("zarr.json")
        except (FileNotFoundError, OSError, KeyError):
            raw = None
        if raw is None:
            if not create:
                raise FileNotFoundError(f"no feature store at {b.url} (open it with create=True to make one)")
            if not b.is_empty():
                raise FileExistsError(
                    f"{b.url} exists, is not empty and is not an emollama feature store (no zarr.json); "
                    "pick an empty or new location"
                )
            root = {"zarr_format": 3, "node_type": "group",
                    "attributes": {"emollama": {"format": FORMAT, "version": _version()}}}
            b.write_atomic("zarr.json", _dumps(root), exclusive=True)
            b.write_atomic(f"{SETS}/zarr.json", _dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}),
                           exclusive=True)
        else:
            meta = json.loads(raw)
            fmt = (meta.get("attributes") or {}).get("emollama", {}).get("format")
            if fmt is None:
                raise ValueError(f"{b.url} is a Zarr group but not an emollama feature store (no attrs.emollama)")
            if fmt > FORMAT:
                raise ValueError(
                    f"{b.url} has store format {fmt}, this emollama reads format <= {FORMAT}: upgrade emollama"
                )
        store = cls(b)
        store.refresh()
        return store

    @property
    def storage_options(self) -> dict:
        return dict(self._b.storage_options)

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r}, sets={len(self._specs)}, segments={len(self._active)})"

    def __getstate__(self) -> dict:
        return {"url": self.url, "storage_options": self._b.storage_options}

    def __setstate__(self, state: dict) -> None:
        other = FeatureStore.open(state["url"], create=False, storage_options=state["storage_options"] or None)
        self.__dict__.update(other.__dict__)

    # ------------------------------------------------------------------ sets
    def ensure_set(self, spec: FeatureSpec, config: dict | None = None) -> str:
        """Get or create the set for ``spec``; returns its key. Safe when several processes do it at once."""
        key = spec.key
        with self._lock:
            if key in self._specs:
                return key
            attrs = {"key": key, "name": spec.name, "spec": spec.to_dict(), "version": _version(),
                     "config": json.loads(_dumps(config or {}))}
            meta = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
            self._b.write_atomic(f"{SETS}/{key}/zarr.json", _dumps(meta), exclusive=True)
            self._load_set(key)
            if self._specs.get(key) != spec:
                raise RuntimeError(f"set {key} exists with a different spec: the store at {self.url} is damaged")
            return key

    def _load_set(self, key: str) -> None:
        try:
            meta = json.loads(self._b.read_bytes(f"{SETS}/{key}/zarr.json"))
            self._specs[key] = FeatureSpec.from_dict(meta["attributes"]["spec"])
        except (OSError, KeyError, ValueError) as e:
            log.debug("skipping set %s: %s", key, e)

    def _refresh_sets(self) -> None:
        for name in self._b.listdir(SETS):
            # skip metadata and other writers' temporary files (zarr's end in .partial)
            if name not in self._specs and not name.startswith(".") and not name.startswith("zarr."):
                self._load_set(name)

    def sets(self) -> dict[str, FeatureSpec]:
        """Key -> spec of every set in the store."""
        return dict(self._specs)

    def set_attrs(self, key: str) -> dict:
        """The set group's attributes (key, name, spec, version, config)."""
        return json.loads(self._b.read_bytes(f"{SETS}/{self.resolve(key)}/zarr.json"))["attributes"]

    def resolve(self, name_or_key: str) -> str:
        """A set key from a key or a readable name (when exactly one set has that name)."""
        for attempt in range(2):
            if name_or_key in self._specs:
                return name_or_key
            hits = sorted(k for k, s in self._specs.items() if s.name == name_or_key)
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise KeyError(
                    f"set name {name_or_key!r} is ambiguous in {self.url}: it matches {hits}; pass one of these keys"
                )
            if attempt == 0:
                self._refresh_sets()
        have = ", ".join(sorted(self._specs)) or "none"
        raise KeyError(f"no feature set {name_or_key!r} in {self.url} (sets: {have})")

    # ------------------------------------------------------------------ replay
    def refresh(self) -> None:
        """Re-read the commit marks (picks up other writers' commits and compactions)."""
        with self._lock:
            self._refresh_sets()
            names = [n for n in self._b.listdir(COMMITS) if n.endswith(".json") and not n.startswith(".")]
            segs = [n[: -len(".json")] for n in names]
            present = set(segs)
            gone = [s for s in self._marks if s not in present]
            new = []
            for s in segs:
                if s in self._marks:
                    continue  # (a damaged mark is read again each time: another process may have repaired it)
                mark, why = self._read_mark(s)
                if why is None and mark is None:
                    continue  # deleted by a compaction meanwhile
                if why is not None:
                    self._bad_marks[s] = f"commit mark {COMMITS}/{s}.json {why}"
                    self._warn_bad_mark(s, why)
                    continue
                self._bad_marks.pop(s, None)
                self._marks[s] = mark
                new.append(s)
            for s in gone:
                del self._marks[s]
            for s in [s for s in self._bad_marks if s not in present]:
                del self._bad_marks[s]
            if not new and not gone:
                return
            incremental = (
                not gone
                and (not self._active or min(new) > self._active[-1])
                and not any(self._marks[s].get("supersedes") or self._marks[s].get("kind") == "compact" for s in new)
                and all(s in self._marks for s in self._active)
            )
            if incremental:
                new.sort()
                self._apply(sorted((e for s in new for e in _mark_events(s, self._marks[s])),
                                   key=lambda e: (e[0], e[1])))
                self._active.extend(new)
            else:
                self._rebuild()

    def _read_mark(self, seg: str, base: str = COMMITS) -> tuple[dict | None, str | None]:
        """(mark, None), (None, what is wrong with it), or (None, None) when there is no such file."""
        try:
            raw = self._b.read_bytes(f"{base}/{seg}.json")
        except FileNotFoundError:
            return None, None
        except OSError as e:
            return None, f"cannot be read ({e.strerror or e})"
        try:
            mark = json.loads(raw)
        except ValueError:
            return None, f"is not valid JSON ({len(raw)} bytes: truncated or overwritten?)"
        why = _mark_problem(mark, seg)
        return (None, why) if why else (mark, None)

    def _warn_bad_mark(self, seg: str, why: str) -> None:
        if (self.url, seg) in _WARNED:
            return
        _WARNED.add((self.url, seg))
        log.warning("%s: commit mark %s/%s.json %s; the clips it committed are hidden from every reader until "
                    "`emollama store repair %s` rebuilds it", self.url, COMMITS, seg, why, self.url)

    @property
    def damaged_marks(self) -> dict[str, str]:
        """Segment -> what is wrong with its commit mark (its clips are hidden until :meth:`repair`)."""
        return dict(self._bad_marks)

    def _superseded(self) -> set[str]:
        out: set[str] = set()
        for m in self._marks.values():
            out.update(m.get("supersedes") or ())
        return out

    def _rebuild(self) -> None:
        sup = self._superseded()
        self._active = sorted(s for s in self._marks if s not in sup)
        self._loc, self._records, self._rec_src = {}, {}, {}
        events = [e for s in self._active for e in _mark_events(s, self._marks[s])]
        events.sort(key=lambda e: (e[0], e[1]))
        self._apply(events)
        live = set(self._active)
        self._arrays = {k: v for k, v in self._arrays.items() if k[1] in live}
        self._readers = {k: v for k, v in self._readers.items() if k[1] in live}

    def _apply(self, events: list[tuple]) -> None:
        loc, recs = self._loc, self._records
        for e in events:
            rank = e[1]
            if rank == _COPY:
                d = loc.get(e[2])
                if d is None:
                    d = loc[e[2]] = {}
                if e[3] not in d:
                    d[e[3]] = (e[4], e[5], e[6], e[0])
            elif rank == _REC:
                clip, rec = e[2], e[3]
                old = recs.get(clip)
                new = {**old, **rec} if old else dict(rec)
                if rec.get("status", "ok") == "ok":
                    new.pop("reason", None)
                recs[clip] = new
                self._rec_src[clip] = (e[0], e[4])
            else:
                key, clip = e[2], e[3]
                if key == "*":
                    for d in loc.values():
                        d.pop(clip, None)
                    recs.pop(clip, None)
                    self._rec_src.pop(clip, None)
                elif key in loc:
                    loc[key].pop(clip, None)

    # ------------------------------------------------------------------ queries
    def complete(self, key: str) -> set[str]:
        """Clip ids whose features are complete in this set."""
        return set(self._loc.get(self.resolve(key), ()))

    def records(self) -> dict[str, dict]:
        """The clip index: clip id -> latest record (status "ok"/"failed", reason, source, ...)."""
        return {c: dict(r) for c, r in self._records.items()}

    def failures(self) -> dict[str, str]:
        """Clip id -> reason, for clips whose latest record failed and that are not complete in every set."""
        keys = list(self._specs)
        out = {}
        for c, r in self._records.items():
            if r.get("status") == "failed" and not all(c in self._loc.get(k, ()) for k in keys):
                out[c] = str(r.get("reason", ""))
        return out

    def clips(self) -> set[str]:
        """Every clip the store knows: in any set, or with a record."""
        out = set(self._records)
        for d in self._loc.values():
            out.update(d)
        return out

    # ------------------------------------------------------------------ reading
    def _array(self, key: str, seg: str) -> Any:
        a = self._arrays.get((key, seg))
        if a is None:
            a = zarr.open_array(store=self._b.zstore, path=f"{SETS}/{key}/{seg}", mode="r")
            self._arrays[(key, seg)] = a
        return a

    def _reader(self, key: str, seg: str) -> ShardReader | None:
        if not self.fast_reads:
            return None
        if (key, seg) not in self._readers:
            rel = f"{SETS}/{key}/{seg}"
            meta = json.loads(self._b.read_bytes(f"{rel}/zarr.json"))
            self._readers[(key, seg)] = ShardReader(Path(self._b.abspath(rel)), meta) if supports(meta) else None
        return self._readers[(key, seg)]

    def read(self, clip_id: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """One clip's features in each of ``keys`` (names or keys), in the stored dtype."""
        if isinstance(keys, str):
            keys = [keys]
        return {self.resolve(k): self.read_many([clip_id], k)[0] for k in keys}

    def read_many(self, clip_ids: Sequence[str], key: str) -> list[np.ndarray]:
        """Many clips of one set with few Zarr calls (one per segment touched)."""
        key = self.resolve(key)
        try:
            return self._read_many(clip_ids, key)
        except (FileNotFoundError, KeyError) as e:
            if isinstance(e, KeyError) and "not complete" in str(e):
                raise
            self.refresh()  # a compaction may have moved the data
            return self._read_many(clip_ids, key)

    def _read_many(self, clip_ids: Sequence[str], key: str) -> list[np.ndarray]:
        loc = self._loc.get(key, {})
        missing = [c for c in clip_ids if c not in loc]
        if missing:
            raise KeyError(
                f"{len(missing)} clip(s) not complete in set {key}: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} (see store.complete(key))"
            )
        out: list[np.ndarray | None] = [None] * len(clip_ids)
        by_seg: dict[str, list[tuple[int, int, int]]] = {}
        for pos, c in enumerate(clip_ids):
            seg, a, b, _ = loc[c]
            by_seg.setdefault(seg, []).append((pos, a, b))
        for seg, items in by_seg.items():
            reader = self._reader(key, seg)
            if reader is not None:
                fixed = items[0][2] == -1
                got = reader.read_spans([(a, a + 1) if fixed else (a, b) for _, a, b in items])
                for (pos, _, _), x in zip(items, got):
                    out[pos] = x[0] if fixed else x
                continue
            arr = self._array(key, seg)
            if items[0][2] == -1:  # fixed: row per clip
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

    # ------------------------------------------------------------------ writing
    def writer(self, writer_id: str | None = None) -> "StoreWriter":
        wid = writer_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return StoreWriter(self, wid)

    def _create_array(self, key: str, seg: str, n_rows: int, attrs: dict) -> tuple[Any, int]:
        spec = self._specs[key]
        chunks, shards = _layout(spec, n_rows)
        arr = zarr.create_array(
            store=self._b.zstore,
            name=f"{SETS}/{key}/{seg}",
            shape=(n_rows, *spec.row_shape),
            dtype=spec.dtype,
            chunks=chunks,
            shards=shards,
            compressors=_compressors(),
            fill_value=0,
            dimension_names=_dimension_names(spec),
            attributes=attrs,
            overwrite=True,
            # an all-zero chunk is still written: a missing shard file then always means damage
            config={"write_empty_chunks": True},
        )
        return arr, shards[0]

    def _write_rows(self, key: str, seg: str, clips: list[str], arrays: Iterator[np.ndarray] | list[np.ndarray],
                    lengths: list[int] | None, origin: list[str] | None = None) -> dict:
        """Write one segment array of ``clips`` (shard by shard); returns the mark entry for the set."""
        spec = self._specs[key]
        if spec.variable:
            assert lengths is not None
            offsets = np.zeros(len(clips) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            n_rows = int(offsets[-1])
        else:
            offsets, n_rows = None, len(clips)
        attrs: dict[str, Any] = {"set": key, "name": spec.name, "segment": seg, "clips": list(clips)}
        if offsets is not None:
            attrs["offsets"] = offsets.tolist()
        arr, shard_rows = self._create_array(key, seg, n_rows, attrs)
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

    def _write_mark(self, seg: str, mark: dict) -> None:
        data = _dumps(mark)
        self._b.write_atomic(f"{COPIES}/{seg}.json", data)  # the copy first: a mark never exists without one
        self._b.write_atomic(f"{COMMITS}/{seg}.json", data)

    def _discard_segment(self, seg: str) -> None:
        """Remove what an uncommitted write of ``seg`` left (its arrays in every set, its mark copy).

        zarr writes a slice's chunks as concurrent tasks and does not cancel the others when one fails
        (a full disk): they finish in zarr's event loop after the error reached us. They are waited for
        first, or a late chunk would land after the removal as an orphan."""
        _settle_zarr_writes()
        for key in self._b.listdir(SETS):
            if not key.startswith(".") and not key.startswith("zarr.") and self._b.exists(f"{SETS}/{key}/{seg}"):
                self._b.remove_tree(f"{SETS}/{key}/{seg}")
        self._b.remove_file(f"{COPIES}/{seg}.json")

    def check_writable(self) -> None:
        """Raise :class:`StorageError` (one line) unless a small file can be written into the store and removed:
        call it before starting work that will write."""
        probe = f"{COMMITS}/.probe-{uuid.uuid4().hex}"
        try:
            self._b.write_atomic(probe, b"\0" * 4096)
            self._b.remove_file(probe)
        except OSError as e:
            try:
                self._b.remove_file(probe)
            except OSError:
                pass
            raise _storage_error(self.url, e, "checking that the store is writable") from None

    def _mark_header(self, seg: str, kind: str, writer: str) -> dict:
        return {"format": FORMAT, "kind": kind, "segment": seg, "writer": writer,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def remove(self, clip_ids: Sequence[str], keys: Sequence[str] | None = None) -> int:
        """Tombstone clips: gone for readers; a rerun recomputes them. ``keys=None``: every set and the
        clip's record (the store forgets the clip). Returns how many clips had something removed."""
        self.refresh()
        if isinstance(clip_ids, str):
            clip_ids = [clip_ids]
        if keys is None:
            hit = [c for c in dict.fromkeys(clip_ids)
                   if c in self._records or any(c in d for d in self._loc.values())]
            removed = {"*": hit}
        else:
            rkeys = [self.resolve(k) for k in keys]
            removed = {k: [c for c in dict.fromkeys(clip_ids) if c in self._loc.get(k, ())] for k in rkeys}
            removed = {k: v for k, v in removed.items() if v}
            hit = sorted({c for v in removed.values() for c in v})
        if not hit:
            return 0
        seg = new_segment_id()
        mark = self._mark_header(seg, "tombstone", f"remove-{os.getpid()}")
        mark["removed"] = removed
        self._write_mark(seg, mark)
        self.refresh()
        return len(hit)

    # ------------------------------------------------------------------ verify / info
    def verify(self, *, deep: bool = True) -> VerifyReport:
        """Check the store: marks parse, arrays exist with consistent shapes/offsets/dtypes, (deep) every
        chunk decodes and values are finite, and every complete clip is present in every set."""
        self.refresh()
        problems: list[str] = list(self._bad_marks.values())
        nseg = 0
        for seg in self._active:
            mark = self._marks[seg]
            for key, info in (mark.get("sets") or {}).items():
                nseg += 1
                problems.extend(self._verify_segment(key, seg, info, deep))
        # completeness: every clip the store knows (and that did not fail) is in every set
        universe = self.clips()
        missing: dict[str, list[str]] = {}
        for c in sorted(universe):
            if self._records.get(c, {}).get("status") == "failed":
                continue
            for key in self._specs:
                if c not in self._loc.get(key, ()):
                    missing.setdefault(key, []).append(c)
        for key, cl in sorted(missing.items()):
            more = f" ... (+{len(cl) - 10})" if len(cl) > 10 else ""
            problems.append(f"set {key}: {len(cl)} clip(s) missing: {', '.join(cl[:10])}{more}")
        return VerifyReport(ok=not problems, problems=problems, checked_segments=nseg,
                            checked_clips=len(universe), orphans=self._orphans(0.0))

    def _verify_segment(self, key: str, seg: str, info: Mapping, deep: bool) -> list[str]:
        where = f"set {key} segment {seg}"
        spec = self._specs.get(key)
        if spec is None:
            return [f"{where}: the commit mark refers to a set that does not exist"]
        try:
            arr = zarr.open_array(store=self._b.zstore, path=f"{SETS}/{key}/{seg}", mode="r")
        except Exception as e:  # noqa: BLE001 - any failure to open is a problem to report
            return [f"{where}: array cannot be opened ({type(e).__name__}: {e})"]
        out = []
        if np.dtype(arr.dtype) != np.dtype(spec.dtype):
            out.append(f"{where}: dtype {arr.dtype} but the spec says {spec.dtype}")
        if tuple(arr.shape[1:]) != spec.row_shape:
            out.append(f"{where}: row shape {tuple(arr.shape[1:])} but the spec says {spec.row_shape}")
        clips = info.get("clips") or []
        if spec.variable:
            off = np.asarray(info.get("offsets") or [], dtype=np.int64)
            if len(off) != len(clips) + 1 or off[0] != 0 or np.any(np.diff(off) < 1) or off[-1] != arr.shape[0]:
                out.append(f"{where}: offsets do not match {len(clips)} clips and {arr.shape[0]} rows")
        elif arr.shape[0] != len(clips):
            out.append(f"{where}: {arr.shape[0]} rows for {len(clips)} clips")
        if out:
            return out
        # every shard file must exist (zarr would silently read a missing one as zeros)
        shard_rows = arr.shards[0] if arr.shards else arr.chunks[0]
        want = math.ceil(arr.shape[0] / shard_rows) if arr.shape[0] else 0
        have = len([p for p, _ in self._b.walk(f"{SETS}/{key}/{seg}/c")])
        if have != want:
            out.append(f"{where}: {have} data file(s) where {want} are expected")
            return out
        if deep:
            step = shard_rows
            for s in range(0, arr.shape[0], step):
                try:
                    block = arr[s : s + step]
                except Exception as e:  # noqa: BLE001
                    out.append(f"{where}: rows {s}..{s + step} do not decode ({type(e).__name__}: {e})")
                    continue
                if np.issubdtype(block.dtype, np.floating) and not np.isfinite(block).all():
                    bad = int((~np.isfinite(block)).reshape(len(block), -1).any(axis=1).sum())
                    out.append(f"{where}: {bad} row(s) in {s}..{s + step} hold NaN or inf")
        return out

    # ------------------------------------------------------------------ repair
    def repair(self, *, deep: bool = True) -> dict:
        """Bring a store with damaged commit marks back to a consistent state; returns what was done.

        Each damaged mark is replaced by its copy (``_commits/.copies``) when that is intact, else rebuilt
        from the segment's own data (each array's attributes hold its clip ids and offsets): the clips
        whose data is intact are back. Set data that is missing or does not verify is left where it is
        (the rebuilt mark lists it under ``unrecovered``, so compaction keeps it) and its clips, like every
        clip that is now missing from some set, get a failed record: a rerun of extraction recomputes them.
        The damaged mark's bytes are kept in ``_commits/.damaged``. Nothing is deleted.
        """
        with self._lock:
            self.refresh()
            out: dict[str, Any] = {"marks": {}, "recovered_clips": 0, "recompute": [], "unrecovered": []}
            recompute: set[str] = set()
            for seg in sorted(self._bad_marks):
                why = self._bad_marks[seg]
                mark, how = self._recover_mark(seg, why, deep, recompute)
                try:
                    raw = self._b.read_bytes(f"{COMMITS}/{seg}.json")
                except OSError:
                    raw = None
                try:
                    if raw is not None:
                        self._b.write_atomic(f"{DAMAGED}/{seg}.json", raw)
                    self._write_mark(seg, mark)
                except OSError as e:
                    raise _storage_error(self.url, e, f"repairing commit mark {seg}") from None
                _WARNED.discard((self.url, seg))
                out["marks"][seg] = how
                out["recovered_clips"] += len({c for info in mark.get("sets", {}).values() for c in info["clips"]})
                out["unrecovered"] += mark.get("unrecovered") or []
            self.refresh()
            # every clip now missing from some set (and not already failed) is marked for recompute
            missing: dict[str, list[str]] = {}
            for c in sorted(self.clips() | recompute):
                if self._records.get(c, {}).get("status") == "failed":
                    continue
                lacks = [k for k in sorted(self._specs) if c not in self._loc.get(k, ())]
                if lacks:
                    missing[c] = lacks
            if missing:
                seg = new_segment_id()
                mark = self._mark_header(seg, "repair", f"repair-{os.getpid()}")
                mark["records"] = {c: {"status": "failed", "reason": f"store repair: features lost from "
                                       f"{', '.join(keys)}; a rerun of extraction recomputes it"}
                                   for c, keys in missing.items()}
                try:
                    self._write_mark(seg, mark)
                except OSError as e:
                    raise _storage_error(self.url, e, "recording the clips to recompute") from None
                self.refresh()
            out["recompute"] = sorted(missing)
            report = self.verify(deep=deep)
            out["ok"], out["problems"] = report.ok, report.problems
            return out

    def _recover_mark(self, seg: str, why: str, deep: bool, recompute: set[str]) -> tuple[dict, str]:
        mark, _ = self._read_mark(seg, COPIES)
        if mark is not None:
            how = "restored from its copy"
        else:
            sets_entry: dict[str, dict] = {}
            unrec: list[str] = []
            for key in self._b.listdir(SETS):
                rel = f"{SETS}/{key}/{seg}"
                if key.startswith(".") or key.startswith("zarr.") or not self._b.listdir(rel):
                    continue
                try:
                    attrs = json.loads(self._b.read_bytes(f"{rel}/zarr.json"))["attributes"]
                    entry = {"clips": attrs["clips"]}
                    if attrs.get("offsets") is not None:
                        entry["offsets"] = attrs["offsets"]
                    if attrs.get("segment", seg) != seg or _mark_problem({"sets": {key: entry}}, seg):
                        raise ValueError("attributes of the wrong shape")
                except (OSError, ValueError, KeyError, TypeError):
                    unrec.append(rel)
                    continue
                sets_entry[key] = entry
            mark = self._mark_header(seg, "repaired", f"repair-{os.getpid()}")
            mark.update({"sets": sets_entry, "records": {}})
            if unrec:
                mark["unrecovered"] = unrec
            n = len({c for e in sets_entry.values() for c in e["clips"]})
            how = (f"rebuilt from its segment data ({n} clip(s) in {len(sets_entry)} set(s))" if sets_entry
                   else "no copy and no readable segment data: nothing to recover (its clips are recomputed by a rerun)")
        # keep only set data that verifies; the rest stays on disk, listed, and its clips are recomputed
        for key, info in list((mark.get("sets") or {}).items()):
            if self._verify_segment(key, seg, info, deep):
                del mark["sets"][key]
                mark.setdefault("unrecovered", []).append(f"{SETS}/{key}/{seg}")
                recompute.update(info["clips"])
        mark["repaired"] = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "was": why,
                            "how": how}
        return mark, how

    def _orphans(self, grace_s: float) -> list[str]:
        """Segment data with no commit mark (e.g. a writer killed mid-write), older than ``grace_s``."""
        marked = set(self._marks) | set(self._bad_marks)
        out = []
        for key in self._b.listdir(SETS):
            if key.startswith("zarr.") or key.startswith("."):
                continue
            for seg in self._b.listdir(f"{SETS}/{key}"):
                if not _SEGMENT_RE.match(seg) or seg in marked:
                    continue
                if _segment_age_s(seg) >= grace_s:
                    out.append(f"{SETS}/{key}/{seg}")
        return out

    def info(self) -> dict:
        """Sets (key, name, clips, bytes, shape, dtype), clips, failures, bytes, files."""
        self.refresh()
        files = self._b.walk("")
        per_set: dict[str, int] = {}
        for p, size in files:
            parts = p.split("/")
            if len(parts) > 2 and parts[0] == SETS:
                per_set[parts[1]] = per_set.get(parts[1], 0) + size
        failures = self.failures()
        sets = []
        for key, spec in sorted(self._specs.items(), key=lambda kv: (kv[1].name, kv[0])):
            sets.append({"key": key, "name": spec.name, "modality": spec.modality, "encoder": spec.encoder,
                         "clips": len(self._loc.get(key, ())), "bytes": per_set.get(key, 0),
                         "shape": ["T" if d is None else d for d in spec.shape], "dtype": spec.dtype})
        return {"url": self.url, "sets": sets, "clips": len(self.clips()), "failures": len(failures),
                "failed": failures, "segments": len(self._active), "bytes": sum(s for _, s in files),
                "files": len(files), "damaged_marks": dict(self._bad_marks)}

    # ------------------------------------------------------------------ compaction
    def compact(self, min_segments: int = 2, *, full: bool = False, grace_s: float = GRACE_S,
                keep_s: float = 0.0) -> dict:
        """Merge the small segments of each set into one large sharded segment.

        Live rows only (duplicates and tombstoned rows are dropped); the new mark lists the old
        segments in ``supersedes``; then the old marks and data are deleted. Crash-safe at every
        point: before the new mark exists nothing changed for readers; after it, the old segments
        are ignored whether or not they have been deleted yet. ``full`` also rewrites earlier
        compacted segments. Orphan data older than ``grace_s`` seconds is deleted. Merged segments
        are deleted once their merge is ``keep_s`` seconds old (0: at once), so readers that opened
        the store before the merge (a training run in another process) keep finding their data.

        Returns what it did: ``compacted`` (segments merged), ``segments_written``, ``merged_deleted``
        (merged segments deleted, including those of an earlier compaction), ``orphans_deleted``,
        ``files_before/after``, ``files_removed``, ``files_written``, ``bytes_before/after``, ``bytes_freed``
        and ``segments_before/after``. On a full disk (or any other write error) the new segment's partial
        output is removed, the store is left as it was, and :class:`StorageError` is raised.
        """
        with self._lock:
            self.refresh()
            before = dict(self._b.walk(""))
            result: dict[str, Any] = {"segments_before": len(self._active), "compacted": 0, "segments_written": 0,
                                      "files_before": len(before), "bytes_before": sum(before.values())}
            # finish an interrupted (or deferred) compaction
            result["merged_deleted"] = self._delete_superseded(keep_s)
            cands = [s for s in self._active if (full or self._marks[s].get("kind") != "compact")
                     and not self._marks[s].get("unrecovered")]  # repair() left data there nothing else has
            if len(cands) >= max(min_segments, 1):
                try:
                    self._compact(cands, grace_s, keep_s)
                except OSError as e:
                    if isinstance(e, StorageError):
                        raise
                    cand = set(cands)
                    need = sum(n for p, n in before.items() if p.startswith(f"{SETS}/") and len(p.split("/")) > 3
                               and p.split("/")[2] in cand)
                    raise _storage_error(self.url, e, "compacting", need_bytes=need) from None
                result["compacted"] = len(cands)
                result["segments_written"] = 1
                result["merged_deleted"] += self._delete_superseded(keep_s)
            result["orphans_deleted"] = self._gc(grace_s)
            self.refresh()
            after = dict(self._b.walk(""))
            result.update(segments_after=len(self._active), files_after=len(after), bytes_after=sum(after.values()),
                          files_removed=len(before.keys() - after.keys()), files_written=len(after.keys() - before.keys()))
            result["bytes_freed"] = result["bytes_before"] - result["bytes_after"]
            return result

    def _hook(self, step: str) -> None:
        if self._compact_hook is not None:
            self._compact_hook(step)

    def _compact(self, cands: list[str], grace_s: float, keep_s: float = 0.0) -> str:
        seg = new_segment_id()
        try:
            return self._compact_into(seg, cands, grace_s)
        except BaseException:
            # the new mark is written last and atomically: without it nothing of seg is committed, so
            # what was written goes now (a full disk must not keep orphans until the grace period ends)
            if not self._b.exists(f"{COMMITS}/{seg}.json"):
                try:
                    self._discard_segment(seg)
                except OSError as e2:  # noqa: PERF203 - best effort; the next compact's gc finishes it
                    log.warning("could not remove the partial compaction output %s: %s", seg, e2)
            raise

    def _compact_into(self, seg: str, cands: list[str], grace_s: float) -> str:
        cand = set(cands)
        # what the non-candidate (kept) marks hold, so tombstones hiding their rows are carried on
        kept_copies: set[tuple[str, str]] = set()
        kept_clips: set[str] = set()
        cand_tombs: list[tuple] = []
        for s in self._active:
            for e in _mark_events(s, self._marks[s]):
                if s in cand:
                    if e[1] == _TOMB:
                        cand_tombs.append(e)
                elif e[1] == _COPY:
                    kept_copies.add((e[2], e[3]))
                    kept_clips.add(e[3])
                elif e[1] == _REC:
                    kept_clips.add(e[2])
        removed_at: dict[str, dict[str, str]] = {}
        for order, _, key, clip, _s in cand_tombs:
            hides = (key, clip) in kept_copies or (key == "*" and clip in kept_clips)
            if hides or _segment_age_s(order) < grace_s:
                d = removed_at.setdefault(key, {})
                d[clip] = max(d.get(clip, order), order)
        sets_entry: dict[str, dict] = {}
        for key, loc in self._loc.items():
            if key not in self._specs:
                continue
            items = sorted(((c, l) for c, l in loc.items() if l[0] in cand), key=lambda cl: (cl[1][0], cl[1][1]))
            if not items:
                continue
            clips = [c for c, _ in items]
            origin = [l[3] for _, l in items]
            lengths = [l[2] - l[1] for _, l in items] if self._specs[key].variable else None
            sets_entry[key] = self._write_rows(key, seg, clips, self._iter_rows(key, items), lengths, origin)
        self._hook("data-written")
        records = {c: r for c, r in self._records.items() if self._rec_src.get(c, ("", ""))[1] in cand}
        sup = set(cands)
        for s in cands:
            sup.update(x for x in (self._marks[s].get("supersedes") or ()) if x in self._marks)
        mark = self._mark_header(seg, "compact", f"compact-{os.getpid()}")
        mark.update({"sets": sets_entry, "records": records,
                     "record_origin": {c: self._rec_src[c][0] for c in records},
                     "removed_at": removed_at, "supersedes": sorted(sup)})
        self._write_mark(seg, mark)
        self._hook("mark-written")
        self.refresh()
        return seg

    def _iter_rows(self, key: str, items: list[tuple[str, tuple]]) -> Iterator[np.ndarray]:
        """Rows of ``items`` (sorted by segment, position) read in large contiguous windows."""
        spec = self._specs[key]
        row_bytes = int(np.prod(spec.row_shape)) * np.dtype(spec.dtype).itemsize
        window = max(1, (64 * 1024 * 1024) // max(row_bytes, 1))
        i = 0
        while i < len(items):
            seg = items[i][1][0]
            arr = self._array(key, seg)
            j = i
            lo = items[i][1][1]
            while j < len(items) and items[j][1][0] == seg:
                a, b = items[j][1][1], items[j][1][2]
                end = a + 1 if b == -1 else b
                if end - lo > window and j > i:
                    break
                j += 1
            last = items[j - 1][1]
            hi = last[1] + 1 if last[2] == -1 else last[2]
            data = arr[lo:hi]
            for _, (_, a, b, _) in items[i:j]:
                yield data[a - lo] if b == -1 else data[a - lo : b - lo]
            i = j

    def _delete_superseded(self, keep_s: float = 0.0) -> int:
        """Delete marks listed in some ``supersedes`` whose merge is at least ``keep_s`` seconds old
        (marks first, then their data). Returns how many segments were deleted."""
        merged_by: dict[str, str] = {}
        for seg, m in self._marks.items():
            for s in m.get("supersedes") or ():
                merged_by[s] = min(merged_by.get(s, seg), seg)
        doomed = [s for s in self._marks if s in merged_by and _segment_age_s(merged_by[s]) >= keep_s]
        if not doomed:
            return 0
        for s in doomed:
            self._b.remove_file(f"{COMMITS}/{s}.json")
        for s in doomed:
            self._b.remove_file(f"{COPIES}/{s}.json")
        self._hook("marks-deleted")
        if doomed:
            for key in self._b.listdir(SETS):
                if key.startswith("zarr.") or key.startswith("."):
                    continue
                present = set(self._b.listdir(f"{SETS}/{key}"))
                for s in doomed:
                    if s in present:
                        self._b.remove_tree(f"{SETS}/{key}/{s}")
            self.refresh()
        return len(doomed)

    def _gc(self, grace_s: float) -> int:
        self.refresh()
        orphans = self._orphans(grace_s)
        for p in orphans:
            self._b.remove_tree(p)
        # mark copies whose mark never came (a writer died between the two) or went with a compaction
        marked = set(self._marks) | set(self._bad_marks)
        for name in self._b.listdir(COPIES):
            s = name[: -len(".json")] if name.endswith(".json") else ""
            if _SEGMENT_RE.match(s) and s not in marked and _segment_age_s(s) >= grace_s:
                self._b.remove_file(f"{COPIES}/{name}")
        return len(orphans)


class StoreWriter:
    """Collects clips and commits them as one segment per set (data first, then the commit mark).

    Use as a context manager: on a clean exit pending clips are committed, on an exception discarded.
    One writer owns its segments alone, so any number of writers may write into one store at once.
    """

    def __init__(self, store: FeatureStore, writer_id: str) -> None:
        self.store = store
        self.writer_id = writer_id
        self._feats: dict[str, dict[str, np.ndarray]] = {}
        self._records: dict[str, dict] = {}
        self._replace: dict[str, set[str]] = {}  # clip -> set keys whose earlier copies this commit supersedes
        self.segments: list[str] = []

    @property
    def pending(self) -> int:
        """Clips (features or failures) waiting for :meth:`commit`."""
        return len(self._records)

    def add(self, clip_id: str, features: Mapping[str, np.ndarray], record: Mapping | None = None, *,
            replace: bool = False) -> None:
        """Queue one clip's features (keyed by set key or unique name); shapes are checked against the spec.

        ``replace``: the clip's earlier copies in these sets are superseded by this commit's mark itself
        (a tombstone ordered just before the new copy), so there is no moment at which the clip has no
        features, and the earlier ones stay if the commit never happens."""
        if not isinstance(clip_id, str) or not clip_id or "/" in clip_id:
            raise ValueError(f"clip id must be a non-empty string without '/', got {clip_id!r}")
        if not features:
            raise ValueError(f"clip {clip_id!r}: no features given (use fail() to record a failure)")
        checked = {}
        for k, v in features.items():
            try:
                key = self.store.resolve(k)
            except KeyError as e:
                raise KeyError(f"{e.args[0]}; call store.ensure_set(spec) before writing") from None
            checked[key] = self.store._specs[key].check(clip_id, v)
        self._feats.setdefault(clip_id, {}).update(checked)
        if replace:
            self._replace.setdefault(clip_id, set()).update(checked)
        rec = {**self._records.get(clip_id, {}), **dict(record or {}), "status": "ok"}
        rec.pop("reason", None)
        self._records[clip_id] = rec

    def fail(self, clip_id: str, reason: str, record: Mapping | None = None) -> None:
        """Record that a clip failed (and drop any of its features queued in this writer)."""
        self._feats.pop(clip_id, None)
        self._replace.pop(clip_id, None)
        self._records[clip_id] = {**dict(record or {}), "status": "failed", "reason": str(reason)}

    def commit(self) -> str | None:
        """Write the pending clips as one segment per set, then the commit mark. Returns the segment id."""
        if not self._records:
            return None
        store = self.store
        seg = new_segment_id()
        by_key: dict[str, list[tuple[str, np.ndarray]]] = {}
        for clip, feats in self._feats.items():
            for key, x in feats.items():
                by_key.setdefault(key, []).append((clip, x))
        sets_entry = {}
        try:
            for key, items in by_key.items():
                lengths = [len(x) for _, x in items] if store._specs[key].variable else None
                sets_entry[key] = store._write_rows(key, seg, [c for c, _ in items], [x for _, x in items], lengths)
            mark = store._mark_header(seg, "data", self.writer_id)
            mark.update({"sets": sets_entry, "records": self._records})
            removed_at: dict[str, dict[str, str]] = {}
            for clip, ks in self._replace.items():
                for k in ks:
                    removed_at.setdefault(k, {})[clip] = seg  # sorts before this mark's own copy of the clip
            if removed_at:
                mark["removed_at"] = removed_at
            store._write_mark(seg, mark)
        except BaseException as e:
            # nothing of seg is committed (the mark is written last, atomically): remove what was written
            try:
                store._discard_segment(seg)
            except OSError as e2:
                log.warning("could not remove the uncommitted segment %s: %s", seg, e2)
            if isinstance(e, OSError) and not isinstance(e, StorageError):
                raise _storage_error(store.url, e, f"committing {len(self._records)} clip(s)") from e
            raise
        self._feats, self._records, self._replace = {}, {}, {}
        self.segments.append(seg)
        store.refresh()
        log.debug("committed segment %s (%d sets)", seg, len(sets_entry))
        return seg

    def discard(self) -> None:
        self._feats, self._records, self._replace = {}, {}, {}

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
