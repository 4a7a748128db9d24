"""What every adapter shares: the `Clip` and `Corpus` records, `DatasetError`, clip-id rules, split
names and the small text readers (UTF-8 or not, CSV, JSON, transcripts, label spellings).

Adapters read text files (lists, CSV, JSON) and never decode a video, so both stages (extraction and
training) use them cheaply; only the folder adapter opens a file of unknown extension with PyAV, to
read its headers. A corpus lists the clips it accepted and the entries it rejected, each with its
reason (a missing video, an unknown label or split, an id that tries to leave the data folder, two
entries that disagree, ...), and the notes on what it kept (an identical entry listed twice).

A file the adapter cannot parse at all (a CSV without its columns, a row with more fields than its
header, JSON that does not parse) is a `DatasetError` naming the file and the row.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

# Files taken as videos by their extension (PyAV opens each of them). A folder dataset probes a file of
# any other extension with PyAV, except the kinds in NOT_VIDEO, which FFmpeg would open as a one-frame
# "video" (images, text as ANSI art) or which hold no video (audio with cover art).
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".qt", ".3gp", ".3g2", ".mkv", ".webm", ".avi", ".flv", ".f4v",
                    ".wmv", ".asf", ".mpg", ".mpeg", ".m1v", ".m2v", ".vob", ".ts", ".mts", ".m2ts", ".m2t",
                    ".ogv", ".mxf", ".dv", ".nut", ".y4m", ".gif", ".divx", ".rm", ".rmvb")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
NOT_VIDEO = {
    **dict.fromkeys(FRAME_EXTENSIONS + (".tif", ".tiff", ".webp", ".heic", ".heif", ".avif", ".svg", ".ico"),
                    "an image"),
    **dict.fromkeys((".wav", ".mp3", ".flac", ".m4a", ".aac", ".opus", ".wma", ".aif", ".aiff", ".amr", ".mka"),
                    "an audio file"),
    **dict.fromkeys((".txt", ".csv", ".tsv", ".json", ".jsonl", ".md", ".xml", ".yaml", ".yml", ".toml", ".srt",
                     ".vtt", ".ass", ".ssa", ".log", ".html", ".pdf", ".nfo"), "a text file"),
}

MAX_FIELD = 1 << 24   # the longest CSV field read (the csv module's default, 131,072 characters, is too low)

# The split names; the spellings on the left are read as the names on the right.
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "dev": "val", "testing": "test"}

# Spellings seen in corpora, mapped to the project's label names.
LABEL_ALIASES = {
    "anger": "angry", "happiness": "happy", "joy": "happy", "sadness": "sad", "surprised": "surprise",
    "worry": "worried", "fearful": "fear", "disgusted": "disgust", "neural": "neutral",
}


@dataclass(frozen=True)
class Clip:
    id: str
    source: Path                      # a video file or a folder of frames
    subtitle: str | None = None       # English transcript; None when the corpus has none
    label: str | None = None
    valence: float | None = None
    split: str = "train"
    texts: Mapping[str, str] = field(default_factory=dict)   # task -> reference answer ("reason", "reason_v2")
    meta: Mapping[str, Any] = field(default_factory=dict)
    # Whether the clip has sound for the audio view, as its adapter declares (`Adapter.sound`);
    # None for a clip made outside an adapter: then `clip_has_sound` decides from the source.
    has_sound: bool | None = None


@dataclass
class Corpus:
    name: str
    root: Path
    labels: tuple[str, ...]
    clips: list[Clip]
    rejected: list[tuple[str, str]] = field(default_factory=list)   # (id, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)      # (id, what was kept and why)

    def split(self, name: str) -> list[Clip]:
        """The clips of split `name` (any spelling `split_name` reads: "Test" is "test")."""
        name = split_name(name) or name
        return [c for c in self.clips if c.split == name]

    def splits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.clips:
            out[c.split] = out.get(c.split, 0) + 1
        return out


class DatasetError(ValueError):
    """The corpus on disk does not have the expected layout; the message says what to fix."""


def source_has_sound(source: Path | str) -> bool:
    """A video file has sound to read; a folder of frames (as DFEW ships its clips) has none."""
    return not Path(source).is_dir()


def clip_has_sound(clip: Clip) -> bool:
    """The clip's declared `has_sound`, else (a clip made outside an adapter) what its source says."""
    return clip.has_sound if clip.has_sound is not None else source_has_sound(clip.source)


# ---------------------------------------------------------------------------------------------
# Small readers shared by the adapters


def read_text(path: Path) -> str:
    """Read a text file as UTF-8 (BOM allowed); fall back to cp1252/latin-1 with a warning."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        for enc in ("cp1252", "latin-1"):
            try:
                text = raw.decode(enc)
            except UnicodeDecodeError:
                continue
            log.warning("%s is not UTF-8; read it as %s (save it as UTF-8 to silence this)", path, enc)
            return text
    raise DatasetError(f"{path}: cannot decode as UTF-8")  # pragma: no cover (latin-1 never fails)


def read_rows(path: Path, columns: tuple[str, ...] = ()) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV file's lower-cased header and its rows as (line number, {column: stripped value}).

    A header without every one of `columns`, a row with more fields than the header, or text the csv
    module cannot parse is a `DatasetError` naming the file and the line."""
    csv.field_size_limit(max(csv.field_size_limit(), MAX_FIELD))
    reader = csv.reader(io.StringIO(read_text(path)))
    rows: list[tuple[int, dict[str, str]]] = []
    header: list[str] | None = None
    try:
        for fields in reader:
            if header is None:
                if not fields:
                    continue
                header = [h.strip().lower() for h in fields]
                missing = [c for c in columns if c not in header]
                if missing:
                    raise DatasetError(f"{path}:{reader.line_num}: the header is {','.join(header) or '(empty)'}; "
                                       f"expected the columns {','.join(columns)} (missing {', '.join(missing)})")
                continue
            if not any(f.strip() for f in fields):
                continue
            if len(fields) > len(header):
                raise DatasetError(f"{path}:{reader.line_num}: {len(fields)} fields, but the header has "
                                   f"{len(header)} ({','.join(header)}); quote values that hold a comma")
            rows.append((reader.line_num, {k: (fields[i].strip() if i < len(fields) else "")
                                           for i, k in enumerate(header)}))
    except csv.Error as e:
        raise DatasetError(f"{path}:{reader.line_num}: not readable as CSV ({e})") from None
    if header is None and columns:
        raise DatasetError(f"{path}: empty; expected a header with the columns {','.join(columns)}")
    return header or [], rows


def read_csv(path: Path, columns: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """A CSV file's rows as {lower-cased column: stripped value} (see `read_rows`)."""
    return [r for _, r in read_rows(path, columns)[1]]


def read_json(path: Path) -> Any:
    """A JSON file; one that does not parse is a `DatasetError` naming the line and column."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def csv_header(path: Path) -> list[str]:
    """The lower-cased column names of a CSV file ([] when it cannot be read or is empty)."""
    try:
        first = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return []
    return [h.strip().lower() for h in next(csv.reader(io.StringIO(first)))]


def read_transcripts(path: Path | None) -> dict[str, str]:
    """`name,sentence` CSV -> {name: sentence}; empty sentences are dropped (no subtitle)."""
    if path is None or not path.exists():
        return {}
    return {r["name"]: r["sentence"] for r in read_csv(path, ("name", "sentence")) if r.get("sentence")}


def normalize_label(label: str | None) -> str | None:
    if label is None:
        return None
    key = label.strip().lower()
    return LABEL_ALIASES.get(key, key) or None


def split_name(value: str) -> str | None:
    """The split a value names (case and surrounding space ignored, `SPLIT_ALIASES` read: " Test " and
    "testing" are "test", "validation" is "val"), or None when it names none of `SPLITS`."""
    key = " ".join(value.split()).lower()
    key = SPLIT_ALIASES.get(key, key)
    return key if key in SPLITS else None


def unknown_split(value: str, where: str) -> str:
    """The rejection reason of an entry whose split value names no split."""
    return f"{where}: split {value!r} is not one of {', '.join(SPLITS)}"


# ---------------------------------------------------------------------------------------------
# Clip ids and sources


def safe_id(name: str) -> str | None:
    """Why `name` cannot be a clip id (it must name a file inside the data folder), or None if it can."""
    if not name:
        return "empty clip id"
    p = Path(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or ":" in p.parts[0]:
        return f"clip id {name!r} is an absolute path; ids must be relative names"
    if any(part == ".." for part in Path(name.replace("\\", "/")).parts):
        return f"clip id {name!r} leaves the data folder"
    return None


def path_to_id(rel: str) -> str:
    """The clip id of a file in a subfolder: its relative path without extension, with "/" written
    "%2F" (and "%" itself "%25", so the mapping is reversible): `sub/clip.mp4` -> `sub%2Fclip`. A store
    id holds no "/"; a file directly in the data folder keeps its name as its id (unless it holds "%")."""
    return rel.replace("%", "%25").replace("/", "%2F")


def id_to_path(clip_id: str) -> str:
    """The relative path (without extension) a folder-dataset id came from: the inverse of path_to_id."""
    return clip_id.replace("%2F", "/").replace("%25", "%")


def clip_id_for(path: str | Path) -> str:
    """The id of a clip given by its path alone (inference on any file): ``<file stem>-<8 hex of the
    resolved path>``; two files with the same name never collide."""
    p = Path(path).expanduser().resolve()
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in p.stem) or "clip"
    return f"{stem}-{hashlib.sha256(str(p).encode()).hexdigest()[:8]}"


def unusable_entry(p: Path) -> str | None:
    """Why an entry named like a video cannot be read as one (it is then listed, never silently
    dropped), or None for a regular file."""
    if p.is_symlink() and not p.exists():
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        return f"broken symbolic link (to {target})"
    if p.is_dir():
        return "a directory named like a video file (a folder dataset takes video files)"
    if p.is_file():
        return None
    try:
        mode = p.stat().st_mode
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return f"{kind}, not a video file"


def find_source(folder: Path, name: str) -> Path | None:
    """The video file or frame folder called `name` inside `folder` (any known extension)."""
    direct = folder / name
    if direct.is_dir():
        return direct
    if direct.is_file() and direct.suffix.lower() in VIDEO_EXTENSIONS:
        return direct
    for ext in VIDEO_EXTENSIONS:
        for cand in (folder / f"{name}{ext}", folder / f"{name}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def check_dir(path: Path, what: str, hint: str) -> None:
    """Raise a `DatasetError` naming `what` and how to fix it when `path` is not a folder."""
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}. {hint}")


def log_rejected(rejected: list[tuple[str, str]], notes: list[tuple[str, str]] = ()) -> None:
    for cid, why in rejected:
        log.info("rejected %s: %s", cid, why)
    for cid, note in notes:
        log.warning("%s: %s", cid, note)
