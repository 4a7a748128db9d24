"""Evaluation and inference of a trained run: features from the store (missing clips extracted first
with exactly the settings that made the run's feature sets), labels two ways, reports in the run folder.

- ``evaluate(opts)``: MER2023 / MERR / DFEW (per fold or all folds). Labels from the closed set
  (``train.evaluate.score_labels``: the likelihood of each label after the emotion prompt, always in
  the set) and from the generated answer (``train.scoring.parse_label``: answers naming no label are
  counted and listed, never turned into a class). Writes ``<run>/eval/<dataset>[-fold<k>]/``.
- ``evaluate_emer(opts)``: reasoning texts generated with the ``reason`` instruction, scored against
  the EMER references by an LLM judge (``train.emer``) or, with none configured, the lexical proxy.
- ``infer(...)``: any video files; ids ``<stem>-<hash of the path>``; label, probability of every
  label (softmax of the closed-set log-likelihoods) and the reasoning text.

Each reads the same way: load the run (``train.run.load_run``), bind its feature sets to the store,
extract what is missing, then a feature batcher over the usable clips (``feature_batcher``) and the
run's prompt encoder (``run.prompt_encoder``), the two that training batches with, feed
``train.evaluate.score_labels`` and ``train.generate.generate``.

The extraction config is rebuilt from the store: every feature set records the resolved config that
made it (``FeatureStore.set_attrs(key)["config"]``). Before extracting, the rebuilt settings must
produce exactly the run's feature-set keys, or nothing is written.

The run's training store is never written. Clips missing from it are extracted into an eval store of
their own (``<run>/eval-store.zarr``, or ``--cache-store``), under the same set keys; features are read
per clip from the training store where the clip is complete there, else from the eval store
(``MergedFeatures``). A shared read-only training store therefore serves eval and infer as it is.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from emollama.pipeline.config import Config, load_config
from emollama.store import FeatureStore
from emollama.corpora import (ADAPTERS, Clip, Corpus, EmerOptions, clip_id_for, get_adapter, load_corpus,
                              read_emer)

log = logging.getLogger(__name__)



EVAL_STORE = "eval-store.zarr"      # <run>/eval-store.zarr: clips extracted for eval/infer (default)


class EvalError(ValueError):
    """A usage or consistency problem; the message says what to do."""


class EvalStorageError(EvalError):
    """The eval store cannot be written (read-only folder, disk full); nothing committed is lost."""


def _is_url(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


@dataclass
class EvalStores:
    """The run's training store (read only here) and the eval store that clips missing from it go into."""
    train: FeatureStore
    cache_url: str
    cache_options: dict | None = None

    def cache(self, *, create: bool = False) -> FeatureStore | None:
        """The eval store; None when it does not exist yet (and ``create`` is False)."""
        try:
            return FeatureStore.open(self.cache_url, create=create, storage_options=self.cache_options or None)
        except FileNotFoundError:
            if create:
                raise
            return None


def eval_stores(run, store: FeatureStore, cache_store: str | None = None) -> EvalStores:
    """``store`` (the run's, read only) and the eval store: ``cache_store``, default ``<run>/eval-store.zarr``."""
    url = str(cache_store) if cache_store else str(Path(run.path) / EVAL_STORE)
    same = (url.rstrip("/") == store.url.rstrip("/")) if _is_url(url) or _is_url(store.url) else \
        Path(url.removeprefix("file://")).expanduser().resolve() == Path(store.url).resolve()
    if same:
        raise EvalError(f"--cache-store {url} is the training store; eval and infer never write into it: "
                        "name another folder (default: <run>/eval-store.zarr)")
    return EvalStores(store, url, store.storage_options if _is_url(url) and _is_url(store.url) else None)


# ---------------------------------------------------------------------------------------------
# Extraction with the run's settings


def extraction_config(store: FeatureStore, keys: Sequence[str], *, dataset: str = "folder", root: str | Path = ".",
                      workers: int = 0, target: str | None = None, target_options: dict | None = None) -> Config:
    """The stage-one config that made ``keys`` (read from ``store``), writing into ``target`` (default:
    ``store``), in-process unless ``workers``."""
    from emollama.pipeline.config import ConfigError, job_settings   # the runtime fields: by their kind

    recorded: list[tuple[str, dict, dict]] = []
    for k in keys:
        cfg = (store.set_attrs(k).get("config") or {}).get("extract")
        if not cfg:
            raise EvalError(f"feature set {k} in {store.url} records no extraction config (imported with "
                            "`store import`?): extract the missing clips yourself with the settings that made it")
        faces = cfg.get("faces") if isinstance(cfg.get("faces"), dict) else {}
        if "detect_on" not in faces:   # recorded before the setting existed: every such set detected clip by clip
            cfg = {**cfg, "faces": {**faces, "detect_on": "prep"}}
        try:
            recorded.append((k, cfg, job_settings(cfg)))
        except ConfigError as e:
            raise EvalError(f"cannot rebuild the extraction config of {k} from the store: {e}") from None
    base = recorded[0][2]
    for k, _, other in recorded[1:]:
        if other != base:
            diff = sorted(n for n in set(base) | set(other) if base.get(n) != other.get(n))
            raise EvalError(f"the run's feature sets were made by different extraction settings ({recorded[0][0]} "
                            f"and {k} differ in {diff}); extract the missing clips yourself")
    ext = dict(base, store=target or store.url, workers=workers,
               storage_options=(target_options if target else store.storage_options) or {},
               device=recorded[0][1].get("device", "auto"), compact=False, preview=None)
    try:
        return load_config(None, {"dataset": {"kind": dataset, "root": str(root)}, "extract": ext})
    except ValueError as e:
        raise EvalError(f"cannot rebuild the extraction config from the store: {e}") from None


@dataclass
class ExtractReport:
    extracted: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    reused: int = 0
    seconds: float = 0.0
    not_extractable: dict[str, list[str]] = field(default_factory=dict)   # imported set name -> clips it lacks
    cache: str | None = None                 # the eval store the extracted clips went into


def _complete(st: FeatureStore | None, keys: Sequence[str]) -> set[str]:
    """Clips complete in every set of ``keys`` in ``st`` (none where a set is absent)."""
    if st is None or not keys:
        return set()
    have = st.sets()
    if any(k not in have for k in keys):
        return set()
    return set.intersection(*(st.complete(k) for k in keys))


def extract_missing(stores: EvalStores | FeatureStore, keys: Sequence[str], clips: Sequence[Clip], *,
                    workers: int = 0, progress: bool = False, dataset: str = "folder",
                    root: str | Path = ".") -> ExtractReport:
    """Extract the clips complete neither in the training store nor in the eval store, with the settings
    that made ``keys``, into the eval store (``stores.cache_url``); the training store is only read.

    Sets that record no extraction config (imported, e.g. the released MER2023 features) are never
    re-extracted with other encoders: the clips they lack are reported by name in ``not_extractable``."""
    from emollama.pipeline.extraction import SettingsChanged, run_extract

    if isinstance(stores, FeatureStore):
        raise TypeError("extract_missing takes EvalStores (the training store is never written): use eval_stores()")
    store = stores.train
    store.refresh()
    made = [k for k in keys if (store.set_attrs(k).get("config") or {}).get("extract")]
    imported = [k for k in keys if k not in made]
    cache = stores.cache()
    complete = set.intersection(*(store.complete(k) for k in keys))
    complete_made = _complete(store, made) | _complete(cache, made)
    in_imported = _complete(store, imported) if imported else None
    rep = ExtractReport(reused=len([c for c in clips if c.id in complete or (
        c.id in complete_made and (in_imported is None or c.id in in_imported))]))
    sets = store.sets()
    for k in imported:
        have = store.complete(k)
        lacking = [c.id for c in clips if c.id not in have]
        if lacking:
            rep.not_extractable[sets[k].name] = lacking
            log.warning("%d clip(s) are missing from the imported set %s and are not extracted (it records no "
                        "extraction settings): %s", len(lacking), sets[k].name, ", ".join(lacking[:10]))
    blocked = {cid for ids in rep.not_extractable.values() for cid in ids}
    if not made:
        return rep
    todo = [c for c in clips if c.id not in complete_made and c.id not in blocked]
    if not todo:
        return rep
    cfg = extraction_config(store, made, dataset=dataset, root=root, workers=workers, target=stores.cache_url,
                            target_options=stores.cache_options)
    try:
        stores.cache(create=True)
    except (FileExistsError, ValueError) as e:
        raise EvalError(f"--cache-store: {e}") from None
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise EvalStorageError(f"cannot create the eval store {stores.cache_url} ({why}); the training store "
                               f"{store.url} is only read: pass --cache-store DIR on a writable disk") from None
    try:
        summary = run_extract(cfg, progress=progress, clips=todo, expect_keys=made)
    except SettingsChanged as e:
        raise EvalError(f"{store.url}: {e}") from None
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise EvalStorageError(f"cannot write the eval store {stores.cache_url} ({why}); the training store "
                               f"{store.url} is only read and nothing committed was lost: free space or pass "
                               "--cache-store DIR on a writable disk, then rerun") from None
    rep.extracted, rep.failed, rep.seconds = summary.ok, summary.failed, summary.wall
    rep.cache = stores.cache_url
    lost = sorted(set(made) - set(summary.keys.values()))
    if lost:    # run_extract checks expect_keys before writing; this is the same promise, kept here too
        raise EvalError(f"the eval store {stores.cache_url} got sets {sorted(summary.keys.values())}, not the "
                        f"run's {lost}")
    return rep


class MergedFeatures:
    """A ``store.FeatureDataset`` look-alike (``keys``, ``clip_ids``, ``__getitems__``) over two stores with
    the same set keys: a clip complete in every set of the training store is read from it; otherwise each
    set is read from the eval store where the clip is complete there, else from the training store (an
    imported set, which the eval store never holds)."""

    def __init__(self, train: FeatureStore, cache: FeatureStore | None, keys: Sequence[str],
                 clip_ids: Sequence[str]) -> None:
        from emollama.store import FeatureDataset

        self.keys = list(keys)
        self.clip_ids = list(clip_ids)
        full = _complete(train, self.keys)
        cache_sets = cache.sets() if cache is not None else {}
        # key -> [(dataset, {position in clip_ids: position in the dataset})]
        self._parts: dict[str, list[tuple[Any, dict[int, int]]]] = {}
        self.sources: dict[str, dict[str, str]] = {}       # clip -> key -> "train" | "eval"
        for k in self.keys:
            in_cache = cache.complete(k) if k in cache_sets else set()
            groups: dict[str, list[int]] = {"train": [], "eval": []}
            for i, c in enumerate(self.clip_ids):
                where = "eval" if c not in full and c in in_cache else "train"
                groups[where].append(i)
                self.sources.setdefault(c, {})[k] = where
            parts = []
            for where, idx in groups.items():
                if idx:
                    ds = FeatureDataset(train if where == "train" else cache, [k], [self.clip_ids[i] for i in idx])
                    parts.append((ds, {i: j for j, i in enumerate(idx)}))
            self._parts[k] = parts

    def __len__(self) -> int:
        return len(self.clip_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        indices = [int(i) for i in indices]
        items: list[dict[str, Any]] = [{"id": self.clip_ids[i]} for i in indices]
        for k in self.keys:
            for ds, local in self._parts[k]:
                mine = [n for n, i in enumerate(indices) if i in local]
                if not mine:
                    continue
                rows = ds.__getitems__([local[indices[n]] for n in mine])
                for n, row in zip(mine, rows):
                    items[n][k] = row[k]
        return items


# ---------------------------------------------------------------------------------------------
# Label sets, closed set, label mapping


def parse_label_map(items: Sequence[str], targets: Sequence[str]) -> dict[str, str]:
    """``FROM=TO`` items: the model's label FROM counts as the dataset's label TO."""
    out: dict[str, str] = {}
    for item in items:
        a, sep, b = item.partition("=")
        a, b = a.strip().lower(), b.strip().lower()
        if not sep or not a or not b:
            raise EvalError(f"--label-map {item!r}: expected FROM=TO (e.g. worried=fear)")
        if b not in targets:
            raise EvalError(f"--label-map {item!r}: {b!r} is not a label of the evaluated set {list(targets)}")
        out[a] = b
    return out


def candidates(targets: Sequence[str], label_map: Mapping[str, str]) -> list[str]:
    """The words scored after the prompt: the target labels, then the mapped model labels."""
    return list(targets) + [a for a in label_map if a not in targets]


def target_probabilities(logp: np.ndarray, cands: Sequence[str], targets: Sequence[str],
                         label_map: Mapping[str, str]) -> np.ndarray:
    """[N, len(targets)]: softmax over the candidates' log-likelihoods, summed into their targets."""
    if logp.size == 0:
        return np.zeros((logp.shape[0], len(targets)))
    z = logp - logp.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    out = np.zeros((logp.shape[0], len(targets)))
    index = {t: i for i, t in enumerate(targets)}
    for j, c in enumerate(cands):
        out[:, index[label_map.get(c, c)]] += p[:, j]
    return out


# ---------------------------------------------------------------------------------------------
# Data for a set of clips


def feature_batcher(run, store: FeatureStore | EvalStores, clips: Sequence[Clip]):
    """(a ``train.data.FeatureBatcher`` over the clips complete in every set of the run, those clips, the
    ids of the others). With ``EvalStores``, each clip is read from the training store where it is
    complete there, else from the eval store (``MergedFeatures``)."""
    from emollama.train.data import FeatureBatcher

    keys = run.feature_keys
    if isinstance(store, EvalStores):
        train, cache = store.train, store.cache()
        cache_sets = cache.sets() if cache is not None else {}
        per_key = [store.train.complete(k) | (cache.complete(k) if k in cache_sets else set()) for k in keys]
        complete = set.intersection(*per_key)
    else:
        train, cache = store, None
        complete = set.intersection(*(store.complete(k) for k in keys))
    usable = [c for c in clips if c.id in complete]
    missing = [c.id for c in clips if c.id not in complete]
    if not usable:
        return None, [], missing
    if cache is None:
        return FeatureBatcher.from_store(train, keys, [c.id for c in usable]), usable, missing
    return FeatureBatcher(MergedFeatures(train, cache, keys, [c.id for c in usable])), usable, missing


def open_store(run, store_url: str | None) -> FeatureStore:
    url = store_url or run.store_url
    if not url:
        raise EvalError("the run records no feature store: pass --store PATH_OR_URL")
    return FeatureStore.open(url, create=False)


def check_layout(run, layout: str) -> None:
    from emollama.train.prompt import check_style

    try:
        check_style(run.config.data.prompt, layout)
    except ValueError as e:
        raise EvalError(f"--layout {layout}: {e}") from None


def parse_feature_choices(items: Sequence[str]) -> dict[str, str]:
    """``--feature ROLE=SET`` items (ROLE a modality or the run's set name; SET a store set name or key)."""
    out: dict[str, str] = {}
    for item in items:
        a, sep, b = item.partition("=")
        if not sep or not a.strip() or not b.strip():
            raise EvalError(f"--feature {item!r}: expected ROLE=SET, e.g. local=local.mae_340.released")
        out[a.strip()] = b.strip()
    return out


def bind_store(run, store: FeatureStore, choices: Mapping[str, str] | None = None,
               say: Callable[[str], None] = log.info) -> dict[str, str]:
    """Check that ``store`` has every set the run reads. A run imported from a released checkpoint
    binds each of its sets to the store's set of the same name, else to the store's one set of the same
    modality and shape (``choices`` = {modality or run set name: store set} decides where several could);
    returns {run key: store key} for the sets it bound."""
    have = store.sets()
    choices = dict(choices or {})
    lost, problems, keys, specs = [], [], {}, {}
    for k in run.feature_keys:
        want = run.specs[k]
        if k in have:
            continue
        if k not in run.bindable:
            lost.append(f"{want.name} ({k})")
            continue
        fits = lambda s: s.modality == want.modality and tuple(s.shape) == tuple(want.shape)   # noqa: E731
        pick = choices.get(want.modality) or choices.get(want.name)
        if pick:
            try:
                cands = [store.resolve(pick)]
            except KeyError as e:
                problems.append(f"--feature {want.modality}={pick}: {e.args[0]}")
                continue
            if not fits(have[cands[0]]):
                s = have[cands[0]]
                problems.append(f"--feature {want.modality}={pick}: that set is {s.modality} {list(s.shape)}, the run's "
                                f"{want.name} needs {want.modality} {list(want.shape)}")
                continue
        else:
            cands = sorted(kk for kk, s in have.items() if s.name == want.name and fits(s)) or \
                sorted(kk for kk, s in have.items() if fits(s))
        if len(cands) == 1:
            keys[k], specs[k] = cands[0], have[cands[0]]
        elif not cands:
            problems.append(f"no {want.modality} set of shape {list(want.shape)} for the run's {want.name} "
                            f"(extract it, or import the released features with `emollama store import`)")
        else:
            problems.append(f"several sets could feed the run's {want.name}: "
                            + ", ".join(have[c].name for c in cands)
                            + f"; choose one with --feature {want.modality}=NAME")
    if lost:
        raise EvalError(f"the store {store.url} has no feature set {lost} that the run {run.path} was trained on; "
                        "pass --store with the run's store (or one made with the same extraction settings)")
    if problems:
        raise EvalError(f"cannot bind the run {run.path} to the store {store.url}:\n"
                        + "\n".join(f"  - {p}" for p in problems))
    for k, kk in keys.items():
        say(f"the run's {run.specs[k].name} reads {have[kk].name} ({kk})")
    if keys:
        run.rebind(keys, specs)
    return keys


# ---------------------------------------------------------------------------------------------
# Classification evaluation


@dataclass
class EvalOptions:
    run: str
    dataset: str
    data: str
    store: str | None = None
    split: str = "test"
    fold: int | None = None
    limit: int | None = None
    labels: list[str] | None = None          # the evaluated label set (default: see target_labels)
    label_map: list[str] = field(default_factory=list)
    max_new_tokens: int = 16
    reason_tokens: int = 96
    batch_size: int = 8
    workers: int = 0
    extract: bool = True
    out: str | None = None
    device: str = "auto"
    progress: bool = False
    generate: bool = True
    judge_url: str | None = None
    judge_model: str | None = None
    judge_key: str | None = None
    layout: str = "trained"                  # trained | public-eval (the public evaluation script's layout)
    features: list[str] = field(default_factory=list)   # ROLE=SET bindings for imported runs
    cache_store: str | None = None           # the eval store for clips missing from the training store


def target_labels(corpus: Corpus, clips: Sequence[Clip], run_labels: Sequence[str]) -> list[str]:
    """The benchmarks' fixed label sets (MER2023: 6; DFEW: 7, disgust and fear included, whatever the run
    was trained on: zero-shot through the closed set); for MERR and folders, the corpus labels the run
    knows or the evaluated clips carry, in the corpus's order."""
    if corpus.name in ADAPTERS and ADAPTERS[corpus.name].fixed_labels:
        return list(corpus.labels)
    seen = {c.label for c in clips if c.label}
    return [l for l in corpus.labels if l in set(run_labels) | seen]


def _out_dir(run, opts: EvalOptions, name: str) -> Path:
    return Path(opts.out) / name if opts.out else run.path / "eval" / name


def evaluate_corpus(run, store: EvalStores | FeatureStore, corpus: Corpus, opts: EvalOptions, *,
                    say: Callable[[str], None] = log.info) -> dict:
    """One evaluation (one dataset, split and fold); writes the report and returns the result."""
    from emollama.train.evaluate import score_labels
    from emollama.train.generate import generate
    from emollama.train.report import write_report
    from emollama.train.tiny import TINY_WARNING
    from emollama.train.scoring import classification_metrics, parse_label, public_label

    t0 = time.perf_counter()
    clips = [c for c in corpus.split(opts.split) if c.label]
    if not clips:
        raise EvalError(f"the {opts.split!r} split of {corpus.root} has no labelled clips "
                        f"(splits: {corpus.splits()}); pass --split")
    if opts.limit:
        clips = clips[:opts.limit]
    targets = [l.strip().lower() for l in opts.labels] if opts.labels else target_labels(corpus, clips, run.labels)
    outside = sorted({c.label for c in clips} - set(targets))
    if outside:
        say(f"clips labelled {outside} are outside --labels and are not evaluated")
        clips = [c for c in clips if c.label in targets]
    label_map = parse_label_map(opts.label_map, targets)
    cands = candidates(targets, label_map)
    if isinstance(store, FeatureStore):
        store = eval_stores(run, store, opts.cache_store)
    rep = ExtractReport(reused=len(clips))
    if opts.extract:
        rep = extract_missing(store, run.feature_keys, clips, workers=opts.workers, progress=opts.progress,
                              dataset=corpus.name if corpus.name in ADAPTERS else "folder",
                              root=corpus.root)
        if rep.extracted:
            say(f"extracted {len(rep.extracted)} clip(s) missing from the training store into the eval store "
                f"{rep.cache} ({rep.seconds:.1f} s)")
    batcher, usable, missing = feature_batcher(run, store, clips)
    if not usable:
        why = ('extraction failed: ' + str(rep.failed[:3]) if rep.failed else
               'missing from imported sets: ' + str({k: v[:3] for k, v in rep.not_extractable.items()})
               if rep.not_extractable else 'run without --no-extract')
        raise EvalError(f"none of the {len(clips)} clips has features in every set of the run ({why})")
    ids = [c.id for c in usable]
    truth = [c.label for c in usable]
    t1 = time.perf_counter()
    prompts = run.prompt_encoder(targets, opts.layout)
    logp = score_labels(run.model, prompts, batcher, usable, cands, batch_size=opts.batch_size, device=run.device)
    probs = target_probabilities(logp, cands, targets, label_map)
    closed = [targets[i] for i in probs.argmax(1)]
    t2 = time.perf_counter()
    answers: list[str] = []
    parsed: list[str | None] = []
    public: list[str | None] = []
    if opts.generate:
        answers = generate(run.model, prompts, batcher, usable, "emotion", max_new_tokens=opts.max_new_tokens,
                           batch_size=opts.batch_size, device=run.device)
        for a in answers:
            p = parse_label(a, cands)
            parsed.append(label_map.get(p, p) if p is not None else None)
            w = public_label(a, cands)
            public.append(label_map.get(w, w) if w is not None else None)
    t3 = time.perf_counter()
    m_closed = classification_metrics(truth, closed, targets, ids=ids)
    result: dict[str, Any] = {
        "dataset": corpus.name if opts.dataset != "emer" else "emer", "split": opts.split, "fold": opts.fold,
        "run": str(run.path), "step": run.step, "profile": run.config.model.profile, "tiny": run.tiny,
        "note": TINY_WARNING if run.tiny else None, "labels": targets, "train_labels": run.labels,
        "zero_shot": set(targets) != set(run.labels), "label_map": label_map, "candidates": cands,
        "n": len(usable), "missing": missing, "extraction": {"extracted": len(rep.extracted), "reused": rep.reused,
                                                              "failed": rep.failed,
                                                              "not_in_imported_sets": rep.not_extractable,
                                                              "eval_store": store.cache_url},
        "prompt": run.config.data.prompt, "layout": opts.layout,
        "feature_sets": {run.specs[k].name: k for k in run.feature_keys},
        "max_new_tokens": opts.max_new_tokens,
        "closed_set": m_closed.to_dict(),
    }
    if opts.generate:
        m_gen = classification_metrics(truth, parsed, targets, ids=ids)
        raw = dict(zip(ids, answers))
        m_gen.unparsed = [(cid, raw[cid]) for cid, _ in m_gen.unparsed]
        result["generated"] = m_gen.to_dict()
        m_pub = classification_metrics(truth, public, targets, ids=ids)
        m_pub.unparsed = [(cid, raw[cid]) for cid, _ in m_pub.unparsed]
        result["public"] = m_pub.to_dict()
    result["seconds"] = {"extract": round(rep.seconds, 3), "closed_set": round(t2 - t1, 3),
                         "generate": round(t3 - t2, 3), "total": round(time.perf_counter() - t0, 3)}
    preds = [{"id": cid, "label": t, "closed_set": c, "probabilities": dict(zip(targets, map(float, pr))),
              "answer": answers[i] if answers else None, "parsed": parsed[i] if parsed else None,
              "public": public[i] if public else None}
             for i, (cid, t, c, pr) in enumerate(zip(ids, truth, closed, probs))]
    name = corpus.name + (f"-fold{opts.fold}" if opts.fold else "")
    return write_report(result, _out_dir(run, opts, name), preds)


def evaluate(opts: EvalOptions, *, say: Callable[[str], None] = log.info, run=None) -> dict:
    """``emollama eval`` for mer2023 / merr / dfew (one fold, or all five with ``fold=0``)."""
    from emollama.train.checkpoint import write_json
    from emollama.train.report import fold_lines, fold_markdown, fold_summary, summary_lines
    from emollama.train.run import load_run
    from emollama.train.tiny import TINY_WARNING

    if opts.dataset == "emer":
        return evaluate_emer(opts, say=say, run=run)
    if opts.dataset not in ADAPTERS.benchmarks():
        raise EvalError(f"unknown --dataset {opts.dataset!r}: choose one of {', '.join(ADAPTERS.benchmarks())}")
    run = run or load_run(opts.run, device=opts.device)
    check_layout(run, opts.layout)
    store = open_store(run, opts.store)
    bind_store(run, store, parse_feature_choices(opts.features), say)
    stores = eval_stores(run, store, opts.cache_store)
    adapter = get_adapter(opts.dataset)
    if not adapter.folds:
        if opts.fold:
            raise EvalError(f"--fold and --all-folds are for --dataset {' | '.join(ADAPTERS.with_folds())}")
        res = evaluate_corpus(run, stores, load_corpus(opts.dataset, opts.data), opts, say=say)
        for line in summary_lines(res):
            say(line)
        return res
    folds = [opts.fold] if opts.fold else list(adapter.folds)
    results = {}
    for k in folds:
        o = replace(opts, fold=k)
        results[k] = evaluate_corpus(run, stores, load_corpus(adapter.name, opts.data, fold=k), o, say=say)
        for line in summary_lines(results[k]):
            say(line)
    if len(folds) == 1:
        return results[folds[0]]
    summary = fold_summary(results)
    note = TINY_WARNING if run.tiny else None
    out = _out_dir(run, opts, adapter.name)
    out.mkdir(parents=True, exist_ok=True)
    summary.update(dataset=adapter.name, run=str(run.path), note=note, tiny=run.tiny, out_dir=str(out))
    write_json(out / "metrics.json", summary, sort_keys=False)
    (out / "report.md").write_text(fold_markdown(summary, str(run.path), note))
    for line in fold_lines(summary, note):
        say(line)
    return summary


# ---------------------------------------------------------------------------------------------
# EMER


def evaluate_emer(opts: EvalOptions, *, say: Callable[[str], None] = log.info, run=None) -> dict:
    """Reason texts for the EMER clips, scored by the judge (or the lexical proxy, named so)."""
    from emollama.train.emer import Judge, JudgeConfig, score_emer
    from emollama.train.generate import generate
    from emollama.train.checkpoint import write_json
    from emollama.train.run import load_run
    from emollama.train.tiny import TINY_WARNING

    run = run or load_run(opts.run, device=opts.device)
    check_layout(run, opts.layout)
    store = open_store(run, opts.store)
    bind_store(run, store, parse_feature_choices(opts.features), say)
    stores = eval_stores(run, store, opts.cache_store)
    emer = read_emer(opts.data, options=EmerOptions(limit=opts.limit))
    clips, refs, absent, video_dir = emer.clips, emer.references(), emer.absent, emer.video_dir
    t0 = time.perf_counter()
    if opts.extract:
        todo = [c for c in clips if c.id not in absent]
        extract_missing(stores, run.feature_keys, todo, workers=opts.workers, progress=opts.progress, root=video_dir)
    batcher, usable, missing = feature_batcher(run, stores, clips)
    if not usable:
        raise EvalError(f"none of the {len(clips)} EMER clips has features (videos not found: {absent[:5]})")
    texts = generate(run.model, run.prompt_encoder(run.labels, opts.layout), batcher, usable, "reason",
                     max_new_tokens=opts.reason_tokens,
                     batch_size=opts.batch_size, device=run.device)
    out = _out_dir(run, opts, "emer")
    out.mkdir(parents=True, exist_ok=True)
    cfg = JudgeConfig.from_env(base_url=opts.judge_url, model=opts.judge_model, api_key=opts.judge_key,
                               cache=out / "judge-cache.jsonl")
    judge = Judge(cfg) if cfg.configured else None
    ids = [c.id for c in usable]
    scores = score_emer(ids, texts, [refs[i] for i in ids], judge)
    for row, text in zip(scores["rows"], texts):
        row["prediction"], row["reference"] = text, refs[row["id"]]
    result = {"dataset": "emer", "split": "emer", "fold": None, "run": str(run.path), "step": run.step,
              "profile": run.config.model.profile, "tiny": run.tiny, "note": TINY_WARNING if run.tiny else None,
              "n": len(usable), "missing": missing, "labels": run.labels, "max_new_tokens": opts.reason_tokens,
              "emer": {k: v for k, v in scores.items() if k != "rows"},
              "proxy": judge is None, "seconds": {"total": round(time.perf_counter() - t0, 3)}, "out_dir": str(out)}
    with open(out / "emer-rows.jsonl", "w") as f:
        import json
        for row in scores["rows"]:
            f.write(json.dumps(row) + "\n")
    from emollama.train.report import report_markdown

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


# ---------------------------------------------------------------------------------------------
# Inference on any video


def not_a_clip(path: str | Path) -> str | None:
    """Why ``path`` cannot be a clip (a FIFO, a socket, a device, a folder without image frames), or None
    for a regular file or a frame folder. Checked with one ``stat``: a FIFO is never opened (that would
    block until something writes into it)."""
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
        return "a folder with no image frames, not a video file"
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    return f"{kind}, not a video file: save the stream to a file first"


def infer(run_path: str | Path, paths: Sequence[str | Path], *, store: str | None = None,
          labels: Sequence[str] | None = None, subtitle: str | None = None, max_new_tokens: int = 96,
          workers: int = 0, device: str = "auto", reason: bool = True, run=None,
          progress: bool = False, layout: str = "trained", features: Sequence[str] = (),
          cache_store: str | None = None) -> list[dict]:
    """Label, probability of every label and reasoning text for each video file. The clips are read from
    the run's store where they are, else extracted into the eval store (``cache_store``, default
    ``<run>/eval-store.zarr``); the run's store is never written. A path that is not a regular file or a
    frame folder (a FIFO, a device) gets its own error; the others go on."""
    from emollama.train.evaluate import score_labels
    from emollama.train.generate import generate
    from emollama.train.run import load_run
    from emollama.train.tiny import TINY_WARNING

    missing_files = [f"{p} (a broken link)" if Path(p).expanduser().is_symlink() else str(p)
                     for p in paths if not Path(p).expanduser().exists()]
    if missing_files:
        raise EvalError(f"no such file: {', '.join(missing_files)}")
    bad = {str(p): why for p in paths if (why := not_a_clip(p)) is not None}
    run = run or load_run(run_path, device=device)
    check_layout(run, layout)
    st = open_store(run, store)
    bind_store(run, st, parse_feature_choices(features))
    stores = eval_stores(run, st, cache_store)
    targets = [l.strip().lower() for l in labels] if labels else list(run.labels)
    clips = [Clip(clip_id_for(p), Path(p).expanduser().resolve(), subtitle, None, split="infer") for p in paths]
    good = [c for p, c in zip(paths, clips) if str(p) not in bad]
    rep = ExtractReport()
    if good:
        rep = extract_missing(stores, run.feature_keys, good, workers=workers, progress=progress,
                              root=good[0].source.parent)
    failed = dict(rep.failed)
    for p, c in zip(paths, clips):
        if str(p) in bad:
            failed[c.id] = bad[str(p)]
    for name, ids in rep.not_extractable.items():
        for cid in ids:
            failed.setdefault(cid, f"missing from the imported set {name} (imported sets are never re-extracted)")
    batcher, usable, _ = feature_batcher(run, stores, good)
    out: dict[str, dict] = {}
    if usable:
        prompts = run.prompt_encoder(targets, layout)
        logp = score_labels(run.model, prompts, batcher, usable, targets, device=run.device)
        probs = target_probabilities(logp, targets, targets, {})
        texts = (generate(run.model, prompts, batcher, usable, "reason", max_new_tokens=max_new_tokens,
                          device=run.device)
                 if reason else [None] * len(usable))
        for c, pr, text in zip(usable, probs, texts):
            out[c.id] = {"label": targets[int(pr.argmax())],
                         "probabilities": {t: float(v) for t, v in zip(targets, pr)}, "reasoning": text}
    results = []
    for p, c in zip(paths, clips):
        r = {"file": str(p), "id": c.id, **out.get(c.id, {"label": None, "probabilities": None, "reasoning": None,
                                                          "error": failed.get(c.id, "no features")}),
             "extracted": c.id in rep.extracted}
        if run.tiny:
            r["note"] = TINY_WARNING
        results.append(r)
    return results
