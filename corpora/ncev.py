"""The NCEV clip list that MERR and MER2023 ship (`name frame_count emotion valence` per line), and
the clip builder the two adapters share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from .base import (Clip, Corpus, find_source, log_rejected, normalize_label, read_text, safe_id,
                   source_has_sound)


@dataclass(frozen=True)
class NcevEntry:
    name: str
    frames: int | None
    emotion: str | None
    valence: float | None


def read_ncev(path: Path) -> tuple[list[NcevEntry], list[tuple[str, str]]]:
    """An NCEV clip list: `name frame_count emotion valence` per line (test lists use -10 as valence)."""
    entries, bad = [], []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        try:
            frames = int(parts[1]) if len(parts) > 1 else None
            valence = float(parts[3]) if len(parts) > 3 else None
        except ValueError:
            bad.append((parts[0], f"{path.name}:{lineno}: not 'name frame_count emotion valence': {line!r}"))
            continue
        if valence is not None and valence <= -10:
            valence = None   # placeholder of test lists
        entries.append(NcevEntry(parts[0], frames, parts[2] if len(parts) > 2 else None, valence))
    return entries, bad


def build_corpus(name: str, root: Path, entries: Iterable[NcevEntry], videos: Path, subs: Mapping[str, str],
                 captions: Mapping[str, Mapping[str, str]], splits: Mapping[str, str], labels: tuple[str, ...],
                 rejected: list[tuple[str, str]]) -> Corpus:
    """Clips of NCEV entries whose id is safe, whose label is in `labels` and whose video (or frame
    folder: then without sound) is in `videos`; the others are rejected with their reason."""
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
        clips.append(Clip(e.name, src, subs.get(e.name), label, e.valence, splits.get(e.name, "train"),
                          captions.get(e.name, {}), {"frames": e.frames} if e.frames else {},
                          has_sound=source_has_sound(src)))
    log_rejected(rejected)
    return Corpus(name, root, labels, clips, rejected)
