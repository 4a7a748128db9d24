"""DFEW (Dynamic Facial Expressions in the Wild): folders of face frames, no sound, seven numbered
labels and five cross-validation folds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter import Adapter, Sound
from .base import Clip, Corpus, DatasetError, check_dir, log_rejected, read_rows, safe_id

# DFEW numbers its classes; 0 means "not single-labelled" and is never used for the single-label task.
DFEW_LABELS = {1: "happy", 2: "sad", 3: "neutral", 4: "angry", 5: "surprise", 6: "disgust", 7: "fear"}
DFEW_FOLDS = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class DfewOptions:
    fold: int = 1                                # 1..5
    frames_dir: str = "Clip/clip_224x224"        # or Clip/clip_224x224_16f (the 16-frame version)
    split_dir: str = "EmoLabel_DataSplit"


def read_dfew(root: Path, o: DfewOptions) -> Corpus:
    """DFEW: folders of JPEG frames and the 5-fold single-label split CSVs
    `EmoLabel_DataSplit/{train,test}(single-labeled)/set_{fold}.csv` (`video_name,label`, labels 1-7)."""
    fold = o.fold
    if fold not in DFEW_FOLDS:
        raise DatasetError(f"DFEW fold must be 1..5, got {fold}")
    frames = root / o.frames_dir
    check_dir(frames, "DFEW frame folder", f"Expected {o.frames_dir}/<id>/*.jpg; pass frames_dir=... "
              "(e.g. Clip/clip_224x224_16f for the 16-frame version)")
    labels = tuple(DFEW_LABELS[i] for i in sorted(DFEW_LABELS))
    rejected: list[tuple[str, str]] = []
    rows: dict[str, list[tuple[str, str, int, Path]]] = {}   # id -> (split, where, label code, frame folder)
    for split in ("train", "test"):
        csv_path = root / o.split_dir / f"{split}(single-labeled)" / f"set_{fold}.csv"
        if not csv_path.exists():
            raise DatasetError(f"DFEW split file not found: {csv_path}")
        header, table = read_rows(csv_path, ("label",))
        column = next((c for c in ("video_name", "name") if c in header), None)
        if column is None:
            raise DatasetError(f"{csv_path}:1: the header is {','.join(header)}; expected the columns video_name,label")
        for line, row in table:
            name, where = row[column], f"{csv_path.parent.name}/{csv_path.name}:{line}"
            try:
                code = int(float(row["label"]))
            except ValueError:
                rejected.append((name, f"{where}: label {row['label']!r} is not a number 1-7"))
                continue
            if code not in DFEW_LABELS:
                rejected.append((name, f"{where}: label {code} is not single-labelled (1-7)"))
                continue
            if why := safe_id(name):
                rejected.append((name, why))
                continue
            cid = f"{int(name):05d}" if name.isdigit() else name
            src = next((p for p in (frames / cid, frames / name) if p.is_dir()), None)
            if src is None:
                rejected.append((name, f"no frame folder {frames / cid}"))
                continue
            rows.setdefault(cid, []).append((split, where, code, src))
    clips: list[Clip] = []
    notes: list[tuple[str, str]] = []
    for cid, got in rows.items():
        places = ", ".join(f"{DFEW_LABELS[code]} ({where})" for _, where, code, _ in got)
        if len({split for split, _, _, _ in got}) > 1:
            rejected.append((cid, f"listed in both splits of fold {fold}: {places}"))
        elif len({code for _, _, code, _ in got}) > 1:
            rejected.append((cid, f"conflicting labels: {places}"))
        else:
            if len(got) > 1:
                notes.append((cid, f"listed {len(got)} times with the same label: {places}; kept once"))
            split, _, code, src = got[0]
            clips.append(Clip(cid, src, None, DFEW_LABELS[code], None, split, {}, {"fold": fold}, has_sound=False))
    log_rejected(rejected, notes)
    return Corpus("dfew", root, labels, clips, rejected, notes)


DFEW = Adapter(
    name="dfew", read=read_dfew, options=DfewOptions, labels=tuple(DFEW_LABELS[i] for i in sorted(DFEW_LABELS)),
    splits=("train", "test"), sound=Sound.NEVER, folds=DFEW_FOLDS, fixed_labels=True, benchmark=True,
    summary="DFEW: frame folders (no sound), EmoLabel_DataSplit/{train,test}(single-labeled)/set_<fold>.csv")


def load_dfew(root: Path | str, **options: Any) -> Corpus:
    """DFEW at `root`; `options` are `DfewOptions` fields (fold, frames_dir, split_dir)."""
    return DFEW.load(root, **options)
