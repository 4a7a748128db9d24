"""Dataset adapters: turn a corpus on disk into a list of `Clip` records.

A clip is an id, a source (a video file or a folder of frames), a subtitle, labels, a split and
the reference texts of the instruction tasks. Adapters only read text files (lists, CSV, JSON):
no decoding happens here, so both stages (extraction and training) use them cheaply.

Every adapter returns a `Corpus`: the clips it accepted and the entries it rejected, each with
its reason (a missing video, an unknown label, an id that tries to leave the data folder, ...).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)

MER2023_LABELS = ("neutral", "angry", "happy", "sad", "worried", "surprise")
MERR_LABELS = ("neutral", "angry", "happy", "sad", "worried", "surprise", "fear", "contempt", "doubt")
# DFEW numbers its classes; 0 means "not single-labelled" and is never used for the single-label task.
DFEW_LABELS = {1: "happy", 2: "sad", 3: "neutral", 4: "angry", 5: "surprise", 6: "disgust", 7: "fear"}
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


def read_transcripts(path: Path | None) -> dict[str, str]:
    """`name,sentence` CSV -> {name: sentence}; empty sentences are dropped (no subtitle)."""
    if path is None or not path.exists():
        return {}
    rows = read_csv(path)
    if rows and ("name" not in rows[0] or "sentence" not in rows[0]):
        raise DatasetError(f"{path}: expected columns name,sentence; found {', '.join(rows[0])}")
    return {r["name"]: r["sentence"] for r in rows if r.get("sentence")}


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


def normalize_label(label: str | None) -> str | None:
    if label is None:
        return None
    key = label.strip().lower()
    return LABEL_ALIASES.get(key, key) or None


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


def _check_dir(path: Path, what: str, hint: str) -> None:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}. {hint}")


# ---------------------------------------------------------------------------------------------
# Adapters


def load_merr(
    root: Path | str,
    *,
    video_dir: str = "video",
    coarse: str = "MERR_coarse_grained",
    fine: str = "MERR_fine_grained",
    transcripts: str = "transcription_en_all.csv",
    split_file: str = "split.csv",
    labels: Iterable[str] = MERR_LABELS,
) -> Corpus:
    """MERR: NCEV lists `<coarse>.txt` / `<fine>.txt`, captions `<coarse>.json` (`caption`) and
    `<fine>.json` (`smp_reason_caption`), the transcript CSV and a folder of videos.
    An optional `split.csv` (`name,split`) assigns splits; without it every clip is `train`."""
    root = Path(root)
    videos = root / video_dir
    _check_dir(videos, "MERR video folder", f"Put the clips in {video_dir}/ or pass video_dir=...")
    lists = [root / f"{coarse}.txt", root / f"{fine}.txt"]
    if not any(p.exists() for p in lists):
        raise DatasetError(f"no MERR clip list in {root}: expected {lists[0].name} and/or {lists[1].name} "
                           "(one line a clip: 'name frame_count emotion valence')")
    captions: dict[str, dict[str, str]] = {}
    for stem, key, task in ((coarse, "caption", "reason"), (fine, "smp_reason_caption", "reason_v2")):
        jpath = root / f"{stem}.json"
        if jpath.exists():
            data = json.loads(read_text(jpath))
            if not isinstance(data, dict):
                raise DatasetError(f"{jpath}: expected an object keyed by clip name")
            for name, rec in data.items():
                if isinstance(rec, dict) and rec.get(key):
                    captions.setdefault(name, {})[task] = str(rec[key]).strip()
    subs = read_transcripts(root / transcripts)
    splits = {r["name"]: r["split"] for r in read_csv(root / split_file)} if (root / split_file).exists() else {}
    entries: dict[str, NcevEntry] = {}
    rejected: list[tuple[str, str]] = []
    for path in lists:
        if path.exists():
            got, bad = read_ncev(path)
            rejected += bad
            for e in got:
                entries.setdefault(e.name, e)
    return _build("merr", root, entries.values(), videos, subs, captions, splits, tuple(labels), rejected)


def load_mer2023(
    root: Path | str,
    *,
    video_dir: str = "video",
    lists: Mapping[str, str] | None = None,
    transcripts: str = "transcription_en_all.csv",
    labels: Iterable[str] = MER2023_LABELS,
) -> Corpus:
    """MER2023: NCEV lists per split (default `train.txt`, `val.txt`, `test.txt`, whichever exist),
    the transcript CSV and a folder of videos; six labels."""
    root = Path(root)
    videos = root / video_dir
    _check_dir(videos, "MER2023 video folder", f"Put the clips in {video_dir}/ or pass video_dir=...")
    lists = dict(lists or {"train": "train.txt", "val": "val.txt", "test": "test.txt"})
    present = {split: root / f for split, f in lists.items() if (root / f).exists()}
    if not present:
        raise DatasetError(f"no MER2023 clip list in {root}: expected one of {', '.join(lists.values())}")
    subs = read_transcripts(root / transcripts)
    entries: dict[str, NcevEntry] = {}
    splits: dict[str, str] = {}
    rejected: list[tuple[str, str]] = []
    for split, path in present.items():
        got, bad = read_ncev(path)
        rejected += bad
        for e in got:
            if e.name in entries:
                rejected.append((e.name, f"listed twice ({splits[e.name]} and {split}); kept in {splits[e.name]}"))
                continue
            entries[e.name] = e
            splits[e.name] = split
    return _build("mer2023", root, entries.values(), videos, subs, {}, splits, tuple(labels), rejected)


def load_dfew(
    root: Path | str,
    *,
    fold: int = 1,
    frames_dir: str = "Clip/clip_224x224",
    split_dir: str = "EmoLabel_DataSplit",
) -> Corpus:
    """DFEW: folders of JPEG frames and the 5-fold single-label split CSVs
    `EmoLabel_DataSplit/{train,test}(single-labeled)/set_{fold}.csv` (`video_name,label`, labels 1-7)."""
    root = Path(root)
    if fold not in range(1, 6):
        raise DatasetError(f"DFEW fold must be 1..5, got {fold}")
    frames = root / frames_dir
    _check_dir(frames, "DFEW frame folder", f"Expected {frames_dir}/<id>/*.jpg; pass frames_dir=... "
               "(e.g. Clip/clip_224x224_16f for the 16-frame version)")
    labels = tuple(DFEW_LABELS[i] for i in sorted(DFEW_LABELS))
    clips: list[Clip] = []
    rejected: list[tuple[str, str]] = []
    seen: set[str] = set()
    for split in ("train", "test"):
        csv_path = root / split_dir / f"{split}(single-labeled)" / f"set_{fold}.csv"
        if not csv_path.exists():
            raise DatasetError(f"DFEW split file not found: {csv_path}")
        for row in read_csv(csv_path):
            name = row.get("video_name") or row.get("name") or ""
            try:
                code = int(float(row.get("label", "")))
            except ValueError:
                rejected.append((name, f"{csv_path.name}: label {row.get('label')!r} is not a number 1-7"))
                continue
            if code not in DFEW_LABELS:
                rejected.append((name, f"label {code} is not single-labelled (1-7)"))
                continue
            if why := safe_id(name):
                rejected.append((name, why))
                continue
            cid = f"{int(name):05d}" if name.isdigit() else name
            src = next((p for p in (frames / cid, frames / name) if p.is_dir()), None)
            if src is None:
                rejected.append((name, f"no frame folder {frames / cid}"))
                continue
            if cid in seen:
                rejected.append((cid, "duplicate id"))
                continue
            seen.add(cid)
            clips.append(Clip(cid, src, None, DFEW_LABELS[code], None, split, {}, {"fold": fold}))
    return Corpus("dfew", root, labels, clips, rejected)


def load_folder(
    root: Path | str,
    *,
    labels_csv: str | Path | None = None,
    labels: Iterable[str] | None = None,
) -> Corpus:
    """Any folder of videos, searched recursively. A clip's id is its path relative to the folder
    without the extension, with "/" written "%2F" (see `path_to_id`): `a/x.mp4` and `b/x.mp4` are
    `a%2Fx` and `b%2Fx`. An optional CSV `name,label,sentence` (and optionally `split`) gives labels and
    subtitles; `name` is that relative path without extension (`sub/clip`, or the id itself). Entries
    named like videos that are not readable files (FIFOs, directories, broken links) are rejected with
    their reason, never silently dropped."""
    root = Path(root)
    _check_dir(root, "video folder", "Pass the folder that holds the clips.")
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
    if labels_csv is not None:
        csv_path = Path(labels_csv) if Path(labels_csv).is_absolute() else root / labels_csv
        if not csv_path.exists():
            raise DatasetError(f"labels CSV not found: {csv_path}")
        rows = [r for r in read_csv(csv_path) if r.get("name")]
        for r in rows:   # a name is the relative path ("sub/clip") ...
            table[path_to_id(r["name"])] = r
        for r in rows:   # ... or the id itself ("sub%2Fclip")
            table.setdefault(r["name"], r)
    seen_labels = sorted({normalize_label(r.get("label")) for r in table.values() if r.get("label")} - {None})
    label_set = tuple(labels) if labels is not None else tuple(seen_labels)
    clips = []
    for cid, src in found.items():
        row = table.get(cid, {})
        label = normalize_label(row.get("label")) if row.get("label") else None
        if label is not None and label_set and label not in label_set:
            rejected.append((cid, f"label {label!r} is not in the label set {list(label_set)}"))
            continue
        clips.append(Clip(cid, src, row.get("sentence") or None, label, None, row.get("split") or "train",
                          {}, {"path": id_to_path(cid)} if cid != id_to_path(cid) else {}))
    for cid, why in rejected:
        log.info("rejected %s: %s", cid, why)
    return Corpus("folder", root, label_set, clips, rejected)


def _build(name, root, entries, videos, subs, captions, splits, labels, rejected) -> Corpus:
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
                          captions.get(e.name, {}), {"frames": e.frames} if e.frames else {}))
    for cid, why in rejected:
        log.info("rejected %s: %s", cid, why)
    return Corpus(name, root, labels, clips, rejected)


ADAPTERS: dict[str, Callable[..., Corpus]] = {
    "merr": load_merr,
    "mer2023": load_mer2023,
    "dfew": load_dfew,
    "folder": load_folder,
}


def load_corpus(kind: str, root: Path | str, **options: Any) -> Corpus:
    """Load a corpus by adapter name (`merr`, `mer2023`, `dfew`, `folder`)."""
    try:
        adapter = ADAPTERS[kind]
    except KeyError:
        raise DatasetError(f"unknown dataset {kind!r}; choose one of: {', '.join(ADAPTERS)}") from None
    corpus = adapter(root, **options)
    if not corpus.clips:
        why = "; ".join(f"{cid}: {r}" for cid, r in corpus.rejected[:3])
        raise DatasetError(f"no clips found in {root} as a {kind} dataset"
                           + (f" ({len(corpus.rejected)} rejected, e.g. {why})" if why else "")
                           + ". Check --dataset and --data.")
    return corpus
