"""Any folder of video files, searched recursively, with an optional labels CSV."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter import Adapter, Sound
from .base import (VIDEO_EXTENSIONS, Clip, Corpus, DatasetError, check_dir, id_to_path, log_rejected,
                   normalize_label, path_to_id, read_csv, unusable_entry)


@dataclass(frozen=True)
class FolderOptions:
    labels_csv: str | None = None                # `name,label,sentence[,split]`, relative to the folder or absolute
    labels: tuple[str, ...] | None = None        # the label set (default: the labels the CSV uses)


def read_folder(root: Path, o: FolderOptions) -> Corpus:
    """Any folder of videos, searched recursively. A clip's id is its path relative to the folder
    without the extension, with "/" written "%2F" (see `path_to_id`): `a/x.mp4` and `b/x.mp4` are
    `a%2Fx` and `b%2Fx`. An optional CSV `name,label,sentence` (and optionally `split`) gives labels and
    subtitles; `name` is that relative path without extension (`sub/clip`, or the id itself). Entries
    named like videos that are not readable files (FIFOs, directories, broken links) are rejected with
    their reason, never silently dropped."""
    check_dir(root, "video folder", "Pass the folder that holds the clips.")
    found: dict[str, Path] = {}
    rejected: list[tuple[str, str]] = []
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in VIDEO_EXTENSIONS:
            continue
        rel = p.relative_to(root).with_suffix("").as_posix()
        cid = path_to_id(rel)
        why = unusable_entry(p)
        if why is not None:
            rejected.append((cid, f"{p.relative_to(root).as_posix()}: {why}"))
            continue
        if cid in found:
            rejected.append((cid, f"duplicate id: {found[cid].relative_to(root).as_posix()} and "
                                  f"{p.relative_to(root).as_posix()}"))
            continue
        found[cid] = p
    table: dict[str, dict[str, str]] = {}
    if o.labels_csv is not None:
        csv_path = Path(o.labels_csv) if Path(o.labels_csv).is_absolute() else root / o.labels_csv
        if not csv_path.exists():
            raise DatasetError(f"labels CSV not found: {csv_path}")
        rows = [r for r in read_csv(csv_path) if r.get("name")]
        for r in rows:   # a name is the relative path ("sub/clip") ...
            table[path_to_id(r["name"])] = r
        for r in rows:   # ... or the id itself ("sub%2Fclip")
            table.setdefault(r["name"], r)
    seen_labels = sorted({normalize_label(r.get("label")) for r in table.values() if r.get("label")} - {None})
    label_set = tuple(o.labels) if o.labels is not None else tuple(seen_labels)
    clips = []
    for cid, src in found.items():
        row = table.get(cid, {})
        label = normalize_label(row.get("label")) if row.get("label") else None
        if label is not None and label_set and label not in label_set:
            rejected.append((cid, f"label {label!r} is not in the label set {list(label_set)}"))
            continue
        clips.append(Clip(cid, src, row.get("sentence") or None, label, None, row.get("split") or "train",
                          {}, {"path": id_to_path(cid)} if cid != id_to_path(cid) else {}, has_sound=True))
    log_rejected(rejected)
    return Corpus("folder", root, label_set, clips, rejected)


FOLDER = Adapter(
    name="folder", read=read_folder, options=FolderOptions, labels=(), splits=("train",), sound=Sound.ALWAYS,
    summary="any folder of video files (recursive); ids are relative paths with / written %2F; an optional "
            "labels CSV name,label,sentence[,split]")


def load_folder(root: Path | str, **options: Any) -> Corpus:
    """A folder of videos at `root`; `options` are `FolderOptions` fields (labels_csv, labels)."""
    return FOLDER.load(root, **options)
