"""Keeping a store healthy: verify, repair, compact, and the garbage a crash or a compaction leaves.

Every operation here writes through the same crash-safe order as a writer (data, then the mark's copy,
then the mark) and deletes only what no live mark needs: merged segments after their compaction's mark
exists (marks first, then data), orphan data and stray mark copies after a grace period.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import numpy as np

from ._backend import Backend
from .errors import StorageError, storage_error
from .marks import (COMMITS, COPIES, DAMAGED, SEGMENT_RE, ClipCopy, ClipRecord, CommitLog, Tombstone, mark_events,
                    mark_header, mark_problem, new_segment_id, segment_age_s)
from .segments import SETS, Segments
from .spec import FeatureSpec

log = logging.getLogger("emollama.store.store")  # the store's one logger (its lines read as they always did)

__all__ = ["Maintenance", "VerifyReport", "GRACE_S", "warn_damaged", "forget_warning"]

GRACE_S = 3600.0  # orphan data / old tombstones younger than this are left alone by compact()

_WARNED: set[tuple[str, str]] = set()  # (store, segment): each damaged mark is reported once per process


def warn_damaged(url: str, seg: str, why: str) -> None:
    """Say once per process that a damaged mark hides its clips, and how to bring them back."""
    if (url, seg) in _WARNED:
        return
    _WARNED.add((url, seg))
    log.warning("%s: commit mark %s/%s.json %s; the clips it committed are hidden from every reader until "
                "`emollama store repair %s` rebuilds it", url, COMMITS, seg, why, url)


def forget_warning(url: str, seg: str) -> None:
    """A repaired mark that is damaged again is reported again."""
    _WARNED.discard((url, seg))


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


class Maintenance:
    """verify, repair and compact one store, over its commit log and segment arrays.

    ``specs`` is the store's set catalog (the very dict the facade keeps current) and ``refresh`` the
    facade's refresh (sets and marks). ``hook(step)``, when set, is called at each step of a compaction
    (tests raise there to simulate a crash).
    """

    def __init__(self, url: str, backend: Backend, commits: CommitLog, segments: Segments,
                 specs: Mapping[str, FeatureSpec], refresh: Callable[[], None]) -> None:
        self.url = url
        self._b = backend
        self._commits = commits
        self._segments = segments
        self._specs = specs
        self._refresh = refresh
        self.hook: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ verify
    def verify(self, *, deep: bool = True) -> VerifyReport:
        """Check the store: marks parse, arrays exist with consistent shapes/offsets/dtypes, (deep) every
        chunk decodes and values are finite, and every complete clip is present in every set."""
        self._refresh()
        live = self._commits.live
        problems: list[str] = list(self._commits.damaged.values())
        nseg = 0
        for seg in live.active:
            mark = self._commits.marks[seg]
            for key, info in (mark.get("sets") or {}).items():
                nseg += 1
                problems.extend(self.verify_segment(key, seg, info, deep))
        # completeness: every clip the store knows (and that did not fail) is in every set
        universe = live.clips()
        missing: dict[str, list[str]] = {}
        for c in sorted(universe):
            if live.records.get(c, {}).get("status") == "failed":
                continue
            for key in self._specs:
                if c not in live.copies.get(key, ()):
                    missing.setdefault(key, []).append(c)
        for key, cl in sorted(missing.items()):
            more = f" ... (+{len(cl) - 10})" if len(cl) > 10 else ""
            problems.append(f"set {key}: {len(cl)} clip(s) missing: {', '.join(cl[:10])}{more}")
        return VerifyReport(ok=not problems, problems=problems, checked_segments=nseg,
                            checked_clips=len(universe), orphans=self.orphans(0.0))

    def verify_segment(self, key: str, seg: str, info: Mapping, deep: bool) -> list[str]:
        """What is wrong with one set's array of one segment (as its mark entry ``info`` describes it)."""
        where = f"set {key} segment {seg}"
        spec = self._specs.get(key)
        if spec is None:
            return [f"{where}: the commit mark refers to a set that does not exist"]
        try:
            arr = self._segments.open_array(key, seg)
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
        have = len([p for p, _ in self._b.walk(f"{Segments.path(key, seg)}/c")])
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

    def orphans(self, grace_s: float) -> list[str]:
        """Segment data with no commit mark (e.g. a writer killed mid-write), older than ``grace_s``."""
        marked = set(self._commits.marks) | set(self._commits.damaged)
        out = []
        for key in self._segments.set_folders():
            for seg in self._b.listdir(f"{SETS}/{key}"):
                if not SEGMENT_RE.match(seg) or seg in marked:
                    continue
                if segment_age_s(seg) >= grace_s:
                    out.append(Segments.path(key, seg))
        return out

    # ------------------------------------------------------------------ repair
    def repair(self, *, deep: bool = True) -> dict:
        """See :meth:`FeatureStore.repair`."""
        self._refresh()
        out: dict[str, Any] = {"marks": {}, "recovered_clips": 0, "recompute": [], "unrecovered": []}
        recompute: set[str] = set()
        for seg in sorted(self._commits.damaged):
            why = self._commits.damaged[seg]
            mark, how = self._recover_mark(seg, why, deep, recompute)
            try:
                raw = self._b.read_bytes(f"{COMMITS}/{seg}.json")
            except OSError:
                raw = None
            try:
                if raw is not None:
                    self._b.write_atomic(f"{DAMAGED}/{seg}.json", raw)
                self._commits.write(seg, mark)
            except OSError as e:
                raise storage_error(self.url, e, f"repairing commit mark {seg}") from None
            forget_warning(self.url, seg)
            out["marks"][seg] = how
            out["recovered_clips"] += len({c for info in mark.get("sets", {}).values() for c in info["clips"]})
            out["unrecovered"] += mark.get("unrecovered") or []
        self._refresh()
        # every clip now missing from some set (and not already failed) is marked for recompute
        live = self._commits.live
        missing: dict[str, list[str]] = {}
        for c in sorted(live.clips() | recompute):
            if live.records.get(c, {}).get("status") == "failed":
                continue
            lacks = [k for k in sorted(self._specs) if c not in live.copies.get(k, ())]
            if lacks:
                missing[c] = lacks
        if missing:
            seg = new_segment_id()
            mark = mark_header(seg, "repair", f"repair-{os.getpid()}")
            mark["records"] = {c: {"status": "failed", "reason": f"store repair: features lost from "
                                   f"{', '.join(keys)}; a rerun of extraction recomputes it"}
                               for c, keys in missing.items()}
            try:
                self._commits.write(seg, mark)
            except OSError as e:
                raise storage_error(self.url, e, "recording the clips to recompute") from None
            self._refresh()
        out["recompute"] = sorted(missing)
        report = self.verify(deep=deep)
        out["ok"], out["problems"] = report.ok, report.problems
        return out

    def _recover_mark(self, seg: str, why: str, deep: bool, recompute: set[str]) -> tuple[dict, str]:
        mark, _ = self._commits.read(seg, COPIES)
        if mark is not None:
            how = "restored from its copy"
        else:
            sets_entry: dict[str, dict] = {}
            unrec: list[str] = []
            for key in self._segments.set_folders():
                rel = Segments.path(key, seg)
                if not self._b.listdir(rel):
                    continue
                try:
                    attrs = json.loads(self._b.read_bytes(f"{rel}/zarr.json"))["attributes"]
                    entry = {"clips": attrs["clips"]}
                    if attrs.get("offsets") is not None:
                        entry["offsets"] = attrs["offsets"]
                    if attrs.get("segment", seg) != seg or mark_problem({"sets": {key: entry}}, seg):
                        raise ValueError("attributes of the wrong shape")
                except (OSError, ValueError, KeyError, TypeError):
                    unrec.append(rel)
                    continue
                sets_entry[key] = entry
            mark = mark_header(seg, "repaired", f"repair-{os.getpid()}")
            mark.update({"sets": sets_entry, "records": {}})
            if unrec:
                mark["unrecovered"] = unrec
            n = len({c for e in sets_entry.values() for c in e["clips"]})
            how = (f"rebuilt from its segment data ({n} clip(s) in {len(sets_entry)} set(s))" if sets_entry
                   else "no copy and no readable segment data: nothing to recover (its clips are recomputed by a rerun)")
        # keep only set data that verifies; the rest stays on disk, listed, and its clips are recomputed
        for key, info in list((mark.get("sets") or {}).items()):
            if self.verify_segment(key, seg, info, deep):
                del mark["sets"][key]
                mark.setdefault("unrecovered", []).append(Segments.path(key, seg))
                recompute.update(info["clips"])
        mark["repaired"] = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "was": why,
                            "how": how}
        return mark, how

    # ------------------------------------------------------------------ compaction
    def compact(self, min_segments: int = 2, *, full: bool = False, grace_s: float = GRACE_S,
                keep_s: float = 0.0) -> dict:
        """See :meth:`FeatureStore.compact`."""
        self._refresh()
        before = dict(self._b.walk(""))
        marks = self._commits.marks
        result: dict[str, Any] = {"segments_before": len(self._commits.live.active), "compacted": 0,
                                  "segments_written": 0, "files_before": len(before),
                                  "bytes_before": sum(before.values())}
        # finish an interrupted (or deferred) compaction
        result["merged_deleted"] = self._delete_superseded(keep_s)
        cands = [s for s in self._commits.live.active if (full or marks[s].get("kind") != "compact")
                 and not marks[s].get("unrecovered")]  # repair() left data there nothing else has
        if len(cands) >= max(min_segments, 1):
            try:
                self._compact(cands, grace_s)
            except OSError as e:
                if isinstance(e, StorageError):
                    raise
                cand = set(cands)
                need = sum(n for p, n in before.items() if p.startswith(f"{SETS}/") and len(p.split("/")) > 3
                           and p.split("/")[2] in cand)
                raise storage_error(self.url, e, "compacting", need_bytes=need) from None
            result["compacted"] = len(cands)
            result["segments_written"] = 1
            result["merged_deleted"] += self._delete_superseded(keep_s)
        result["orphans_deleted"] = self._gc(grace_s)
        self._refresh()
        after = dict(self._b.walk(""))
        result.update(segments_after=len(self._commits.live.active), files_after=len(after),
                      bytes_after=sum(after.values()), files_removed=len(before.keys() - after.keys()),
                      files_written=len(after.keys() - before.keys()))
        result["bytes_freed"] = result["bytes_before"] - result["bytes_after"]
        return result

    def _step(self, step: str) -> None:
        if self.hook is not None:
            self.hook(step)

    def _compact(self, cands: list[str], grace_s: float) -> str:
        seg = new_segment_id()
        try:
            return self._compact_into(seg, cands, grace_s)
        except BaseException:
            # the new mark is written last and atomically: without it nothing of seg is committed, so
            # what was written goes now (a full disk must not keep orphans until the grace period ends)
            if not self._b.exists(f"{COMMITS}/{seg}.json"):
                try:
                    self._segments.discard(seg)
                    self._commits.remove_copy(seg)
                except OSError as e2:  # noqa: PERF203 - best effort; the next compact's gc finishes it
                    log.warning("could not remove the partial compaction output %s: %s", seg, e2)
            raise

    def _compact_into(self, seg: str, cands: list[str], grace_s: float) -> str:
        cand = set(cands)
        marks, live = self._commits.marks, self._commits.live
        # what the non-candidate (kept) marks hold, so tombstones hiding their rows are carried on
        kept_copies: set[tuple[str, str]] = set()
        kept_clips: set[str] = set()
        cand_tombs: list[Tombstone] = []
        for s in live.active:
            for e in mark_events(s, marks[s]):
                if s in cand:
                    if isinstance(e, Tombstone):
                        cand_tombs.append(e)
                elif isinstance(e, ClipCopy):
                    kept_copies.add((e.key, e.clip))
                    kept_clips.add(e.clip)
                elif isinstance(e, ClipRecord):
                    kept_clips.add(e.clip)
        removed_at: dict[str, dict[str, str]] = {}
        for t in cand_tombs:
            hides = (t.key, t.clip) in kept_copies or (t.key == "*" and t.clip in kept_clips)
            if hides or segment_age_s(t.order) < grace_s:
                d = removed_at.setdefault(t.key, {})
                d[t.clip] = max(d.get(t.clip, t.order), t.order)
        sets_entry: dict[str, dict] = {}
        for key, copies in live.copies.items():
            spec = self._specs.get(key)
            if spec is None:
                continue
            items = sorted((cp for cp in copies.values() if cp.segment in cand), key=lambda cp: (cp.segment, cp.start))
            if not items:
                continue
            clips = [cp.clip for cp in items]
            origin = [cp.order for cp in items]
            lengths = [cp.n_rows for cp in items] if spec.variable else None
            sets_entry[key] = self._segments.write_rows(spec, key, seg, clips,
                                                        self._segments.iter_rows(spec, key, items), lengths, origin)
        self._step("data-written")
        records = {c: r for c, r in live.records.items()
                   if (src := live.record_src.get(c)) is not None and src.segment in cand}
        sup = set(cands)
        for s in cands:
            sup.update(x for x in (marks[s].get("supersedes") or ()) if x in marks)
        mark = mark_header(seg, "compact", f"compact-{os.getpid()}")
        mark.update({"sets": sets_entry, "records": records,
                     "record_origin": {c: live.record_src[c].order for c in records},
                     "removed_at": removed_at, "supersedes": sorted(sup)})
        self._commits.write(seg, mark)
        self._step("mark-written")
        self._refresh()
        return seg

    def _delete_superseded(self, keep_s: float = 0.0) -> int:
        """Delete marks listed in some ``supersedes`` whose merge is at least ``keep_s`` seconds old
        (marks first, then their data). Returns how many segments were deleted."""
        marks = self._commits.marks
        merged_by: dict[str, str] = {}
        for seg, m in marks.items():
            for s in m.get("supersedes") or ():
                merged_by[s] = min(merged_by.get(s, seg), seg)
        doomed = [s for s in marks if s in merged_by and segment_age_s(merged_by[s]) >= keep_s]
        if not doomed:
            return 0
        for s in doomed:
            self._b.remove_file(f"{COMMITS}/{s}.json")
        for s in doomed:
            self._b.remove_file(f"{COPIES}/{s}.json")
        self._step("marks-deleted")
        for key in self._segments.set_folders():
            present = set(self._b.listdir(f"{SETS}/{key}"))
            for s in doomed:
                if s in present:
                    self._b.remove_tree(Segments.path(key, s))
        self._refresh()
        return len(doomed)

    def _gc(self, grace_s: float) -> int:
        self._refresh()
        orphans = self.orphans(grace_s)
        for p in orphans:
            self._b.remove_tree(p)
        # mark copies whose mark never came (a writer died between the two) or went with a compaction
        marked = set(self._commits.marks) | set(self._commits.damaged)
        for name in self._b.listdir(COPIES):
            s = name[: -len(".json")] if name.endswith(".json") else ""
            if SEGMENT_RE.match(s) and s not in marked and segment_age_s(s) >= grace_s:
                self._b.remove_file(f"{COPIES}/{name}")
        return len(orphans)
