"""Evaluation of a run: labelled clips of any dataset in, metrics and a report in the run folder out.

- ``evaluate(opts)``: any registered dataset (``emollama datasets``: MER2023, MERR, DFEW per fold or all
  five, a folder of your own videos with a labels CSV, ...). Labels three ways (``pipeline.scores``): the
  closed set (the likelihood of each label after the emotion prompt, always in the set), the generated
  answer parsed (answers naming no label are counted and listed, never turned into a class) and the public
  scorer on that answer (last word; anything outside the labels counts as neutral), for comparing with
  published numbers. With ``opts.conditions``, the same clips under each robustness condition
  (``pipeline.conditions``: modalities dropped, audio noise, faces blurred, subtitle removed).
- ``evaluate_emer(opts)``: reasoning texts generated with the ``reason`` instruction, scored against
  the EMER references by an LLM judge (``train.emer``) or, with none configured, the lexical proxy.

The features come as ``pipeline.features`` gives them: the run's store (read only), clips missing from it
extracted with the run's own settings into its eval store. The dataset, its folder and options default to
the run's (``config.json``). Each evaluation writes one report folder, ``<run>/eval/<name>`` (``--out DIR``
instead of ``<run>/eval``): ``name`` is the dataset, its fold, and the split, layout and clip limit where
they are not the defaults, so a quick ``--limit 3`` never replaces a full report. The scope of a report
(dataset, data, split, fold, limit, labels, label map, layout) is in its ``metrics.json``; a folder that
holds a report of another scope is refused unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from emollama.corpora import ADAPTERS, Clip, Corpus, EmerOptions, get_adapter, load_corpus, read_emer
from emollama.pipeline.features import (EvalError, EvalStorageError, EvalStores, ExtractReport, extract_for_eval,
                                        extract_missing, feature_batcher, features_profile, run_stores)
from emollama.pipeline.conditions import evaluate_conditions
from emollama.pipeline.subtitles import eval_subtitles
from emollama.pipeline.scores import candidates, parse_label_map, score_clips, target_probabilities
from emollama.train.runfolder import lock

log = logging.getLogger(__name__)

__all__ = ["EvalError", "EvalStorageError", "EvalOptions", "evaluate", "evaluate_corpus", "evaluate_emer",
           "parse_label_map", "candidates", "target_probabilities", "target_labels", "check_layout"]

ALL = "all"   # --split all: every labelled clip of the corpus


def check_layout(run, layout: str) -> None:
    from emollama.train.prompt import check_style

    try:
        check_style(run.config.data.prompt, layout)
    except ValueError as e:
        raise EvalError(f"--layout {layout}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Classification evaluation


@dataclass
class EvalOptions:
    run: str
    dataset: str | None = None               # default: the run's (config.json data.dataset)
    data: str | None = None                  # default: the run's data.root
    store: str | None = None
    split: str | None = None                 # default: test where the corpus has it, else every labelled clip
    fold: int | None = None
    limit: int | None = None
    options: dict[str, Any] | None = None    # the dataset's options (--option, --labels-csv); default: the run's
    labels: list[str] | None = None          # the evaluated label set (default: see target_labels)
    label_map: list[str] = field(default_factory=list)
    max_new_tokens: int = 16
    reason_tokens: int = 96
    batch_size: int = 8
    workers: int = 0
    extract: bool = True
    out: str | None = None
    overwrite: bool = False                  # replace a report of another scope in the report folder
    device: str = "auto"
    progress: bool = False
    generate: bool = True
    judge_url: str | None = None
    judge_model: str | None = None
    judge_key: str | None = None
    layout: str = "trained"                  # trained | public-eval (the public evaluation script's layout)
    features: list[str] = field(default_factory=list)   # ROLE=SET bindings for imported runs
    cache_store: str | None = None           # the eval store for clips missing from the training store
    missing_audio: str | None = None         # a clip without sound: fail | silence | auto (default: as recorded)
    offline: bool | None = None              # models from local files only (None: HF_HUB_OFFLINE decides)
    conditions: list[str] | None = None      # a robustness report: these conditions ([]: the default ones)
    subtitles: str | None = None             # dataset | asr | dataset-then-asr (default: the run's data.subtitles)
    asr: bool = False                        # transcribe clips missing from the ASR text set (pipeline.subtitles)
    asr_set: str | None = None               # the ASR text set to read (default: the run's, else the store's one)


def target_labels(corpus: Corpus, clips: Sequence[Clip], run_labels: Sequence[str]) -> list[str]:
    """The benchmarks' fixed label sets (MER2023: 6; DFEW: 7, disgust and fear included, whatever the run
    was trained on: zero-shot through the closed set); for MERR and folders, the corpus labels the run
    knows or the evaluated clips carry, in the corpus's order."""
    if corpus.name in ADAPTERS and ADAPTERS[corpus.name].fixed_labels:
        return list(corpus.labels)
    seen = {c.label for c in clips if c.label}
    return [l for l in corpus.labels if l in set(run_labels) | seen]


def with_run_dataset(opts: EvalOptions, run) -> EvalOptions:
    """``opts`` with the dataset, its folder and its options taken from the run's config where not given
    (the options only when the dataset is the run's)."""
    d = run.config.data
    dataset = opts.dataset or d.dataset
    data = opts.data or (d.root if dataset == d.dataset else None)
    if not data:
        raise EvalError(f"--data is needed: the run {run.path} records no data folder for the {dataset} dataset "
                        "(pass --dataset NAME --data DIR)")
    options = opts.options if opts.options is not None else (dict(d.options) if dataset == d.dataset else {})
    return replace(opts, dataset=dataset, data=str(data), options=dict(options or {}))


def default_split(corpus: Corpus) -> str:
    """``test`` where the corpus has that split, else ``all`` (a folder of one's own videos has no split)."""
    return "test" if "test" in corpus.splits() else ALL


def report_name(opts: EvalOptions, corpus_name: str, split: str, default: str) -> str:
    """The report folder's name: the dataset, its fold, and the split, layout and limit where not the defaults."""
    name = corpus_name + (f"-fold{opts.fold}" if opts.fold else "")
    if split != default:
        name += f"-{split}"
    if opts.layout != "trained":
        name += f"-{opts.layout}"
    if opts.limit:
        name += f"-first{opts.limit}"
    if opts.conditions is not None:
        name += "-conditions"
    return name


def report_dir(run, opts: EvalOptions, name: str) -> Path:
    return Path(opts.out) / name if opts.out else run.path / "eval" / name


def scope_of(opts: EvalOptions, split: str | None, labels: Sequence[str] | None = None,
             label_map: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What a report is about: which clips, which labels, which prompt layout."""
    return {"dataset": opts.dataset, "data": str(Path(opts.data).resolve()) if opts.data else None,
            "options": dict(opts.options or {}), "split": split, "fold": opts.fold, "limit": opts.limit,
            "labels": list(labels) if labels is not None else None, "label_map": dict(label_map or {}),
            "layout": opts.layout, **({"conditions": list(opts.conditions)} if opts.conditions is not None else {})}


def claim_report_dir(out: Path, scope: Mapping[str, Any], overwrite: bool) -> None:
    """Refuse a report folder that holds the report of another scope (unless ``overwrite``); a report of the
    same scope is replaced (a rerun)."""
    m = out / "metrics.json"
    if not m.is_file() or overwrite:
        return
    try:
        old = json.loads(m.read_text()).get("scope")
    except (OSError, ValueError):
        old = None
    if old == json.loads(json.dumps(scope)):
        return
    if old is None:
        what = "a report this version cannot compare (no recorded scope)"
    else:
        diff = sorted(k for k in set(old) | set(scope) if old.get(k) != scope.get(k))
        what = "the report of another evaluation (" + ", ".join(f"{k} {old.get(k)!r}" for k in diff) + ")"
    raise EvalError(f"{out} holds {what}: this one would replace it. Pass --out DIR to write this one elsewhere, "
                    "or --overwrite to replace it")


@contextlib.contextmanager
def report_lock(out: Path, scope: Mapping[str, Any], overwrite: bool):
    """The report folder ``out``, locked (``train.runfolder.lock``: a second eval into it gets exit 5) and
    claimed for ``scope`` (``claim_report_dir``) while the block writes it; left empty, it is removed (``lock``)."""
    with lock(out, "emollama eval"):
        claim_report_dir(out, scope, overwrite)
        yield out


def evaluate_corpus(run, stores: EvalStores, corpus: Corpus, opts: EvalOptions, *,
                    say: Callable[[str], None] = log.info) -> dict:
    """One evaluation (one dataset, split and fold); writes the report (its folder locked meanwhile:
    a second eval into it gets ``RunFolderBusy``) and returns the result."""
    t0 = time.perf_counter()
    default = default_split(corpus)
    split = opts.split or default
    pool = corpus.clips if split == ALL else corpus.split(split)
    clips = [c for c in pool if c.label]
    if not clips:
        have = ", ".join(f"{k} ({v})" for k, v in corpus.splits().items())
        labelled = sum(1 for c in corpus.clips if c.label)
        hint = ("pass --labels-csv FILE (name,label[,sentence,split])" if not labelled else
                f"pass --split with one of: {have}, or all")
        raise EvalError(f"the {split!r} split of {corpus.root} has no labelled clips ({labelled} of "
                        f"{len(corpus.clips)} clips have a label): {hint}")
    if opts.limit:
        clips = clips[:opts.limit]
    targets = [l.strip().lower() for l in opts.labels] if opts.labels else target_labels(corpus, clips, run.labels)
    outside = sorted({c.label for c in clips} - set(targets))
    if outside:
        say(f"clips labelled {outside} are outside --labels and are not evaluated")
        clips = [c for c in clips if c.label in targets]
    label_map = parse_label_map(opts.label_map, targets)
    out = report_dir(run, opts, report_name(opts, corpus.name, split, default))
    scope = scope_of(opts, split, targets, label_map)
    with report_lock(out, scope, opts.overwrite):
        if opts.conditions is not None:
            return evaluate_conditions(run, stores, corpus, opts, clips, split, targets, label_map, out, scope, say, t0)
        return _evaluate_clips(run, stores, corpus, opts, clips, split, targets, label_map, out, scope, say, t0)


def _evaluate_clips(run, stores: EvalStores, corpus: Corpus, opts: EvalOptions, clips: list[Clip], split: str,
                    targets: list[str], label_map: dict[str, str], out: Path, scope: dict, say, t0: float) -> dict:
    from emollama.train.report import write_report
    from emollama.train.tiny import TINY_WARNING

    cands = candidates(targets, label_map)
    rep = ExtractReport(reused=len(clips))
    if opts.extract:
        rep = extract_for_eval(stores, run, clips, corpus, opts, say)
    clips, subtitles = eval_subtitles(run, stores, clips, opts, corpus.name, corpus.root, say)
    batcher, usable, missing = feature_batcher(run, stores, clips)
    if not usable:
        why = ('extraction failed: ' + str(rep.failed[:3]) if rep.failed else
               'missing from imported sets: ' + str({k: v[:3] for k, v in rep.not_extractable.items()})
               if rep.not_extractable else 'run without --no-extract')
        raise EvalError(f"none of the {len(clips)} clips has features in every set of the run ({why})")
    ids = [c.id for c in usable]
    truth = [c.label for c in usable]
    sc = score_clips(run, run.prompt_encoder(targets, opts.layout), batcher, usable, targets, label_map,
                     batch_size=opts.batch_size, generate_tokens=opts.max_new_tokens if opts.generate else None)
    probs, closed, answers, parsed, public = sc.probs, sc.closed, sc.answers, sc.parsed, sc.public
    methods = sc.metrics(truth, targets, ids)
    result: dict[str, Any] = {
        "dataset": corpus.name, "split": split, "fold": opts.fold, "scope": scope,
        "run": str(run.path), "step": run.step, "profile": run.config.model.profile, "tiny": run.tiny,
        "feature_profile": features_profile(stores, run.feature_keys),
        "note": TINY_WARNING if run.tiny else None, "labels": targets, "train_labels": run.labels,
        "zero_shot": set(targets) != set(run.labels), "label_map": label_map, "candidates": cands,
        "n": len(usable), "missing": missing, "extraction": {"extracted": len(rep.extracted), "reused": rep.reused,
                                                              "failed": rep.failed,
                                                              "not_in_imported_sets": rep.not_extractable,
                                                              "eval_store": stores.cache_url},
        "prompt": run.config.data.prompt, "layout": opts.layout,
        "feature_sets": {run.specs[k].name: k for k in run.feature_keys},
        "max_new_tokens": opts.max_new_tokens, "subtitles": subtitles.to_dict(),
        **methods,
    }
    result["seconds"] = {"extract": round(rep.seconds, 3), "closed_set": round(sc.seconds["closed_set"], 3),
                         "generate": round(sc.seconds["generate"], 3), "total": round(time.perf_counter() - t0, 3)}
    preds = [{"id": cid, "label": t, "closed_set": c, "probabilities": dict(zip(targets, map(float, pr))),
              "answer": answers[i] if answers else None, "parsed": parsed[i] if parsed else None,
              "public": public[i] if public else None}
             for i, (cid, t, c, pr) in enumerate(zip(ids, truth, closed, probs))]
    return write_report(result, out, preds)


def _load(opts: EvalOptions, run):
    """The run (loaded unless given) and its stores."""
    from emollama.train.run import load_run

    run = run or load_run(opts.run, device=opts.device)
    check_layout(run, opts.layout)
    return run, run_stores(run, opts.store, opts.cache_store, opts.features, log.info)


def evaluate(opts: EvalOptions, *, say: Callable[[str], None] = log.info, run=None) -> dict:
    """``emollama eval``: any registered dataset (DFEW: one fold, or all five with ``fold=None``)."""
    from emollama.train.checkpoint import write_json
    from emollama.train.report import fold_lines, fold_markdown, fold_summary, summary_lines
    from emollama.train.tiny import TINY_WARNING

    if opts.dataset == "emer":
        return evaluate_emer(opts, say=say, run=run)
    if opts.dataset is not None:
        get_adapter(opts.dataset)                   # an unknown name fails before the run is loaded
    run, stores = _load(opts, run)
    opts = with_run_dataset(opts, run)
    if opts.dataset == "emer":
        return evaluate_emer(opts, say=say, run=run)
    adapter = get_adapter(opts.dataset)
    options = dict(opts.options or {})
    if not adapter.folds:
        if opts.fold:
            raise EvalError(f"--fold and --all-folds are for --dataset {' | '.join(ADAPTERS.with_folds())}")
        res = evaluate_corpus(run, stores, load_corpus(opts.dataset, opts.data, **options), opts, say=say)
        for line in summary_lines(res) if opts.conditions is None else ():
            say(line)
        return res
    options.pop("fold", None)
    if opts.conditions is not None and not opts.fold:
        raise EvalError("--conditions scores one fold: pass --fold K (1-5), not --all-folds")
    folds = [opts.fold] if opts.fold else list(adapter.folds)
    results = {}
    for k in folds:
        o = replace(opts, fold=k)
        results[k] = evaluate_corpus(run, stores, load_corpus(adapter.name, opts.data, fold=k, **options), o, say=say)
        for line in summary_lines(results[k]) if opts.conditions is None else ():
            say(line)
    if len(folds) == 1:
        return results[folds[0]]
    summary = fold_summary(results)
    note = TINY_WARNING if run.tiny else None
    out = report_dir(run, opts, report_name(replace(opts, fold=None), adapter.name, opts.split or "test", "test"))
    scope = scope_of(replace(opts, fold=None), opts.split, None, None)
    summary.update(dataset=adapter.name, run=str(run.path), note=note, tiny=run.tiny, out_dir=str(out), scope=scope)
    with report_lock(out, scope, opts.overwrite):
        write_json(out / "metrics.json", summary, sort_keys=False)
        (out / "report.md").write_text(fold_markdown(summary, str(run.path), note))
    for line in fold_lines(summary, note):
        say(line)
    return summary


# ---------------------------------------------------------------------------------------------
# EMER


def evaluate_emer(opts: EvalOptions, *, say: Callable[[str], None] = log.info, run=None) -> dict:
    """Reason texts for the EMER clips, scored by the judge (or the lexical proxy, named so)."""
    if not opts.data:
        raise EvalError("--data is needed for --dataset emer: the EMER CSV (name,chinese,english) or its folder")
    run, stores = _load(opts, run)
    emer = read_emer(opts.data, options=EmerOptions(limit=opts.limit))
    clips, refs, absent, video_dir = emer.clips, emer.references(), emer.absent, emer.video_dir
    out = report_dir(run, opts, "emer" + (f"-{opts.layout}" if opts.layout != "trained" else "")
                     + (f"-first{opts.limit}" if opts.limit else ""))
    scope = scope_of(replace(opts, dataset="emer"), "emer")
    with report_lock(out, scope, opts.overwrite):
        return _evaluate_emer(run, stores, opts, emer, out, scope, say)


def _evaluate_emer(run, stores: EvalStores, opts: EvalOptions, emer, out: Path, scope: dict, say) -> dict:
    from emollama.train.checkpoint import write_json
    from emollama.train.emer import Judge, JudgeConfig, score_emer
    from emollama.train.generate import generate
    from emollama.train.report import report_markdown
    from emollama.train.tiny import TINY_WARNING

    clips, refs, absent, video_dir = emer.clips, emer.references(), emer.absent, emer.video_dir
    t0 = time.perf_counter()
    if opts.extract:
        todo = [c for c in clips if c.id not in absent]
        extract_missing(stores, run.feature_keys, todo, run=run, workers=opts.workers, progress=opts.progress,
                        root=video_dir, missing_audio=opts.missing_audio, offline=opts.offline, say=say)
    clips, _ = eval_subtitles(run, stores, clips, opts, "folder", video_dir, say)
    batcher, usable, missing = feature_batcher(run, stores, clips)
    if not usable:
        raise EvalError(f"none of the {len(clips)} EMER clips has features (videos not found: {absent[:5]})")
    texts = generate(run.model, run.prompt_encoder(run.labels, opts.layout), batcher, usable, "reason",
                     max_new_tokens=opts.reason_tokens, batch_size=opts.batch_size, device=run.device)
    out.mkdir(parents=True, exist_ok=True)
    cfg = JudgeConfig.from_env(base_url=opts.judge_url, model=opts.judge_model, api_key=opts.judge_key,
                               cache=out / "judge-cache.jsonl")
    judge = Judge(cfg) if cfg.configured else None
    ids = [c.id for c in usable]
    scores = score_emer(ids, texts, [refs[i] for i in ids], judge)
    for row, text in zip(scores["rows"], texts):
        row["prediction"], row["reference"] = text, refs[row["id"]]
    result = {"dataset": "emer", "split": "emer", "fold": None, "scope": scope, "run": str(run.path),
              "step": run.step, "profile": run.config.model.profile, "tiny": run.tiny,
              "feature_profile": features_profile(stores, run.feature_keys),
              "note": TINY_WARNING if run.tiny else None, "n": len(usable), "missing": missing, "labels": run.labels,
              "max_new_tokens": opts.reason_tokens, "emer": {k: v for k, v in scores.items() if k != "rows"},
              "proxy": judge is None, "seconds": {"total": round(time.perf_counter() - t0, 3)}, "out_dir": str(out),
              "files": ["metrics.json", "report.md", "emer-rows.jsonl"] + (["judge-cache.jsonl"] if judge else [])}
    with open(out / "emer-rows.jsonl", "w") as f:
        for row in scores["rows"]:
            f.write(json.dumps(row) + "\n")
    write_json(out / "metrics.json", result, sort_keys=False)
    (out / "report.md").write_text(report_markdown(result))
    for line in emer_lines(result):
        say(line)
    return result


def emer_lines(result: Mapping[str, Any]) -> list[str]:
    e = result["emer"]
    f = lambda x: "-" if x is None else f"{x:.3f}"   # noqa: E731
    lines = ["NOTE: " + result["note"]] if result.get("note") else []
    lines.append(f"EMER: n={e['n']} scored by {e['method']}"
                 + (" (an offline lexical proxy, not the EMER judge metric)" if e["method"] == "lexical-proxy" else ""))
    lines.append(f"Clue Overlap {f(e['clue_overlap'])}   Label Overlap {f(e['label_overlap'])}   "
                 f"invalid judgements {len(e['invalid'])}   judge requests {e['requests']}")
    if result.get("missing"):
        lines.append(f"no features (video not found or extraction failed): {', '.join(result['missing'][:5])}")
    lines.append(f"report: {Path(result['out_dir']) / 'report.md'}")
    return lines
