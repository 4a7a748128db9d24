"""MERR (the Multimodal Emotion Reasoning dataset of Emotion-LLaMA): NCEV lists, coarse and fine
captions, English transcripts, a folder of videos and an optional `split.csv`; nine labels.

A clip is in the coarse list, the fine list or both; where both name it they must agree (label and
valence), else it is rejected with both lines. With a `split.csv`, splits are exactly what it says:
a clip it does not name is rejected ("not named in split.csv"), never trained on by default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter import Adapter, Sound
from .base import Corpus, DatasetError, check_dir, read_json, read_rows, read_transcripts, split_name, unknown_split
from .ncev import NcevEntry, build_corpus, dedupe, read_ncev

MERR_LABELS = ("neutral", "angry", "happy", "sad", "worried", "surprise", "fear", "contempt", "doubt")


@dataclass(frozen=True)
class MerrOptions:
    video_dir: str = "video"
    coarse: str = "MERR_coarse_grained"          # <coarse>.txt (NCEV list) and <coarse>.json (`caption`)
    fine: str = "MERR_fine_grained"              # <fine>.txt and <fine>.json (`smp_reason_caption`)
    transcripts: str = "transcription_en_all.csv"
    split_file: str = "split.csv"                # optional `name,split`; without it every clip is train
    labels: tuple[str, ...] = MERR_LABELS


def read_captions(path: Path, key: str) -> dict[str, str]:
    """{clip: caption} from a MERR caption JSON (`{name: {key: text, ...}}`); an entry without `key`
    has no caption. Any other shape is a `DatasetError` naming the file and the entry."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected an object keyed by clip name, found a JSON {type(data).__name__}")
    out = {}
    for name, rec in data.items():
        text = rec.get(key) if isinstance(rec, dict) else rec
        if not isinstance(rec, dict) or not isinstance(text, (str, type(None))):
            raise DatasetError(f"{path}: entry {name!r}: expected an object whose {key!r} is a text, found "
                               f"{type(text).__name__} {str(text)[:60]!r}")
        if text and text.strip():
            out[name] = text.strip()
    return out


def read_splits(path: Path) -> tuple[dict[str, str], list[tuple[str, str]], list[tuple[str, str]]]:
    """`name,split` rows: ({name: split}, rejected, notes). Split names are read by `split_name`
    ("Test" is test); an unknown one rejects its clip, and so does a clip listed with two splits;
    one listed twice with the same split is kept, with a note."""
    rows: dict[str, list[tuple[int, str | None, str]]] = {}
    for line, r in read_rows(path, ("name", "split"))[1]:
        rows.setdefault(r["name"], []).append((line, split_name(r["split"]), r["split"]))
    splits, rejected, notes = {}, [], []
    for name, got in rows.items():
        if not name:
            rejected.append((f"{path.name}:{got[0][0]}", "a row without a name"))
        elif bad := next(((line, raw) for line, split, raw in got if split is None), None):
            rejected.append((name, unknown_split(bad[1], f"{path.name}:{bad[0]}")))
        elif len({split for _, split, _ in got}) > 1:
            rejected.append((name, f"{path.name} gives two splits: "
                                   + ", ".join(f"{raw} (line {line})" for line, _, raw in got)))
        else:
            splits[name] = got[0][1]
            if len(got) > 1:
                notes.append((name, f"{path.name} lists it {len(got)} times (lines "
                                    f"{', '.join(str(line) for line, _, _ in got)}) with split {got[0][1]}; kept once"))
    return splits, rejected, notes


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
            for name, text in read_captions(jpath, key).items():
                captions.setdefault(name, {})[task] = text
    subs = read_transcripts(root / o.transcripts)
    listed: list[NcevEntry] = [e for p in lists if p.exists() for e in read_ncev(p)]
    entries, rejected, notes = dedupe(listed)
    splits: dict[str, str] = {}
    split_path = root / o.split_file
    if split_path.exists():
        splits, bad, split_notes = read_splits(split_path)
        refused = {name for name, _ in bad}
        entries = [e for e in entries if e.name not in refused]
        names = {e.name for e in listed}
        rejected += bad + [(n, f"named in {split_path.name} but in neither {lists[0].name} nor {lists[1].name}")
                           for n in splits if n not in names]
        notes += split_notes
    return build_corpus("merr", root, entries, videos, subs, captions, splits, tuple(o.labels), rejected, notes,
                        split_path.name if split_path.exists() else None)


MERR = Adapter(
    name="merr", read=read_merr, options=MerrOptions, labels=MERR_LABELS, splits=("train", "val", "test"),
    sound=Sound.PER_CLIP, benchmark=True,
    summary="MERR: NCEV lists, coarse/fine captions (reason, reason_v2), transcripts, video/; split.csv names "
            "the split of every clip (without it: all train)")


def load_merr(root: Path | str, **options: Any) -> Corpus:
    """MERR at `root`; `options` are `MerrOptions` fields (video_dir, coarse, fine, transcripts, split_file,
    labels)."""
    return MERR.load(root, **options)
