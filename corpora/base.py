"""What every adapter shares: the `Clip` and `Corpus` records, `DatasetError`, clip-id rules and the
small text readers (UTF-8 or not, CSV, transcripts, label spellings).

Adapters only read text files (lists, CSV, JSON): no decoding happens here, so both stages (extraction
and training) use them cheaply. A corpus lists the clips it accepted and the entries it rejected, each
with its reason (a missing video, an unknown label, an id that tries to leave the data folder, ...).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".flv", ".m4v", ".mpg", ".mpeg", ".wmv")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

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

    def split(self, name: str) -> list[Clip]:
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


def read_csv(path: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(read_text(path))))
    return [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in rows]


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
    rows = read_csv(path)
    if rows and ("name" not in rows[0] or "sentence" not in rows[0]):
        raise DatasetError(f"{path}: expected columns name,sentence; found {', '.join(rows[0])}")
    return {r["name"]: r["sentence"] for r in rows if r.get("sentence")}


def normalize_label(label: str | None) -> str | None:
    if label is None:
        return None
    key = label.strip().lower()
    return LABEL_ALIASES.get(key, key) or None


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


def log_rejected(rejected: list[tuple[str, str]]) -> None:
    for cid, why in rejected:
        log.info("rejected %s: %s", cid, why)
