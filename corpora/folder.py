"""Any folder of video files, searched recursively, with an optional labels CSV.

Every file under the folder ends as a clip or as a rejected entry with its reason, so the summary's
counts add up to the files there. A file is a video by its extension (`VIDEO_EXTENSIONS`); a file of
a kind that is no video (`NOT_VIDEO`: images, audio, text) is listed as such; any other file is
opened with PyAV (its headers only) and taken when it holds a video stream. A hidden folder
(".git", ".cache"), a Zarr store inside the folder and a folder reached through a symbolic link are
listed once, not searched. The labels CSV itself is the dataset's own file, not an entry."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .adapter import Adapter, Sound
from .base import (NOT_VIDEO, VIDEO_EXTENSIONS, Clip, Corpus, DatasetError, check_dir, id_to_path, log_rejected,
                   normalize_label, path_to_id, read_rows, split_name, unknown_split, unusable_entry)

# FFmpeg demuxers that open a still image (or text) as a video of one frame
STILL_FORMATS = ("image2", "tty", "bin", "xbin", "adf", "idf", "webp", "gif_pipe")


@dataclass(frozen=True)
class FolderOptions:
    labels_csv: str | None = None                # `name,label,sentence[,split]`, relative to the folder or absolute
    labels: tuple[str, ...] | None = None        # the label set (default: the labels the CSV uses)


def not_a_video(p: Path) -> str | None:
    """Why PyAV does not open the file `p` as a video (None: it does). Reads the headers only."""
    import av

    try:
        with av.open(str(p)) as c:
            fmt = c.format.name
            moving = [s for s in c.streams.video if not s.disposition & av.stream.Disposition.attached_pic.value]
            if fmt in STILL_FORMATS or fmt.endswith("_pipe"):
                return f"an image ({fmt}), not a video"
            if not moving:
                return "no video stream" + (" (audio only)" if c.streams.audio else "") + f" in this {fmt} file"
    except (av.FFmpegError, OSError, ValueError) as e:
        return f"not a video PyAV can open ({getattr(e, 'strerror', None) or e})"
    return None


def walk(root: Path, skip: Path | None) -> Iterator[tuple[Path, str | None]]:
    """Each file under `root` (sorted, recursively) with why it cannot be a clip yet (None: maybe it
    can), and each entry that is not searched with its reason; `skip` (resolved) is left out."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        yield root, f"folder cannot be read: {e.strerror or e}"
        return
    for entry in entries:
        p = Path(entry.path)
        if skip is not None and entry.name == skip.name and p.resolve() == skip:
            continue
        if entry.is_dir(follow_symlinks=False):
            if (p / "zarr.json").exists() or (p / ".zgroup").exists():
                yield p, "a Zarr store (not searched)"
            elif entry.name.startswith(".") and p.suffix.lower() not in VIDEO_EXTENSIONS:
                yield p, "a hidden folder (not searched)"
            elif p.suffix.lower() in VIDEO_EXTENSIONS:
                yield p, unusable_entry(p)
            else:
                yield from walk(p, skip)
        elif entry.is_symlink() and p.is_dir():
            yield p, "a symbolic link to a folder (not followed: link the videos themselves)"
        else:
            yield p, unusable_entry(p)


def find_videos(root: Path, skip: Path | None = None) -> tuple[dict[str, Path], list[tuple[str, str]]]:
    """{clip id: video file} under `root`, and every other entry with its reason ("<id>", "<relative
    path>: <why>", as a clip's would be)."""
    found: dict[str, Path] = {}
    rejected: list[tuple[str, str]] = []
    for p, why in walk(root, skip):
        rel = p.relative_to(root).as_posix() if p != root else "."
        cid = path_to_id(p.relative_to(root).with_suffix("").as_posix()) if p != root else "."
        suffix = p.suffix.lower()
        if why is None and suffix not in VIDEO_EXTENSIONS:
            why = f"{NOT_VIDEO[suffix]}, not a video" if suffix in NOT_VIDEO else not_a_video(p)
        if why is not None:
            rejected.append((cid, f"{rel}: {why}"))
            continue
        if cid in found:
            rejected.append((cid, f"duplicate id: {found[cid].relative_to(root).as_posix()} and {rel}"))
            continue
        found[cid] = p
    return found, rejected


def read_labels(csv_path: Path) -> tuple[dict[str, list[tuple[int, dict[str, str]]]], bool]:
    """The labels CSV's rows by the clip id they name (a name is the relative path "sub/clip", or the
    id itself "sub%2Fclip"; a path wins), and whether it has a `split` column."""
    header, rows = read_rows(csv_path, ("name",))
    by_path: dict[str, list[tuple[int, dict[str, str]]]] = {}
    by_id: dict[str, list[tuple[int, dict[str, str]]]] = {}
    for line, r in rows:
        if r["name"]:
            by_path.setdefault(path_to_id(r["name"]), []).append((line, r))
            by_id.setdefault(r["name"], []).append((line, r))
    return {**by_id, **by_path}, "split" in header


def read_folder(root: Path, o: FolderOptions) -> Corpus:
    """Any folder of videos, searched recursively (see the module's docstring for what is a video).
    A clip's id is its path relative to the folder without the extension, with "/" written "%2F" (see
    `path_to_id`): `a/x.mp4` and `b/x.mp4` are `a%2Fx` and `b%2Fx`. An optional CSV
    `name,label,sentence` (and optionally `split`) gives labels and subtitles; `name` is that relative
    path without extension (`sub/clip`, or the id itself). With a `split` column the splits are exact:
    a clip the CSV gives no split is rejected; without one every clip is `train`. A CSV row that names
    no video, or two rows of one clip that disagree, are rejected with their lines."""
    check_dir(root, "video folder", "Pass the folder that holds the clips.")
    csv_path = None
    if o.labels_csv is not None:
        csv_path = Path(o.labels_csv) if Path(o.labels_csv).is_absolute() else root / o.labels_csv
        if not csv_path.exists():
            raise DatasetError(f"labels CSV not found: {csv_path}")
    found, rejected = find_videos(root, csv_path.resolve() if csv_path else None)
    table, has_split = read_labels(csv_path) if csv_path else ({}, False)
    notes: list[tuple[str, str]] = []
    used: set[int] = set()
    rows: dict[str, tuple[int, dict[str, str]]] = {}   # clip id -> (line, row); line 0: no row
    for cid in found:
        got = table.get(cid, [])
        lines = ", ".join(str(line) for line, _ in got)
        used.update(line for line, _ in got)
        if len({tuple(sorted((k, v) for k, v in r.items() if k != "name")) for _, r in got}) > 1:
            rejected.append((cid, f"{csv_path.name} gives it rows that differ: lines {lines}"))
        elif got:
            rows[cid] = got[0]
            if len(got) > 1:
                notes.append((cid, f"{csv_path.name} lists it {len(got)} times, the same each time (lines {lines}); "
                                   "kept once"))
        elif not has_split:
            rows[cid] = (0, {})
        else:
            rejected.append((cid, f"not named in {csv_path.name}, whose split column names the split of every clip"))
    if csv_path is not None:
        for line, r in sorted({line: r for got in table.values() for line, r in got}.items()):
            if line not in used:
                rejected.append((r["name"], f"{csv_path.name}:{line}: no video file {r['name']}.* in the folder"))
    seen_labels = sorted({normalize_label(r.get("label")) for _, r in rows.values() if r.get("label")} - {None})
    label_set = tuple(o.labels) if o.labels is not None else tuple(seen_labels)
    clips = []
    for cid, (line, row) in rows.items():
        label = normalize_label(row.get("label")) if row.get("label") else None
        if label is not None and label_set and label not in label_set:
            rejected.append((cid, f"label {label!r} is not in the label set {list(label_set)}"))
            continue
        split = split_name(row["split"]) if row.get("split") else None if has_split else "train"
        if split is None:
            rejected.append((cid, unknown_split(row["split"], f"{csv_path.name}:{line}") if row.get("split") else
                             f"{csv_path.name}:{line}: no split given (its split column names the split of every clip)"))
            continue
        clips.append(Clip(cid, found[cid], row.get("sentence") or None, label, None, split,
                          {}, {"path": id_to_path(cid)} if cid != id_to_path(cid) else {}, has_sound=True))
    log_rejected(rejected, notes)
    return Corpus("folder", root, label_set, clips, rejected, notes)


FOLDER = Adapter(
    name="folder", read=read_folder, options=FolderOptions, labels=(), splits=("train",), sound=Sound.ALWAYS,
    summary="any folder of video files (recursive; every other file listed with its reason); ids are relative "
            "paths with / written %2F; an optional labels CSV name,label,sentence[,split]")


def load_folder(root: Path | str, **options: Any) -> Corpus:
    """A folder of videos at `root`; `options` are `FolderOptions` fields (labels_csv, labels)."""
    return FOLDER.load(root, **options)
