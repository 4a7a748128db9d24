"""Inference on any videos: a run loaded once, then labels, probabilities, reasoning and face information.

    from emollama.pipeline.inference import Predictor

    predictor = Predictor.from_run("runs/stage1")              # quiet: no loading bars
    for p in predictor.predict(["clip.mp4", "my_videos/"], subtitles="subtitles.csv"):
        print(p.id, p.label, p.probabilities, p.face.detected, p.warnings)

``predict`` takes video files, frame folders, folders of videos (searched recursively; ids as the folder
dataset makes them: the relative path without extension, "/" written "%2F") and list files (``.txt``,
``.lst``, ``.list``: one path a line, relative to the list's folder). Each clip is read from the store
that already holds its content (found by the sha256 its extraction recorded, under whatever id), else
extracted into the run's eval store with exactly the settings of the run's feature sets
(``pipeline.features``). Subtitles come per clip from a ``name,sentence`` CSV (name: the clip id, its
relative path or its file name without extension) or one text for every clip.

A ``Prediction`` carries the face information the extraction recorded (``FaceInfo``: whether a face was
found, the share of the sampled frames where the main face was detected, interpolated or absent, and the
number of shots) and a warning line for a clip with no face or a weak track, whose label then rests on
the voice, the words and the whole frame. ``preview`` writes each clip's contact sheet (its face crops,
then the global frame). ``emollama infer`` is a thin layer over this module.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from emollama.corpora import Clip, clip_id_for, read_transcripts
from emollama.extract.faces import WEAK_ABSENT
from emollama.pipeline.features import (EvalError, EvalStores, ExtractReport, extract_missing, feature_batcher,
                                        known_by_content, not_computable, run_stores)

log = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass
class FaceInfo:
    """What the extraction recorded about a clip's faces, over the frames its face track ran on."""

    found: bool                          # any face at all (False: whole frames were used)
    frames: int | None = None            # sampled frames the track ran on
    detected: float | None = None        # share of them where the main face was detected
    interpolated: float | None = None    # ... where its box was interpolated between detections
    absent: float | None = None          # ... where it was not seen (its shot lacks it, or MTCNN missed it there)
    shots: int | None = None             # shots found in the clip

    @property
    def present(self) -> float | None:
        """The share of the sampled frames where the main face is (detected or interpolated)."""
        if self.absent is not None:
            return 1 - self.absent
        if self.detected is not None and self.interpolated is not None:
            return self.detected + self.interpolated
        return None

    @property
    def weak(self) -> bool:
        """A face was found, but the main face is absent in more than ``extract.faces.WEAK_ABSENT`` of the
        sampled frames (the rule of ``extract.faces.is_weak`` and ``store info``): its crops may show someone
        else, or no one. (Between two detections the face is present: with ``detect_every = 3`` two frames in
        three are interpolated by design.)"""
        return self.found and self.absent is not None and self.absent > WEAK_ABSENT

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> "FaceInfo | None":
        """From a clip's store record (None when it has no face fields: an imported clip)."""
        if "face_found" not in rec:
            return None
        n = rec.get("sampled_frames")
        share = lambda k: (rec[k] / n) if n and isinstance(rec.get(k), (int, float)) else None   # noqa: E731
        if "face_detected" in rec:
            return cls(found=bool(rec["face_found"]), frames=n, detected=share("face_detected"),
                       interpolated=share("face_interpolated"), absent=share("face_absent"), shots=rec.get("shots"))
        present = share("face_frames")     # recorded before the split: detected and interpolated together
        return cls(found=bool(rec["face_found"]), frames=n, absent=None if present is None else 1 - present)

    def warning(self) -> str | None:
        if not self.found:
            return ("no face found: whole frames were used, so the label rests on the voice, the words and the "
                    "scene")
        if self.weak:
            pct = lambda x: "?" if x is None else f"{100 * x:.0f}%"   # noqa: E731
            return (f"weak face track: the main face is absent from {pct(self.absent)} of the sampled frames "
                    f"(detected in {pct(self.detected)}, interpolated in {pct(self.interpolated)}): check its "
                    "contact sheet (--preview DIR)")
        return None


@dataclass
class Prediction:
    """One clip's result (``to_dict`` is what ``emollama infer --json`` prints)."""

    file: str
    id: str
    label: str | None = None
    probabilities: dict[str, float] | None = None
    reasoning: str | None = None
    subtitle: str | None = None          # the text the prompt said the person says
    subtitle_from: str | None = None     # where it came from: given (--subtitle, a CSV) | asr | None
    asr_text: str | None = None          # the ASR text set's text for the clip (used or not)
    asr_language: str | None = None      # ... and the spoken language Whisper found (or was told)
    face: FaceInfo | None = None
    warnings: list[str] = field(default_factory=list)
    extracted: bool = False              # extracted in this call (else read from a store)
    store_id: str | None = None          # the id the store holds the clip under
    preview: str | None = None           # its contact sheet, when asked for
    error: str | None = None
    note: str | None = None              # the tiny profile's warning

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["face"] = None if self.face is None else {**asdict(self.face), "weak": self.face.weak}
        return d


@dataclass
class Input:
    """A clip to predict: where it came from and the id it gets."""

    file: str                            # as given (or found in a folder / list)
    source: Path                         # resolved
    id: str
    names: tuple[str, ...] = ()          # what a subtitles CSV may call it
    error: str | None = None


# ---------------------------------------------------------------------------------------------
# Inputs


def not_a_clip(path: str | Path) -> str | None:
    """Why ``path`` cannot be a clip (a FIFO, a socket, a device, a folder without frames or videos), or
    None for a regular file or a frame folder. Checked with one ``stat``: a FIFO is never opened (that
    would block until something writes into it)."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except OSError as e:
        return f"cannot read it ({os.strerror(e.errno) if e.errno else e})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        from emollama.extract.decode import list_frame_files

        try:
            if list_frame_files(p):
                return None            # a folder of frames (as DFEW ships its clips)
        except OSError as e:
            return f"a folder that cannot be listed ({os.strerror(e.errno) if e.errno else e})"
        return "a folder with no image frames and no videos"
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return f"{kind}, not a video file: save the stream to a file first"


def _videos_in(folder: Path) -> tuple[list[Input], list[Input], list[tuple[str, str]]]:
    """The videos of a folder, as the folder dataset finds and names them; the entries it rejects that
    look like clips (a broken link, a FIFO named .mp4: failed inputs); the files that are no videos at
    all (a labels CSV, images, notes: skipped, with the reason)."""
    from emollama.corpora import FOLDER, id_to_path

    corpus = FOLDER.load(folder)
    found = [Input(str(c.source), c.source.resolve(), c.id,
                   (c.id, id_to_path(c.id), c.source.stem, c.source.name)) for c in corpus.clips]
    rejected, skipped = [], []
    for cid, why in corpus.rejected:
        if "not a video" in why:
            skipped.append((str(folder / why.split(": ", 1)[0]), why.split(": ", 1)[-1]))
        else:
            rejected.append(Input(str(folder / id_to_path(cid)), (folder / id_to_path(cid)).resolve(), cid, error=why))
    return found, rejected, skipped


def _list_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read the list file {path}: {e}") from None
    base = path.parent
    return [str(p if (p := Path(s.strip()).expanduser()).is_absolute() else base / p)
            for s in lines if s.strip() and not s.lstrip().startswith("#")]


def collect_inputs(paths: Sequence[str | Path]) -> tuple[list[Input], list[tuple[str, str]]]:
    """Every clip named by ``paths`` (files, frame folders, folders of videos searched recursively, list
    files) and the files of those folders that are no videos (skipped: (path, why)). A path that does not
    exist is an ``EvalError`` (all of them named); one that cannot be a clip is an ``Input`` with its
    ``error``."""
    missing = [f"{p} (a broken link)" if Path(p).expanduser().is_symlink() else str(p)
               for p in paths if not Path(p).expanduser().exists()]
    if missing:
        raise EvalError(f"no such file: {', '.join(missing)}")
    out: list[Input] = []
    skipped: list[tuple[str, str]] = []
    for given in paths:
        p = Path(given).expanduser()
        if p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            listed = _list_file(p)
            if not listed:
                raise EvalError(f"the list file {p} names no clip (one path a line; # starts a comment)")
            more, more_skipped = collect_inputs(listed)
            out += more
            skipped += more_skipped
            continue
        if p.is_dir():
            from emollama.extract.decode import list_frame_files

            try:
                frames = bool(list_frame_files(p))
            except OSError:
                frames = False
            videos, rejected, other = _videos_in(p)
            skipped += other
            if videos or rejected or not frames:
                if not videos and not rejected:
                    out.append(Input(str(given), p.resolve(), clip_id_for(p),
                                     error="a folder with no videos and no image frames"))
                out += videos + rejected
                continue
        why = not_a_clip(p)
        out.append(Input(str(given), p.resolve(), clip_id_for(p), (p.stem, p.name), error=why))
    return _unique_ids(out), skipped


def _unique_ids(inputs: list[Input]) -> list[Input]:
    """Two inputs with one id but different sources (two folders with a clip of the same relative path) get
    the path-hash id (``corpora.clip_id_for``); the same source given twice stays one id."""
    first: dict[str, Path] = {}
    for i in inputs:
        if i.id in first and first[i.id] != i.source:
            i.id = clip_id_for(i.source)
        first.setdefault(i.id, i.source)
    return inputs


def read_subtitles(path: str | Path) -> dict[str, str]:
    """A ``name,sentence`` CSV: {name: sentence}."""
    from emollama.corpora import DatasetError

    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalError(f"subtitles CSV not found: {p}")
    try:
        return read_transcripts(p)
    except DatasetError as e:
        raise EvalError(str(e)) from None


def _source_sha256(source: Path) -> str | None:
    from emollama.extract.sources import file_sha256

    return file_sha256(source) if source.is_file() else None


# ---------------------------------------------------------------------------------------------
# The predictor


@contextlib.contextmanager
def quiet_loading():
    """transformers' and the hub's loading bars and info lines off, for loading a run from Python."""
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    tl = transformers.utils.logging
    level = tl.get_verbosity()
    bars = not are_progress_bars_disabled()
    tbars = tl.is_progress_bar_enabled()
    tl.set_verbosity_error()
    tl.disable_progress_bar()
    disable_progress_bars()
    try:
        yield
    finally:
        tl.set_verbosity(level)
        if tbars:
            tl.enable_progress_bar()
        if bars:
            enable_progress_bars()


class Predictor:
    """A loaded run and the stores its features come from; ``predict`` as many times as wanted."""

    def __init__(self, run, stores: EvalStores, *, layout: str = "trained",
                 say: Callable[[str], None] = log.info) -> None:
        from emollama.pipeline.evaluation import check_layout

        check_layout(run, layout)
        self.run, self.stores, self.layout, self.say = run, stores, layout, say
        self.skipped: list[tuple[str, str]] = []    # the last predict's files that are no videos: (path, why)

    @classmethod
    def from_run(cls, run: str | Path, *, store: str | None = None, cache_store: str | None = None,
                 device: str = "auto", layout: str = "trained", features: Sequence[str] = (),
                 llm: str | None = None, offline: bool | None = None, quiet: bool = True,
                 say: Callable[[str], None] = log.info) -> "Predictor":
        """Load ``run`` (a run folder of ``emollama train`` or ``emollama import-checkpoint``) on ``device``.

        ``store``: the feature store to read (default: the run's; never written). ``cache_store``: where
        clips missing from it are extracted (default ``<run>/eval-store.zarr``). ``features``: ``ROLE=SET``
        bindings for an imported run. ``llm``: its base LM instead of the run's. ``offline``: models from local
        files only. ``quiet``: no loading bars or library info lines. The LM is checked before anything is
        loaded (``pipeline.models.check_run_models``: one message lists what is missing)."""
        from emollama.pipeline.models import check_run_models
        from emollama.train.run import load_run, read_run

        cfg, _, _ = read_run(Path(run))
        if llm:
            cfg.model.llm = llm
        check_run_models(cfg, offline=offline)
        with quiet_loading() if quiet else contextlib.nullcontext():
            loaded = load_run(run, device=device, llm=llm, offline=offline)
        return cls(loaded, run_stores(loaded, store, cache_store, features, say), layout=layout, say=say)

    @property
    def labels(self) -> list[str]:
        return list(self.run.labels)

    def predict(self, paths: Sequence[str | Path], *, subtitles: str | Path | Mapping[str, str] | None = None,
                subtitle: str | None = None, labels: Sequence[str] | None = None, reason: bool = True,
                max_new_tokens: int = 96, batch_size: int = 8, workers: int = 0, progress: bool = False,
                preview: str | Path | None = None, missing_audio: str | None = None,
                offline: bool | None = None, subtitle_source: str | None = None, asr: bool = False,
                asr_set: str | None = None, asr_task: str | None = None,
                asr_language: str | None = None) -> list[Prediction]:
        """One ``Prediction`` per clip of ``paths`` (see the module docstring), in order. ``subtitles``: a
        ``name,sentence`` CSV (or a mapping); ``subtitle``: one text for every clip. ``labels``: the label
        set to score (default: the run's). Files of the folders that are no videos (a labels CSV, images) are
        left out and listed in ``self.skipped``. ``missing_audio``: how a clip without sound is extracted (fail,
        silence, auto; default: as the run's sets were); ``offline``: encoders from local files only. A clip that cannot be read or extracted gets its
        ``error``; the others go on. Where a clip has no subtitle given, the ASR text set's text is used
        (``subtitle_source``, default the run's ``data.subtitles``; ``asr``: transcribe the clips it lacks,
        ``asr_task`` / ``asr_language`` with those settings; ``asr_set``: which set; ``pipeline.subtitles``)."""
        from emollama.train.evaluate import score_labels
        from emollama.train.generate import generate
        from emollama.train.subtitles import TINY_ASR_NOTE
        from emollama.train.tiny import TINY_WARNING

        if subtitles is not None and subtitle is not None:
            raise EvalError("give per-clip subtitles (a CSV) or one subtitle for every clip, not both")
        table = read_subtitles(subtitles) if isinstance(subtitles, (str, Path)) else dict(subtitles or {})
        inputs, self.skipped = collect_inputs(paths)
        run, stores = self.run, self.stores
        targets = [l.strip().lower() for l in labels] if labels else list(run.labels)
        good = [i for i in inputs if i.error is None]
        store_ids = self._store_ids(good)
        clips = {}
        for i in good:
            text = subtitle if subtitle is not None else next((table[n] for n in i.names if n in table), None)
            clips[i.id] = Clip(store_ids.get(i.id, i.id), i.source, text, None, split="infer")
        todo = list({c.id: c for c in clips.values()}.values())
        rep, subs = ExtractReport(), None
        if todo:
            rep = extract_missing(stores, run.feature_keys, todo, run=run, workers=workers, progress=progress,
                                  root=todo[0].source.parent, preview=str(preview) if preview else None,
                                  missing_audio=missing_audio, offline=offline, say=self.say)
        failed = dict(rep.failed)
        failed.update(not_computable(run, stores, rep))
        if todo:
            from emollama.pipeline.subtitles import run_subtitles

            todo, subs = run_subtitles(run, stores, todo, source=subtitle_source, asr=asr, asr_set=asr_set, task=asr_task,
                                    language=asr_language, workers=workers, progress=progress,
                                    root=todo[0].source.parent, offline=offline, say=self.say)
            chosen = {c.id: c for c in todo}
            clips = {k: chosen.get(c.id, c) for k, c in clips.items()}
        batcher, usable, _ = feature_batcher(run, stores, todo)
        out: dict[str, dict] = {}
        if usable:
            prompts = run.prompt_encoder(targets, self.layout)
            logp = score_labels(run.model, prompts, batcher, usable, targets, batch_size=batch_size, device=run.device)
            from emollama.pipeline.evaluation import target_probabilities

            probs = target_probabilities(logp, targets, targets, {})
            finite = [bool(np.isfinite(row).all()) for row in probs]
            fine = [c for c, ok in zip(usable, finite) if ok]
            texts = dict(zip([c.id for c in fine], generate(
                run.model, prompts, batcher, fine, "reason", max_new_tokens=max_new_tokens, batch_size=batch_size,
                device=run.device))) if reason and fine else {}
            for c, pr, ok in zip(usable, probs, finite):
                if not ok:
                    failed[c.id] = ("the model gave non-finite scores (NaN or Inf): the run's weights or this "
                                    "clip's features hold non-finite values (emollama store verify)")
                    continue
                out[c.id] = {"label": targets[int(pr.argmax())],
                             "probabilities": {t: float(v) for t, v in zip(targets, pr)},
                             "reasoning": texts.get(c.id)}
        records = self._records()
        sheets = self._previews(preview, [clips[i.id] for i in good], rep) if preview else {}
        results = []
        for i in inputs:
            c = clips.get(i.id)
            cid = c.id if c is not None else i.id
            meta = c.meta if c is not None else {}
            p = Prediction(file=i.file, id=cid, subtitle=c.subtitle if c is not None else None,
                           subtitle_from={"dataset": "given"}.get(meta.get("subtitle_from"), meta.get("subtitle_from")),
                           asr_text=meta.get("asr_text"), asr_language=meta.get("asr_language"),
                           extracted=cid in rep.extracted, store_id=cid if c is not None else None,
                           note=TINY_WARNING if run.tiny else None)
            if i.error is not None or cid not in out:
                p.error = i.error or failed.get(cid, "no features")
            else:
                p.label, p.probabilities, p.reasoning = (out[cid][k] for k in ("label", "probabilities", "reasoning"))
            rec = records.get(cid)
            p.face = FaceInfo.from_record(rec) if rec else None
            if p.face is not None and p.error is None and (w := p.face.warning()):
                p.warnings.append(w)
            if p.face is not None and p.face.found and (p.face.shots or 1) > 1 and p.error is None:
                p.warnings.append(f"{p.face.shots} shots: the face crops come from the main face's shot only")
            if p.subtitle_from == "asr" and subs is not None and subs.tiny:
                p.warnings.append(TINY_ASR_NOTE)      # the subtitle is the random tiny Whisper's
            p.preview = sheets.get(cid)
            results.append(p)
        return results

    def _store_ids(self, inputs: Sequence[Input]) -> dict[str, str]:
        """{input id: the id a store holds its content under}, found by the sha256 extraction recorded."""
        hashes = {i.id: h for i in inputs if (h := _source_sha256(i.source))}
        return known_by_content(self.stores, self.run.feature_keys, hashes) if hashes else {}

    def _records(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        cache = self.stores.cache()
        for st in (cache, self.stores.train):     # the training store's record wins for a clip in both
            if st is not None:
                st.refresh()
                out.update(st.records())
        return out

    def _previews(self, folder: str | Path, clips: Sequence[Clip], rep: ExtractReport) -> dict[str, str]:
        """The contact sheet of each clip: written by the extraction for the clips extracted now, made
        again (decoding and faces only, the same settings) for the clips read from a store."""
        from emollama.extract.step import preview_name

        folder = Path(folder)
        out: dict[str, str] = {}
        redo = [c for c in clips if c.id not in rep.extracted and not (folder / preview_name(c.id)).is_file()]
        if redo:
            self._redo_previews(folder, redo)
        for c in clips:
            path = folder / preview_name(c.id)
            if path.is_file():
                out[c.id] = str(path)
        return out

    def _redo_previews(self, folder: Path, clips: Sequence[Clip]) -> None:
        from emollama.extract.faces import FaceDetector
        from emollama.extract.step import ClipJob, prepare, write_preview
        from emollama.pipeline.extraction import settings_from
        from emollama.pipeline.features import extraction_config

        reader = self.stores.reader
        made = [k for k in self.run.feature_keys if (reader.set_attrs(k).get("config") or {}).get("extract")]
        if not made:
            self.say("no contact sheets: the run's sets are imported (no face settings recorded)")
            return
        settings = settings_from(extraction_config(reader, made, target=self.stores.cache_url))
        detector = FaceDetector(settings.faces, device="cpu")
        for c in clips:
            prep = prepare(ClipJob(c.id, str(c.source)), settings, detector)
            if prep.error:
                self.say(f"no contact sheet for {c.id}: {prep.error}")
                continue
            try:
                write_preview(folder, prep)
            except OSError as e:
                self.say(f"no contact sheet for {c.id}: {e}")


# ---------------------------------------------------------------------------------------------
# Output


def _fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def table_lines(results: Sequence[Prediction]) -> list[str]:
    """The terminal table: one row a clip (p: the label's probability; seen: the share of the sampled frames
    showing the main face; source: read from a store or extracted now), then failures, warnings and the
    reasoning texts."""
    rows = [("clip", "label", "p", "face", "seen", "shots", "source")]
    for r in results:
        f = r.face
        face = "-" if f is None else ("none" if not f.found else "weak" if f.weak else "found")
        p = f"{max(r.probabilities.values()):.3f}" if r.probabilities else "-"
        rows.append((r.id, r.label or "FAILED", p, face, _fmt_share(f.present) if f else "-",
                     str(f.shots) if f and f.shots else "-", "extracted" if r.extracted else "store"))
    widths = [min(48, max(len(row[i]) for row in rows)) for i in range(len(rows[0]))]
    lines = ["  ".join(v[:w].ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    for r in results:
        if r.error:
            lines.append(f"{r.id}: failed: {r.error}")
        for w in r.warnings:
            lines.append(f"{r.id}: warning: {w}")
        if r.subtitle_from == "asr":
            lines.append(f"{r.id}: subtitle from speech ({r.asr_language or '?'}): {r.subtitle}")
        if r.reasoning:
            lines.append(f"{r.id}: reasoning: {r.reasoning}")
        if r.preview:
            lines.append(f"{r.id}: contact sheet: {r.preview}")
    return lines


CSV_COLUMNS = ("file", "id", "label", "probability", "face_found", "face_detected", "face_interpolated",
               "face_absent", "shots", "warnings", "subtitle", "subtitle_from", "asr_text", "asr_language",
               "reasoning", "error")


def write_predictions(results: Sequence[Prediction], path: str | Path, labels: Sequence[str]) -> Path:
    """``path``: ``.csv`` (one row a clip, a column per label's probability) or ``.jsonl`` (``to_dict``)."""
    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".csv", ".jsonl"):
        raise EvalError(f"--out {path}: write a .csv or a .jsonl file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        if kind == ".jsonl":
            for r in results:
                f.write(json.dumps(r.to_dict()) + "\n")
        else:
            w = csv.writer(f)
            w.writerow(list(CSV_COLUMNS) + [f"p_{l}" for l in labels])
            for r in results:
                fi = r.face
                probs = r.probabilities or {}
                w.writerow([r.file, r.id, r.label or "", f"{max(probs.values()):.6f}" if probs else "",
                            "" if fi is None else int(fi.found),
                            *("" if fi is None or v is None else f"{v:.4f}"
                              for v in ((fi.detected, fi.interpolated, fi.absent) if fi else (None,) * 3)),
                            "" if fi is None or fi.shots is None else fi.shots, " | ".join(r.warnings),
                            r.subtitle or "", r.subtitle_from or "", r.asr_text or "", r.asr_language or "",
                            r.reasoning or "", r.error or ""]
                           + [f"{probs[l]:.6f}" if l in probs else "" for l in labels])
    os.replace(tmp, path)
    return path

