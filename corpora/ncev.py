"""The NCEV clip list that MERR and MER2023 ship (`name frame_count emotion valence` per line), the
rule for a clip listed more than once, and the clip builder the two adapters share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from .base import (Clip, Corpus, DatasetError, find_source, log_rejected, normalize_label, read_text, safe_id,
                   source_has_sound)


@dataclass(frozen=True)
class NcevEntry:
    name: str
    frames: int | None
    emotion: str | None
    valence: float | None
    source: str = field(default="", compare=False)   # the list's file name
    line: int = field(default=0, compare=False)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def read_ncev(path: Path) -> list[NcevEntry]:
    """An NCEV clip list: `name frame_count emotion valence` per line (test lists use -10 as valence;
    the trailing fields may be left out). A line that is not of that form is a `DatasetError` naming
    the file and the line (and how many more there are)."""
    entries, bad = [], []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            if len(parts) > 4:
                raise ValueError
            frames = int(parts[1]) if len(parts) > 1 else None
            valence = float(parts[3]) if len(parts) > 3 else None
        except ValueError:
            bad.append((lineno, line))
            continue
        if valence is not None and valence <= -10:
            valence = None   # placeholder of test lists
        entries.append(NcevEntry(parts[0], frames, parts[2] if len(parts) > 2 else None, valence, path.name, lineno))
    if bad:
        lineno, line = bad[0]
        more = f" (and {len(bad) - 1} more such lines)" if len(bad) > 1 else ""
        raise DatasetError(f"{path}:{lineno}: not 'name frame_count emotion valence': {line.strip()[:120]!r}{more}")
    return entries


def _disagreement(entries: list[NcevEntry]) -> str | None:
    """How entries of one clip disagree (their labels, or two given valences), or None."""
    labels = {normalize_label(e.emotion) for e in entries}
    if len(labels) > 1:
        return "conflicting labels: " + ", ".join(f"{e.emotion} ({e.where})" for e in entries)
    valences = {e.valence for e in entries if e.valence is not None}
    if len(valences) > 1:
        return "conflicting valences: " + ", ".join(f"{e.valence} ({e.where})" for e in entries
                                                     if e.valence is not None)
    return None


def dedupe(entries: Iterable[NcevEntry]) -> tuple[list[NcevEntry], list[tuple[str, str]], list[tuple[str, str]]]:
    """Each clip once: (entries, rejected, notes). Entries of one clip that agree (label and valence)
    are kept once, with a note when one list names the clip twice (a clip in both MERR lists is the
    rule, not a note); entries that disagree reject the clip, with every place it is listed."""
    by_name: dict[str, list[NcevEntry]] = {}
    for e in entries:
        by_name.setdefault(e.name, []).append(e)
    kept, rejected, notes = [], [], []
    for name, group in by_name.items():
        if why := _disagreement(group):
            rejected.append((name, why))
            continue
        kept.append(next((e for e in group if e.valence is not None), group[0]))
        sources = [e.source for e in group]
        if len(set(sources)) < len(sources):
            notes.append((name, "listed more than once with the same label (" + ", ".join(e.where for e in group)
                          + "); kept once"))
    return kept, rejected, notes


def build_corpus(name: str, root: Path, entries: Iterable[NcevEntry], videos: Path, subs: Mapping[str, str],
                 captions: Mapping[str, Mapping[str, str]], splits: Mapping[str, str], labels: tuple[str, ...],
                 rejected: list[tuple[str, str]], notes: list[tuple[str, str]], split_file: str | None = None) -> Corpus:
    """Clips of NCEV entries whose id is safe, whose label is in `labels`, whose video (or frame
    folder: then without sound) is in `videos` and, with a `split_file`, which it names (`splits`);
    the others are rejected with their reason. Without a `split_file` a clip not in `splits` is `train`."""
    clips: list[Clip] = []
    for e in entries:
        if why := safe_id(e.name):
            rejected.append((e.name, why))
            continue
        label = normalize_label(e.emotion)
        if label is not None and label not in labels:
            rejected.append((e.name, f"label {e.emotion!r} is not in the label set {list(labels)}"))
            continue
        src = find_source(videos, e.name)
        if src is None:
            rejected.append((e.name, f"no video or frame folder named {e.name} in {videos}"))
            continue
        if split_file is not None and e.name not in splits:
            rejected.append((e.name, f"not named in {split_file} (every clip needs its split there)"))
            continue
        clips.append(Clip(e.name, src, subs.get(e.name), label, e.valence, splits.get(e.name, "train"),
                          captions.get(e.name, {}), {"frames": e.frames} if e.frames else {},
                          has_sound=source_has_sound(src)))
    log_rejected(rejected, notes)
    return Corpus(name, root, labels, clips, rejected, notes)
