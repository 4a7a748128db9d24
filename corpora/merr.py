"""MERR (the Multimodal Emotion Reasoning dataset of Emotion-LLaMA): NCEV lists, coarse and fine
captions, English transcripts and a folder of videos; nine labels."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter import Adapter, Sound
from .base import Corpus, DatasetError, check_dir, read_csv, read_text, read_transcripts
from .ncev import NcevEntry, build_corpus, read_ncev

MERR_LABELS = ("neutral", "angry", "happy", "sad", "worried", "surprise", "fear", "contempt", "doubt")


@dataclass(frozen=True)
class MerrOptions:
    video_dir: str = "video"
    coarse: str = "MERR_coarse_grained"          # <coarse>.txt (NCEV list) and <coarse>.json (`caption`)
    fine: str = "MERR_fine_grained"              # <fine>.txt and <fine>.json (`smp_reason_caption`)
    transcripts: str = "transcription_en_all.csv"
    split_file: str = "split.csv"                # optional `name,split`; without it every clip is train
    labels: tuple[str, ...] = MERR_LABELS


def read_merr(root: Path, o: MerrOptions) -> Corpus:
    """MERR: NCEV lists `<coarse>.txt` / `<fine>.txt`, captions `<coarse>.json` (`caption`) and
    `<fine>.json` (`smp_reason_caption`), the transcript CSV and a folder of videos.
    An optional `split.csv` (`name,split`) assigns splits; without it every clip is `train`."""
    videos = root / o.video_dir
    check_dir(videos, "MERR video folder", f"Put the clips in {o.video_dir}/ or pass video_dir=...")
    lists = [root / f"{o.coarse}.txt", root / f"{o.fine}.txt"]
    if not any(p.exists() for p in lists):
        raise DatasetError(f"no MERR clip list in {root}: expected {lists[0].name} and/or {lists[1].name} "
                           "(one line a clip: 'name frame_count emotion valence')")
    captions: dict[str, dict[str, str]] = {}
    for stem, key, task in ((o.coarse, "caption", "reason"), (o.fine, "smp_reason_caption", "reason_v2")):
        jpath = root / f"{stem}.json"
        if jpath.exists():
            data = json.loads(read_text(jpath))
            if not isinstance(data, dict):
                raise DatasetError(f"{jpath}: expected an object keyed by clip name")
            for name, rec in data.items():
                if isinstance(rec, dict) and rec.get(key):
                    captions.setdefault(name, {})[task] = str(rec[key]).strip()
    subs = read_transcripts(root / o.transcripts)
    split_path = root / o.split_file
    splits = {r["name"]: r["split"] for r in read_csv(split_path)} if split_path.exists() else {}
    entries: dict[str, NcevEntry] = {}
    rejected: list[tuple[str, str]] = []
    for path in lists:
        if path.exists():
            got, bad = read_ncev(path)
            rejected += bad
            for e in got:
                entries.setdefault(e.name, e)
    return build_corpus("merr", root, entries.values(), videos, subs, captions, splits, tuple(o.labels), rejected)


MERR = Adapter(
    name="merr", read=read_merr, options=MerrOptions, labels=MERR_LABELS, splits=("train", "test"),
    sound=Sound.PER_CLIP, benchmark=True,
    summary="MERR: NCEV lists, coarse/fine captions (reason, reason_v2), transcripts, video/; split.csv names "
            "the splits (none: all train)")


def load_merr(root: Path | str, **options: Any) -> Corpus:
    """MERR at `root`; `options` are `MerrOptions` fields (video_dir, coarse, fine, transcripts, split_file,
    labels)."""
    return MERR.load(root, **options)
