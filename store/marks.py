"""The commit log: one mark per committed segment, replayed in order into the store's live state.

A mark (``_commits/<segment>.json``) is written last, in one whole-object write, after the segment's
data and after a copy of itself (``_commits/.copies/<segment>.json``, which ``repair()`` restores a
damaged mark from). A segment exists for readers only once its mark exists.

Replay turns each mark into typed events (:class:`Tombstone`, :class:`ClipCopy`, :class:`ClipRecord`)
and applies them sorted by ``(order, rank)``: a copy's order is the id of the segment that first wrote
the clip (segment ids sort by time); at equal order a tombstone comes before a copy, a copy before a
record. The first copy of a clip after the latest tombstone for it wins; records merge in order (a later
success replaces an earlier failure). Marks listed in some compaction mark's ``supersedes`` are ignored.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Mapping, Union

import numpy as np

from ._backend import Backend

__all__ = ["FORMAT", "COMMITS", "COPIES", "DAMAGED", "SEGMENT_RE", "Tombstone", "ClipCopy", "ClipRecord", "Event",
           "LiveState", "CommitLog", "mark_events", "mark_problem", "mark_header", "new_segment_id",
           "segment_age_s", "dumps"]

FORMAT = 1
COMMITS = "_commits"
COPIES = f"{COMMITS}/.copies"    # a copy of every mark, for repair()
DAMAGED = f"{COMMITS}/.damaged"  # damaged marks that repair() replaced, kept as they were
SEGMENT_RE = re.compile(r"^\d{20}-[0-9a-f]{8}$")


def new_segment_id() -> str:
    """Time-sortable, unique: ``<time_ns:020d>-<8 hex>``."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def segment_age_s(seg: str) -> float:
    """Seconds since segment ``seg`` was named (inf for a name that holds no time)."""
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


def dumps(obj: Any) -> bytes:
    """The store's JSON: sorted keys, no whitespace, numpy values as plain numbers."""
    return json.dumps(obj, default=_json_default, sort_keys=True, separators=(",", ":")).encode()


def mark_header(seg: str, kind: str, writer: str) -> dict:
    """The fields every mark starts with; ``kind`` is data, tombstone, compact, repair or repaired."""
    return {"format": FORMAT, "kind": kind, "segment": seg, "writer": writer,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _is_list_of(x: Any, t: type) -> bool:
    return isinstance(x, list) and all(isinstance(v, t) and not isinstance(v, bool) for v in x)


def mark_problem(mark: Any, seg: str) -> str | None:
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


# ---------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class Tombstone:
    """Clip ``clip`` is gone from set ``key`` ("*": from every set, and its record) as of ``order``."""

    order: str
    key: str
    clip: str
    segment: str  # the mark that holds it
    rank: ClassVar[int] = 0


@dataclass(frozen=True, slots=True)
class ClipCopy:
    """A copy of one clip's rows in the array ``sets/<key>/<segment>``: row ``start`` of a fixed-shape set
    (``stop`` is None), rows ``[start, stop)`` of a variable-length one. ``order`` is the segment that first
    wrote the clip (a compaction keeps it), so a copy merged later still sorts where it was written."""

    order: str
    key: str
    clip: str
    segment: str
    start: int
    stop: int | None
    rank: ClassVar[int] = 1

    @property
    def rows(self) -> tuple[int, int]:
        """``[start, stop)`` of the clip's rows in its segment array."""
        return (self.start, self.start + 1) if self.stop is None else (self.start, self.stop)

    @property
    def n_rows(self) -> int:
        """Rows the clip holds: 1 for a fixed-shape set (one row per clip), its length for a variable one."""
        return 1 if self.stop is None else self.stop - self.start


@dataclass(frozen=True, slots=True)
class ClipRecord:
    """The record (status, reason, source, ...) a mark holds for ``clip``; merged into earlier ones."""

    order: str
    clip: str
    record: Mapping[str, Any]
    segment: str  # the mark that holds it
    rank: ClassVar[int] = 2


Event = Union[Tombstone, ClipCopy, ClipRecord]


def mark_events(seg: str, mark: Mapping[str, Any]) -> list[Event]:
    """The events of one (valid) mark, in the order they appear in it."""
    ev: list[Event] = []
    for key, info in (mark.get("sets") or {}).items():
        clips = info["clips"]
        origin = info.get("origin") or [seg] * len(clips)
        offsets = info.get("offsets")
        if offsets is None:
            for i, (c, o) in enumerate(zip(clips, origin)):
                ev.append(ClipCopy(o, key, c, seg, i, None))
        else:
            for i, (c, o) in enumerate(zip(clips, origin)):
                ev.append(ClipCopy(o, key, c, seg, offsets[i], offsets[i + 1]))
    for key, clips in (mark.get("removed") or {}).items():
        for c in clips:
            ev.append(Tombstone(seg, key, c, seg))
    for key, by_clip in (mark.get("removed_at") or {}).items():
        for c, o in by_clip.items():
            ev.append(Tombstone(o, key, c, seg))
    rec_origin = mark.get("record_origin") or {}
    for c, rec in (mark.get("records") or {}).items():
        ev.append(ClipRecord(rec_origin.get(c, seg), c, rec, seg))
    return ev


def _replay_order(e: Event) -> tuple[str, int]:
    return e.order, e.rank


# ---------------------------------------------------------------------- live state
@dataclass
class LiveState:
    """What replaying the live marks gives: where each clip's rows live, and each clip's record."""

    active: list[str] = field(default_factory=list)  # live segments (not superseded), sorted
    copies: dict[str, dict[str, ClipCopy]] = field(default_factory=dict)  # set key -> clip -> its live copy
    records: dict[str, dict] = field(default_factory=dict)  # clip -> merged record
    record_src: dict[str, ClipRecord] = field(default_factory=dict)  # clip -> its latest record event

    def apply(self, events: Iterable[Event]) -> None:
        """Apply events already sorted by ``(order, rank)``."""
        copies, recs, src = self.copies, self.records, self.record_src
        for e in events:
            if isinstance(e, ClipCopy):
                d = copies.get(e.key)
                if d is None:
                    d = copies[e.key] = {}
                if e.clip not in d:  # the first copy wins
                    d[e.clip] = e
            elif isinstance(e, ClipRecord):
                old = recs.get(e.clip)
                new = {**old, **e.record} if old else dict(e.record)
                if e.record.get("status", "ok") == "ok":
                    new.pop("reason", None)
                recs[e.clip] = new
                src[e.clip] = e
            elif e.key == "*":
                for d in copies.values():
                    d.pop(e.clip, None)
                recs.pop(e.clip, None)
                src.pop(e.clip, None)
            elif e.key in copies:
                copies[e.key].pop(e.clip, None)

    def clips(self) -> set[str]:
        """Every clip known: in any set, or with a record."""
        out = set(self.records)
        for d in self.copies.values():
            out.update(d)
        return out


# ---------------------------------------------------------------------- the log
class CommitLog:
    """The marks under ``_commits/`` of one store, and the :class:`LiveState` their replay gives.

    ``marks`` holds every readable mark (superseded ones too, until a compaction deletes them);
    ``damaged`` the marks that cannot be used, segment -> one line saying why (their clips are hidden
    until ``repair()``). ``on_damaged(segment, why)`` is called each time a refresh finds one.
    """

    def __init__(self, backend: Backend, on_damaged: Callable[[str, str], None] | None = None) -> None:
        self._b = backend
        self._on_damaged = on_damaged
        self.marks: dict[str, dict] = {}
        self.damaged: dict[str, str] = {}
        self.live = LiveState()

    # -------------------------------------------------------------- files
    def read(self, seg: str, base: str = COMMITS) -> tuple[dict | None, str | None]:
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
        why = mark_problem(mark, seg)
        return (None, why) if why else (mark, None)

    def write(self, seg: str, mark: dict) -> None:
        """Commit ``seg``: its copy first (a mark never exists without one), then the mark itself."""
        data = dumps(mark)
        self._b.write_atomic(f"{COPIES}/{seg}.json", data)
        self._b.write_atomic(f"{COMMITS}/{seg}.json", data)

    def remove_copy(self, seg: str) -> None:
        """Remove the copy of an uncommitted mark (written just before a mark that never came)."""
        self._b.remove_file(f"{COPIES}/{seg}.json")

    def superseded(self) -> set[str]:
        """Segments some compaction merged (listed in a mark's ``supersedes``)."""
        out: set[str] = set()
        for m in self.marks.values():
            out.update(m.get("supersedes") or ())
        return out

    # -------------------------------------------------------------- replay
    def refresh(self) -> bool:
        """Read the marks that came or went since the last refresh and replay them. Returns True when the
        live state was rebuilt from scratch (segments may have gone), False when it was extended or kept."""
        names = [n for n in self._b.listdir(COMMITS) if n.endswith(".json") and not n.startswith(".")]
        segs = [n[: -len(".json")] for n in names]
        present = set(segs)
        gone = [s for s in self.marks if s not in present]
        new = []
        for s in segs:
            if s in self.marks:
                continue  # (a damaged mark is read again each time: another process may have repaired it)
            mark, why = self.read(s)
            if why is None and mark is None:
                continue  # deleted by a compaction meanwhile
            if why is not None:
                self.damaged[s] = f"commit mark {COMMITS}/{s}.json {why}"
                if self._on_damaged is not None:
                    self._on_damaged(s, why)
                continue
            self.damaged.pop(s, None)
            self.marks[s] = mark
            new.append(s)
        for s in gone:
            del self.marks[s]
        for s in [s for s in self.damaged if s not in present]:
            del self.damaged[s]
        if not new and not gone:
            return False
        active = self.live.active
        incremental = (
            not gone
            and (not active or min(new) > active[-1])
            and not any(self.marks[s].get("supersedes") or self.marks[s].get("kind") == "compact" for s in new)
            and all(s in self.marks for s in active)
        )
        if incremental:
            new.sort()
            self.live.apply(sorted((e for s in new for e in mark_events(s, self.marks[s])), key=_replay_order))
            active.extend(new)
            return False
        self.rebuild()
        return True

    def rebuild(self) -> None:
        """Replay every live mark from scratch."""
        sup = self.superseded()
        live = LiveState(active=sorted(s for s in self.marks if s not in sup))
        events = [e for s in live.active for e in mark_events(s, self.marks[s])]
        events.sort(key=_replay_order)
        live.apply(events)
        self.live = live
