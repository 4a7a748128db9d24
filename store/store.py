"""The log-structured Zarr v3 feature store: :class:`FeatureStore`, a thin facade over its parts.

Layout under the root (a local directory or any fsspec URL)::

    zarr.json                   root group, attrs {"emollama": {"format": 1, "version": ...}}
    sets/zarr.json              plain group
    sets/<key>/zarr.json        one group per feature set, attrs {key, name, spec, version, config}
                                (config: the job that made it; its [extract] profile: `profiles()`)
    sets/<key>/<segment>/       one sharded array per (set, segment): the clips of one committed batch
    _commits/<segment>.json     the completion mark of a segment, written last in one whole-object write
    _commits/.copies/<seg>.json a copy of that mark, written just before it (``repair()`` restores a
                                damaged mark from it; a copy without a mark is an uncommitted write)
    _commits/.damaged/<seg>.json the bytes of a mark that ``repair()`` replaced (kept, never read)

The parts, one concern each:

- :mod:`.marks`: the commit log (mark files, their validation, typed replay events, the live state:
  which clip lives where, records, failures, tombstones). Replay rules are in its docstring.
- :mod:`.segments`: segment arrays (layout, codecs, writing rows, reading rows, the local fast path).
- :mod:`.maintenance`: verify, repair, compact and the garbage collection a crash or compaction leaves.
- :mod:`.writer`: :class:`StoreWriter`, which commits a batch as data, then the mark's copy, then the mark.
- :mod:`.xview`: :meth:`FeatureStore.to_xarray`, a whole set as one lazy xarray/dask array.

A mark that cannot be read or has the wrong shape hides its clips; every open says so (one warning
line), ``verify()`` lists it and ``repair()`` rebuilds it from its copy or from the segment's own data.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._backend import Backend, LocalBackend, open_backend
from .errors import StorageError, StoreFullError, UnknownSetError, storage_error
from .maintenance import GRACE_S, Maintenance, VerifyReport, warn_damaged
from .marks import COMMITS, FORMAT, ClipCopy, CommitLog, dumps, mark_header, new_segment_id
from .segments import SETS, Segments
from .spec import FeatureSpec
from . import xview
from .writer import StoreWriter

log = logging.getLogger(__name__)

__all__ = ["FeatureStore", "StoreWriter", "VerifyReport", "StorageError", "StoreFullError", "NotAStoreError",
           "new_segment_id",
           "FORMAT", "IMPORTED", "TINY_NOTE", "profile_summary"]


IMPORTED = "imported"   # the profile of a set that records no extraction config (FeatureStore.profiles)
TINY_NOTE = "tiny: random tiny encoders, a test fixture; these features say nothing about emotion"


def profile_summary(profiles: dict[str, str], *, note: bool = False) -> str:
    """Several sets' profiles (`FeatureStore.profiles`) in one word when they agree ("tiny"), else each
    profile with its number of sets ("paper (3 sets), imported (1 set)"); `note`: TINY_NOTE appended
    in brackets when any set is tiny (the printed summaries; JSON keeps the plain word)."""
    counts: dict[str, int] = {}
    for p in profiles.values():
        counts[p] = counts.get(p, 0) + 1
    if len(counts) <= 1:
        out = next(iter(counts), "none")
    else:
        out = ", ".join(f"{p} ({n} set{'s' if n > 1 else ''})" for p, n in counts.items())
    return out + (f"  ({TINY_NOTE})" if note and "tiny" in counts else "")


def _version() -> str:
    try:
        return version("emollama")
    except Exception:  # noqa: BLE001 - not installed (e.g. run from a checkout)
        return "0+unknown"


class NotAStoreError(FileNotFoundError, ValueError):
    """The path holds something that is not an emollama feature store (a file, another Zarr group): it is
    refused as it is, nothing is written into it. A FileNotFoundError (no store there) and a ValueError."""


def _store_format(raw: bytes) -> int | None:
    """The emollama store format a root zarr.json declares, None when it declares none (or is no JSON)."""
    try:
        meta = json.loads(raw)
        fmt = meta["attributes"]["emollama"]["format"]
    except (ValueError, KeyError, TypeError):
        return None
    return fmt if isinstance(fmt, int) and not isinstance(fmt, bool) else None


class FeatureStore:
    """A Zarr v3 feature store; open it with :meth:`FeatureStore.open`.

    The facade keeps the set catalog (``sets/<key>/zarr.json``) and delegates the rest: ``commits``
    (:class:`~.marks.CommitLog`: marks and their replay) and ``segments`` (:class:`~.segments.Segments`:
    the arrays' row I/O) are the layers writers and tools build on; verify, repair and compact run in
    :class:`~.maintenance.Maintenance`.
    """

    def __init__(self, backend: Backend) -> None:
        self._b = backend
        self.url: str = backend.url
        self._lock = threading.RLock()
        self._specs: dict[str, FeatureSpec] = {}
        self.commits = CommitLog(backend, on_damaged=self._warn_damaged)
        self.segments = Segments(backend)
        self._maintenance = Maintenance(self.url, backend, self.commits, self.segments, self._specs, self.refresh)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls, url: str | Path, *, create: bool = True, storage_options: dict | None = None
    ) -> "FeatureStore":
        """Open (and by default create) a store at a local path or fsspec URL (``s3://bucket/prefix``)."""
        b = open_backend(url, storage_options)
        if isinstance(b, LocalBackend) and b.root.exists() and not b.root.is_dir():
            raise NotAStoreError(f"{b.url} is a file, not a feature store (a store is a folder): pass the folder "
                                 "that `emollama extract` wrote, or a new path for a new store")
        try:
            raw = b.read_bytes("zarr.json")
        except (FileNotFoundError, OSError, KeyError):
            raw = None
        if raw is None:
            if not create:
                raise FileNotFoundError(f"no feature store at {b.url}: pass the folder (or URL) that "
                                        "`emollama extract` wrote")
            if not b.is_empty():
                raise FileExistsError(
                    f"{b.url} exists, is not empty and is not an emollama feature store (no zarr.json); "
                    "pick an empty or new location"
                )
            root = {"zarr_format": 3, "node_type": "group",
                    "attributes": {"emollama": {"format": FORMAT, "version": _version()}}}
            b.write_atomic("zarr.json", dumps(root), exclusive=True)
            b.write_atomic(f"{SETS}/zarr.json", dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}),
                           exclusive=True)
        else:
            fmt = _store_format(raw)
            if fmt is None:
                raise NotAStoreError(f"{b.url} is a Zarr group but not an emollama feature store (its zarr.json has "
                                     "no attributes.emollama, or is not JSON): nothing was written into it; pick an empty or new "
                                     "location for a store")
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

    @property
    def fast_reads(self) -> bool:
        """Read local shards directly (see ``_fastread``); on by default for a local store."""
        return self.segments.fast_reads

    @fast_reads.setter
    def fast_reads(self, on: bool) -> None:
        self.segments.fast_reads = bool(on)

    def __repr__(self) -> str:
        return f"FeatureStore({self.url!r}, sets={len(self._specs)}, segments={len(self.commits.live.active)})"

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
                     "config": json.loads(dumps(config or {}))}
            meta = {"zarr_format": 3, "node_type": "group", "attributes": attrs}
            self._b.write_atomic(f"{SETS}/{key}/zarr.json", dumps(meta), exclusive=True)
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
        for name in self.segments.set_folders():  # (zarr's temporary files end in .partial: skipped too)
            if name not in self._specs:
                self._load_set(name)

    def sets(self) -> dict[str, FeatureSpec]:
        """Key -> spec of every set in the store."""
        return dict(self._specs)

    def spec(self, name_or_key: str) -> FeatureSpec:
        """The spec of one set (a key, or a name that exactly one set has)."""
        return self._specs[self.resolve(name_or_key)]

    def set_attrs(self, key: str) -> dict:
        """The set group's attributes (key, name, spec, version, config)."""
        return json.loads(self._b.read_bytes(f"{SETS}/{self.resolve(key)}/zarr.json"))["attributes"]

    def profiles(self, keys: Sequence[str] | None = None) -> dict[str, str]:
        """Which encoder profile made each set (`keys`, names or keys; default every set): key -> the
        `[extract] profile` of the config stage one records with every set it makes ("paper", "tiny"),
        or IMPORTED for a set that records no extraction config (`store import`: released features, .npy
        folders). The one place that answers it: extraction, `store info`, training and eval all ask here."""
        out = {}
        for k in (self.sets() if keys is None else keys):
            key = self.resolve(k)
            extract = (self.set_attrs(key).get("config") or {}).get("extract")
            out[key] = str(extract.get("profile") or "unknown") if isinstance(extract, dict) else IMPORTED
        return out

    def resolve(self, name_or_key: str) -> str:
        """A set key from a key or a readable name (when exactly one set has that name)."""
        for attempt in range(2):
            if name_or_key in self._specs:
                return name_or_key
            hits = sorted(k for k, s in self._specs.items() if s.name == name_or_key)
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise UnknownSetError(
                    f"set name {name_or_key!r} is ambiguous in {self.url}: it matches {hits}; pass one of these keys"
                )
            if attempt == 0:
                self._refresh_sets()
        have = ", ".join(sorted(self._specs)) or "none"
        raise UnknownSetError(f"no feature set {name_or_key!r} in {self.url} (sets: {have})")

    # ------------------------------------------------------------------ replay
    def refresh(self) -> None:
        """Re-read the commit marks (picks up other writers' commits and compactions)."""
        with self._lock:
            self._refresh_sets()
            if self.commits.refresh():  # rebuilt: drop what was opened for segments that are gone
                self.segments.keep(set(self.commits.live.active))

    def _warn_damaged(self, seg: str, why: str) -> None:
        warn_damaged(self.url, seg, why)

    @property
    def damaged_marks(self) -> dict[str, str]:
        """Segment -> what is wrong with its commit mark (its clips are hidden until :meth:`repair`)."""
        return dict(self.commits.damaged)

    # ------------------------------------------------------------------ queries
    def complete(self, key: str) -> set[str]:
        """Clip ids whose features are complete in this set."""
        return set(self.commits.live.copies.get(self.resolve(key), ()))

    def records(self) -> dict[str, dict]:
        """The clip index: clip id -> latest record (status "ok"/"failed", reason, source, ...)."""
        return {c: dict(r) for c, r in self.commits.live.records.items()}

    def failures(self) -> dict[str, str]:
        """Clip id -> reason, for clips whose latest record failed and that are not complete in every set."""
        live = self.commits.live
        keys = list(self._specs)
        out = {}
        for c, r in live.records.items():
            if r.get("status") == "failed" and not all(c in live.copies.get(k, ()) for k in keys):
                out[c] = str(r.get("reason", ""))
        return out

    def clips(self) -> set[str]:
        """Every clip the store knows: in any set, or with a record."""
        return self.commits.live.clips()

    def locations(self, key: str) -> dict[str, ClipCopy]:
        """Clip id -> where its live copy in set ``key`` (name or key) lives: segment and rows."""
        return dict(self.commits.live.copies.get(self.resolve(key), {}))

    def nbytes(self, key: str, clip_ids: Sequence[str] | None = None) -> int:
        """Bytes (uncompressed, stored dtype) that :meth:`read_many` returns for ``clip_ids`` (default: every
        complete clip) of set ``key``; KeyError for a clip that is not complete."""
        key = self.resolve(key)
        spec = self._specs[key]
        copies = self.commits.live.copies.get(key, {})
        ids = list(copies) if clip_ids is None else clip_ids
        item = np.dtype(spec.dtype).itemsize * int(np.prod(spec.row_shape))
        if not spec.variable:
            return item * len(ids)
        return item * sum(copies[c].n_rows for c in ids)

    # ------------------------------------------------------------------ reading
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
        copies = self.commits.live.copies.get(key, {})
        missing = [c for c in clip_ids if c not in copies]
        if missing:
            raise KeyError(
                f"{len(missing)} clip(s) not complete in set {key}: {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''} (see store.complete(key))"
            )
        return self.segments.read(key, [copies[c] for c in clip_ids])

    def to_xarray(self, key: str) -> Any:
        """Set ``key`` (name or key) as one lazy ``xarray.DataArray`` over all its complete clips, backed by
        dask (one chunk per segment slice; nothing is read until computed). A fixed-shape set is indexed by
        a ``clip`` coordinate; a variable-length one is its rows concatenated, indexed by ``(clip, position)``
        (``da.sel(clip=c)`` gives that clip's rows). Needs xarray (``pip install xarray``). See :mod:`.xview`."""
        return xview.to_xarray(self, key)

    # ------------------------------------------------------------------ writing
    def writer(self, writer_id: str | None = None) -> StoreWriter:
        wid = writer_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return StoreWriter(self, wid)

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
            raise storage_error(self.url, e, "checking that the store is writable") from None

    def remove(self, clip_ids: Sequence[str], keys: Sequence[str] | None = None) -> int:
        """Tombstone clips: gone for readers; a rerun recomputes them. ``keys=None``: every set and the
        clip's record (the store forgets the clip). Returns how many clips had something removed."""
        self.refresh()
        live = self.commits.live
        if isinstance(clip_ids, str):
            clip_ids = [clip_ids]
        if keys is None:
            hit = [c for c in dict.fromkeys(clip_ids)
                   if c in live.records or any(c in d for d in live.copies.values())]
            removed = {"*": hit}
        else:
            rkeys = [self.resolve(k) for k in keys]
            removed = {k: [c for c in dict.fromkeys(clip_ids) if c in live.copies.get(k, ())] for k in rkeys}
            removed = {k: v for k, v in removed.items() if v}
            hit = sorted({c for v in removed.values() for c in v})
        if not hit:
            return 0
        seg = new_segment_id()
        mark = mark_header(seg, "tombstone", f"remove-{os.getpid()}")
        mark["removed"] = removed
        self.commits.write(seg, mark)
        self.refresh()
        return len(hit)

    # ------------------------------------------------------------------ maintenance
    def verify(self, *, deep: bool = True) -> VerifyReport:
        """Check the store: marks parse, arrays exist with consistent shapes/offsets/dtypes, (deep) every
        chunk decodes and values are finite, and every complete clip is present in every set."""
        return self._maintenance.verify(deep=deep)

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
            return self._maintenance.repair(deep=deep)

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
            return self._maintenance.compact(min_segments, full=full, grace_s=grace_s, keep_s=keep_s)

    def info(self) -> dict:
        """Sets (key, name, clips, bytes, shape, dtype, profile), clips, failures, bytes, files."""
        self.refresh()
        files = self._b.walk("")
        per_set: dict[str, int] = {}
        for p, size in files:
            parts = p.split("/")
            if len(parts) > 2 and parts[0] == SETS:
                per_set[parts[1]] = per_set.get(parts[1], 0) + size
        failures = self.failures()
        copies = self.commits.live.copies
        sets = []
        profiles = self.profiles()
        for key, spec in sorted(self._specs.items(), key=lambda kv: (kv[1].name, kv[0])):
            sets.append({"key": key, "name": spec.name, "modality": spec.modality, "encoder": spec.encoder,
                         "clips": len(copies.get(key, ())), "bytes": per_set.get(key, 0),
                         "shape": ["T" if d is None else d for d in spec.shape], "dtype": spec.dtype,
                         "profile": profiles[key]})
        return {"url": self.url, "sets": sets, "clips": len(self.clips()), "failures": len(failures),
                "failed": failures, "segments": len(self.commits.live.active), "bytes": sum(s for _, s in files),
                "files": len(files), "damaged_marks": dict(self.commits.damaged)}
