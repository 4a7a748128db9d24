"""MER2023 (the Multimodal Emotion Recognition challenge 2023): an NCEV list per split, English
transcripts and a folder of videos; six labels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter import Adapter, Sound
from .base import Corpus, DatasetError, check_dir, read_transcripts, split_name, unknown_split
from .ncev import NcevEntry, build_corpus, dedupe, read_ncev

MER2023_LABELS = ("neutral", "angry", "happy", "sad", "worried", "surprise")
MER2023_LISTS = {"train": "train.txt", "val": "val.txt", "test": "test.txt"}


@dataclass(frozen=True)
class Mer2023Options:
    video_dir: str = "video"
    lists: dict[str, str] | None = None          # split -> NCEV list file (default MER2023_LISTS)
    transcripts: str = "transcription_en_all.csv"
    labels: tuple[str, ...] = MER2023_LABELS


def read_mer2023(root: Path, o: Mer2023Options) -> Corpus:
    """MER2023: NCEV lists per split (default `train.txt`, `val.txt`, `test.txt`, whichever exist),
    the transcript CSV and a folder of videos; six labels. A clip belongs to one split: one in two
    lists is rejected with both lines; one listed twice in one list must agree with itself."""
    videos = root / o.video_dir
    check_dir(videos, "MER2023 video folder", f"Put the clips in {o.video_dir}/ or pass video_dir=...")
    lists: dict[str, str] = {}
    for key, file in (o.lists or MER2023_LISTS).items():
        split = split_name(key)
        if split is None:
            raise DatasetError(f"dataset 'mer2023' option lists: {unknown_split(key, file)}")
        lists[split] = file
    present = {split: root / f for split, f in lists.items() if (root / f).exists()}
    if not present:
        raise DatasetError(f"no MER2023 clip list in {root}: expected one of {', '.join(lists.values())}")
    subs = read_transcripts(root / o.transcripts)
    listed = {split: read_ncev(path) for split, path in present.items()}
    where: dict[str, list[NcevEntry]] = {}
    splits: dict[str, str] = {}
    for split, got in listed.items():
        for e in got:
            where.setdefault(e.name, []).append(e)
            splits.setdefault(e.name, split)
    rejected = [(name, "listed in two splits: " + ", ".join(e.where for e in group) + " (a clip belongs to one)")
                for name, group in where.items() if len({e.source for e in group}) > 1]
    two = {name for name, _ in rejected}
    entries, bad, notes = dedupe(e for got in listed.values() for e in got if e.name not in two)
    return build_corpus("mer2023", root, entries, videos, subs, {}, splits, tuple(o.labels), rejected + bad, notes)


MER2023 = Adapter(
    name="mer2023", read=read_mer2023, options=Mer2023Options, labels=MER2023_LABELS,
    splits=tuple(MER2023_LISTS), sound=Sound.PER_CLIP, fixed_labels=True, benchmark=True,
    summary="MER2023: train.txt / val.txt / test.txt (NCEV lists), transcripts, video/")


def load_mer2023(root: Path | str, **options: Any) -> Corpus:
    """MER2023 at `root`; `options` are `Mer2023Options` fields (video_dir, lists, transcripts, labels)."""
    return MER2023.load(root, **options)
