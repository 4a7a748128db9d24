"""EMER (Explainable Multimodal Emotion Reasoning): a CSV `name,chinese,english` whose English text is
the reference reasoning of each clip, beside the videos (in `video/` or the CSV's own folder). It has
no label set: `emollama eval --dataset emer` scores generated reasoning against the references."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .adapter import Adapter, Sound
from .base import (Clip, Corpus, DatasetError, csv_header, find_source, log_rejected, read_csv, read_transcripts,
                   safe_id, source_has_sound)


@dataclass(frozen=True)
class EmerOptions:
    video_dir: str | None = None                 # default: <folder>/video when it exists, else the CSV's folder
    transcripts: str = "transcription_en_all.csv"
    limit: int | None = None                     # only the first N rows


@dataclass
class EmerSet:
    """The EMER rows in CSV order, each as a clip (split `emer`, reference in `texts["reason"]`); a clip
    whose video is not found keeps a placeholder source and is listed in `absent` (its features may
    still be in a store)."""

    folder: Path                                 # the CSV's folder
    video_dir: Path
    clips: list[Clip]
    absent: list[str] = field(default_factory=list)

    def references(self) -> dict[str, str]:
        return {c.id: c.texts["reason"] for c in self.clips}


def find_emer_csv(path: Path) -> tuple[Path, Path]:
    """(the EMER CSV, its folder) from the CSV itself or the folder that holds it."""
    if path.is_dir():
        found = [c for c in sorted(path.glob("*.csv")) if {"name", "english"} <= set(csv_header(c))]
        if not found:
            raise DatasetError(f"no EMER CSV (columns name,chinese,english) in {path}")
        return found[0], path
    if path.is_file():
        return path, path.parent
    raise DatasetError(f"--data {path}: no such file or folder (an EMER CSV name,chinese,english, or its folder)")


def read_emer(path: str | Path, *, options: EmerOptions | None = None) -> EmerSet:
    """Every EMER row with a name and an English reference, as a clip (see `EmerSet`)."""
    o = options or EmerOptions()
    csv_path, folder = find_emer_csv(Path(path))
    rows = read_csv(csv_path, ("name", "english"))   # (and `chinese`, unused): the reference is `english`
    subs = read_transcripts(folder / o.transcripts)
    rows = [r for r in rows if r.get("name") and r.get("english")]
    if o.limit:
        rows = rows[:o.limit]
    if o.video_dir is not None:
        video_dir = Path(o.video_dir) if Path(o.video_dir).is_absolute() else folder / o.video_dir
    else:
        video_dir = folder / "video" if (folder / "video").is_dir() else folder
    out = EmerSet(folder, video_dir, [])
    for r in rows:
        name = r["name"]
        src = find_source(video_dir, name)
        if src is None:
            out.absent.append(name)
        source = src if src is not None else video_dir / name
        out.clips.append(Clip(name, source, subs.get(name), split="emer", texts={"reason": r["english"]},
                              has_sound=source_has_sound(source)))
    return out


def read_emer_corpus(root: Path, o: EmerOptions) -> Corpus:
    """EMER as a corpus (for extraction): the clips whose video is found; the others are rejected."""
    emer = read_emer(root, options=o)
    clips, rejected = [], []
    for c in emer.clips:
        if why := safe_id(c.id):
            rejected.append((c.id, why))
        elif c.id in emer.absent:
            rejected.append((c.id, f"no video or frame folder named {c.id} in {emer.video_dir}"))
        else:
            clips.append(c)
    log_rejected(rejected)
    return Corpus("emer", emer.folder, (), clips, rejected)


EMER = Adapter(
    name="emer", read=read_emer_corpus, options=EmerOptions, labels=(), splits=("emer",), sound=Sound.PER_CLIP,
    benchmark=True,
    summary="EMER: a CSV name,chinese,english (reference reasoning) and the videos (video/ or beside the CSV)")


def load_emer(root: Path | str, **options: Any) -> Corpus:
    """EMER at `root` (the CSV or its folder); `options` are `EmerOptions` fields."""
    return EMER.load(root, **options)
