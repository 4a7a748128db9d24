"""Subtitles for eval and infer: the clips' own, else (or instead) the ASR text set, extracted where missing.

``run_subtitles(run, stores, clips, ...)`` gives the clips with the subtitle their prompts get, chosen by
``train.subtitles.choose`` under the run's ``data.subtitles`` (or ``source``) exactly as training chose:

1. the text set: ``asr_set`` (a name or key), else the one the run trained with (``<run>/subtitles.json``),
   else ``data.asr_set``, else the one text set of the run's store and eval store;
2. its clips missing from both stores are transcribed into the eval store (only Whisper runs: the run's
   other sets are not touched, ``run_extract(views=("asr",))``) when a text set with recorded settings
   exists and ``extract``, or when ``asr`` asks for it (then, with no text set yet, with the settings of the
   run's feature sets and ``[extract.asr]``'s defaults, or ``task`` / ``language``);
3. each clip's ``meta`` records ``subtitle_from`` ("dataset" | "asr" | None), ``asr_text`` and
   ``asr_language``, which infer prints.

A text set that records no extraction settings (imported) is read, never extended.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

from emollama.corpora import Clip
from emollama.extract.asr import ASR_VIEW, WhisperAsr
from emollama.pipeline.features import EvalError, EvalStores, default_extraction, extraction_config, guarded_extract
from emollama.train.subtitles import REPORT_FILE, SOURCES, SubtitleReport, apply_subtitles, find_text_set, read_asr

log = logging.getLogger(__name__)

ASR_SET = f"{ASR_VIEW}.{WhisperAsr.name}.text"     # the name of the text set `--asr` makes


def trained_text_set(run) -> str | None:
    """The text set the run trained with (its ``subtitles.json``), or None."""
    try:
        return json.loads((Path(run.path) / REPORT_FILE).read_text()).get("asr_set") or None
    except (OSError, ValueError, AttributeError):
        return None


def _recorded(store, key: str) -> dict | None:
    return (store.set_attrs(key).get("config") or {}).get("extract") if store is not None else None


def asr_config(run, stores: EvalStores, key: str | None, *, task: str | None, language: str | None,
               dataset: str, root, workers: int):
    """The extraction config of the text set: the settings that made ``key`` when it records them (and no
    task / language asks for another), else the settings of the run's feature sets with ASR enabled."""
    cache = stores.cache()
    holder = next((s for s in (stores.train, cache) if s is not None and key in s.sets()), None) if key else None
    kw = dict(dataset=dataset, root=root, workers=workers, target=stores.cache_url,
              target_options=stores.cache_options)
    if holder is not None and _recorded(holder, key) and task is None and language is None:
        return extraction_config(holder, [key], **kw)
    reader = stores.reader
    made = [k for k in run.feature_keys if reader is not None and k in reader.sets() and _recorded(reader, k)]
    cfg = extraction_config(reader, made, **kw) if made else default_extraction(
        run, stores.cache_url, dataset=dataset, root=root, workers=workers, target_options=stores.cache_options)
    asr = replace(cfg.extract.asr, enabled=True, **({"task": task} if task else {}),
                  **({"language": language} if language else {}))
    cfg.extract = replace(cfg.extract, asr=asr)
    if problems := cfg.extract.problems():
        raise EvalError("; ".join(problems))
    return cfg


def run_subtitles(run, stores: EvalStores, clips: Sequence[Clip], *, source: str | None = None, asr: bool = False,
                  asr_set: str | None = None, task: str | None = None, language: str | None = None,
                  extract: bool = True, workers: int = 0, progress: bool = False, dataset: str = "folder",
                  root: str | Path = ".", offline: bool | None = None,
                  say: Callable[[str], None] = log.info) -> tuple[list[Clip], SubtitleReport]:
    """``clips`` with their chosen subtitles, and what was chosen (see the module docstring)."""
    from emollama.pipeline.extraction import SettingsChanged, run_extract

    source = source or run.config.data.subtitles
    if source not in SOURCES:
        raise EvalError(f"--subtitle-source {source}: choose one of {', '.join(SOURCES)}")
    report = SubtitleReport(source)
    if source == "dataset":
        return apply_subtitles(clips, {}, source, report)
    wanted = asr_set or trained_text_set(run) or run.config.data.asr_set
    try:
        key = find_text_set([stores.train, stores.cache()], wanted)
    except ValueError as e:
        raise EvalError(str(e)) from None
    ids = [c.id for c in clips]
    holders = [s for s in (stores.train, stores.cache()) if key is not None and s is not None and key in s.sets()]
    have = set(ids) & set().union(*(s.complete(key) for s in holders))     # clips the text set holds
    holder_made = any(_recorded(s, key) for s in holders)
    if (asr or task or language or (extract and holder_made)) and (key is None or task or language
                                                                  or len(have) < len(set(ids))):
        cfg = asr_config(run, stores, key, task=task, language=language, dataset=dataset, root=root, workers=workers)
        if offline is not None:
            cfg.extract = replace(cfg.extract, offline=offline)
        todo = [c for c in clips if c.id not in have] if key is not None and not (task or language) else list(clips)
        expect = [key] if key and not (task or language) else None
        summary = guarded_extract(stores, lambda: run_extract(cfg, progress=progress, clips=todo, views=(ASR_VIEW,),
                                                   expect_keys=expect), SettingsChanged)
        key = summary.keys.get(ASR_SET, key)
        if summary.ok:
            say(f"transcribed {len(summary.ok)} clip(s) into {stores.cache_url} ({key})")
        if summary.failed:
            say(f"speech recognition failed for {len(summary.failed)} clip(s): {summary.failed[:3]}")
    elif key is None and source == "asr":
        raise EvalError("subtitles = 'asr', but neither the run's store nor its eval store holds an ASR text set: "
                        "pass --asr to transcribe the clips, or --subtitle-source dataset")
    if key is not None:
        report.use(next(s for s in (stores.train, stores.cache()) if s is not None and key in s.sets()), key)
    out, report = apply_subtitles(clips, read_asr([stores.train, stores.cache()], key, ids), source, report)
    if key is not None:
        say(report.line())
    return out, report


def eval_subtitles(run, stores: EvalStores, clips: Sequence[Clip], opts, dataset: str, root: str | Path,
                   say: Callable[[str], None] = log.info) -> tuple[list[Clip], SubtitleReport]:
    """``run_subtitles`` for an evaluation of clips of ``dataset`` under ``root`` with the options of ``opts``
    (``subtitles``, ``asr``, ``asr_set``, ``extract``, ``workers``, ``progress``, ``offline``): eval, its EMER
    reasons and its robustness conditions."""
    from emollama.corpora import ADAPTERS

    return run_subtitles(run, stores, clips, source=opts.subtitles, asr=opts.asr, asr_set=opts.asr_set,
                         extract=opts.extract, workers=opts.workers, progress=opts.progress,
                         dataset=dataset if dataset in ADAPTERS else "folder", root=root,
                         offline=opts.offline, say=say)
