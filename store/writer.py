"""StoreWriter: collects clips and commits them as one segment per set (data, then the mark's copy, then the mark).

It builds on the store's public layers only: the set catalog (``store.resolve``, ``store.spec``), the
segment arrays (``store.segments``) and the commit log (``store.commits``).
"""

from __future__ import annotations

import logging
from typing import Mapping, Protocol

import numpy as np

from .errors import StorageError, storage_error
from .marks import CommitLog, mark_header, new_segment_id
from .segments import Segments
from .spec import FeatureSpec

log = logging.getLogger("emollama.store.store")  # the store's one logger (its lines read as they always did)

__all__ = ["StoreWriter"]


class WritableStore(Protocol):
    """What a writer needs of a store (``FeatureStore`` is one): the set catalog, the segment arrays, the
    commit log. Declared here so that the writer does not import the store that makes writers."""

    url: str
    segments: Segments
    commits: CommitLog

    def resolve(self, name_or_key: str) -> str: ...
    def spec(self, name_or_key: str) -> FeatureSpec: ...
    def refresh(self) -> None: ...


class StoreWriter:
    """Collects clips and commits them as one segment per set (data first, then the commit mark).

    Use as a context manager: on a clean exit pending clips are committed, on an exception discarded.
    One writer owns its segments alone, so any number of writers may write into one store at once.
    """

    def __init__(self, store: WritableStore, writer_id: str) -> None:
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
            checked[key] = self.store.spec(key).check(clip_id, v)
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
                spec = store.spec(key)
                lengths = [len(x) for _, x in items] if spec.variable else None
                sets_entry[key] = store.segments.write_rows(spec, key, seg, [c for c, _ in items],
                                                            [x for _, x in items], lengths)
            mark = mark_header(seg, "data", self.writer_id)
            mark.update({"sets": sets_entry, "records": self._records})
            removed_at: dict[str, dict[str, str]] = {}
            for clip, ks in self._replace.items():
                for k in ks:
                    removed_at.setdefault(k, {})[clip] = seg  # sorts before this mark's own copy of the clip
            if removed_at:
                mark["removed_at"] = removed_at
            store.commits.write(seg, mark)
        except BaseException as e:
            # nothing of seg is committed (the mark is written last, atomically): remove what was written
            try:
                store.segments.discard(seg)
                store.commits.remove_copy(seg)
            except OSError as e2:
                log.warning("could not remove the uncommitted segment %s: %s", seg, e2)
            if isinstance(e, OSError) and not isinstance(e, StorageError):
                raise storage_error(store.url, e, f"committing {len(self._records)} clip(s)") from e
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
