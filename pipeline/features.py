"""A run's features for any clips: the stores they are read from, the clips extracted first, the batches.

Evaluation and inference read features the same way (``pipeline.evaluation``, ``pipeline.inference``):

1. ``run_stores(run, store, cache_store, features)``: the run's training store (read only, never
   written) and its eval store (``<run>/eval-store.zarr``, or ``--cache-store``), with the run's sets
   bound to the store's (``bind_store``: an imported run reads the store's set of the same name, else
   of the same modality and shape). A run with no store of its own (``import-checkpoint``) reads and
   writes its eval store only.
2. ``extract_missing(stores, keys, clips)``: the clips complete in neither store are extracted, with
   exactly the settings that made the run's sets (``extraction_config``, rebuilt from the config each
   set records), into the eval store. A set that records no settings (an imported one) is never
   re-extracted: the clips it lacks are reported. An imported run whose eval store holds nothing yet
   starts it with its profile's encoders at their defaults (``default_extraction``).
3. ``feature_batcher(run, stores, clips)``: a ``train.data.FeatureBatcher`` over the usable clips, each
   read from the training store where it is complete there, else from the eval store
   (``MergedFeatures``).

Before extracting, the rebuilt settings must produce exactly the run's feature-set keys, or nothing is
written. A clip is known to a store by its content: ``known_by_content`` finds the id under which a store
holds a file's sha256 (what extraction records), so a file extracted under any name is read, not
extracted again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from emollama.corpora import Clip
from emollama.pipeline.config import Config, load_config
from emollama.store import FeatureStore

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
    """The run's training store (read only here; None for a run without one) and the eval store that the
    clips missing from it go into."""
    train: FeatureStore | None
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

    @property
    def reader(self) -> FeatureStore | None:
        """The store whose sets define the run's keys: the training store, else the eval store."""
        return self.train if self.train is not None else self.cache()


def eval_stores(run, store: FeatureStore | None, cache_store: str | None = None) -> EvalStores:
    """``store`` (the run's, read only) and the eval store: ``cache_store``, default ``<run>/eval-store.zarr``."""
    url = str(cache_store) if cache_store else str(Path(run.path) / EVAL_STORE)
    if store is None:
        return EvalStores(None, url)
    same = (url.rstrip("/") == store.url.rstrip("/")) if _is_url(url) or _is_url(store.url) else \
        Path(url.removeprefix("file://")).expanduser().resolve() == Path(store.url).resolve()
    if same:
        raise EvalError(f"--cache-store {url} is the training store; eval and infer never write into it: "
                        "name another folder (default: <run>/eval-store.zarr)")
    return EvalStores(store, url, store.storage_options if _is_url(url) and _is_url(store.url) else None)


def open_store(run, store_url: str | None) -> FeatureStore | None:
    """The store named by ``--store``, else the run's; None for a run that records none (an imported one)."""
    url = store_url or run.store_url
    if not url:
        if run.bindable:
            return None
        raise EvalError(f"the run {run.path} records no feature store: pass --store PATH_OR_URL")
    try:
        return FeatureStore.open(url, create=False)
    except FileNotFoundError:
        raise EvalError(f"no feature store at {url}" + ("" if store_url else f" (the store the run {run.path} "
                        "was trained on): pass --store PATH_OR_URL with a store of the same extraction settings"))
    except ValueError as e:
        raise EvalError(str(e)) from None


def run_stores(run, store: str | None = None, cache_store: str | None = None, features: Sequence[str] = (),
               say: Callable[[str], None] = log.info) -> EvalStores:
    """The stores a run's features come from, with its sets bound to theirs (``bind_store``)."""
    st = open_store(run, store)
    stores = eval_stores(run, st, cache_store)
    reader = stores.reader
    if reader is not None:
        bind_store(run, reader, parse_feature_choices(features), say)
    elif features:
        raise EvalError("--feature picks among a store's sets, and this run has no store yet: pass --store, or "
                        "run once without --feature (its eval store is then made with the run's profile)")
    return stores


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


def default_extraction(run, target: str, *, dataset: str = "folder", root: str | Path = ".", workers: int = 0,
                       target_options: dict | None = None) -> Config:
    """The extraction an imported run without a store starts its eval store with: its profile's encoders
    (``paper``: the paper's four; ``tiny``: the test fixtures) at their default settings, which give the
    sets the run binds by name (``train.released.RELEASED_SETS``). A run in the released prompt style takes
    the clip's first frame as the global frame, as the released model was trained and evaluated."""
    ext = {"store": target, "profile": run.config.model.profile, "workers": workers, "compact": False,
           "storage_options": target_options or {}}
    from emollama.train.prompt import prompt_style

    if (frame := prompt_style(run.config.data.prompt).global_frame) is not None:
        ext["frames"] = {"global_frame": frame}
    try:
        return load_config(None, {"dataset": {"kind": dataset, "root": str(root)}, "extract": ext})
    except ValueError as e:
        raise EvalError(f"cannot make the extraction config of the run's profile: {e}") from None


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


def _storage_error(stores: EvalStores, e: OSError, what: str) -> EvalStorageError:
    why = os.strerror(e.errno) if e.errno else str(e)
    read = f"; the training store {stores.train.url} is only read" if stores.train is not None else ""
    return EvalStorageError(f"cannot {what} the eval store {stores.cache_url} ({why}){read}: free space or pass "
                            "--cache-store DIR on a writable disk, then rerun")


def extract_missing(stores: EvalStores, keys: Sequence[str], clips: Sequence[Clip], *, run=None,
                    workers: int = 0, progress: bool = False, dataset: str = "folder", root: str | Path = ".",
                    preview: str | None = None, missing_audio: str | None = None, offline: bool | None = None,
                    say: Callable[[str], None] = log.info) -> ExtractReport:
    """Extract the clips complete neither in the training store nor in the eval store, with the settings
    that made ``keys``, into the eval store (``stores.cache_url``); the training store is only read.

    Sets that record no extraction config (imported, e.g. the released MER2023 features) are never
    re-extracted with other encoders: the clips they lack are reported by name in ``not_extractable``.
    A run without a training store (``run`` given, its eval store empty) starts the eval store with
    ``default_extraction`` and binds its sets to what that made. ``preview`` (a folder for contact sheets) and
    ``missing_audio`` (fail | silence | auto, for a clip without sound) and ``offline`` change no value of any
    set. Every encoder is checked before the eval store is created (``pipeline.models``): one message lists
    the missing ones."""
    from emollama.pipeline.extraction import SettingsChanged, run_extract

    if isinstance(stores, FeatureStore):
        raise TypeError("extract_missing takes EvalStores (the training store is never written): use eval_stores()")
    reader = stores.reader
    if reader is None:   # an imported run's first clips: its profile's extraction makes the eval store
        if run is None:
            raise EvalError("no store holds the run's feature sets yet")
        cfg = default_extraction(run, stores.cache_url, dataset=dataset, root=root, workers=workers,
                                 target_options=stores.cache_options)
        cfg.extract = adjusted_extract(cfg.extract, preview, missing_audio, offline)
        check_encoders(cfg)
        say(f"the run has no feature store: extracting with its {run.config.model.profile} profile's encoders "
            f"into {stores.cache_url}")
        summary = guarded_extract(stores, lambda: run_extract(cfg, progress=progress, clips=list(clips)),
                                  SettingsChanged)
        bind_store(run, stores.cache(), {}, say)
        return ExtractReport(extracted=summary.ok, failed=summary.failed, seconds=summary.wall,
                             cache=stores.cache_url)
    reader.refresh()
    made = [k for k in keys if (reader.set_attrs(k).get("config") or {}).get("extract")]
    imported = [k for k in keys if k not in made]
    cache = stores.cache() if stores.train is not None else None
    complete = set.intersection(*(reader.complete(k) for k in keys))
    complete_made = _complete(reader, made) | _complete(cache, made)
    in_imported = _complete(reader, imported) if imported else None
    rep = ExtractReport(reused=len([c for c in clips if c.id in complete or (
        c.id in complete_made and (in_imported is None or c.id in in_imported))]))
    sets = reader.sets()
    for k in imported:
        have = reader.complete(k)
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
    cfg = extraction_config(reader, made, dataset=dataset, root=root, workers=workers, target=stores.cache_url,
                            target_options=stores.cache_options)
    cfg.extract = adjusted_extract(cfg.extract, preview, missing_audio, offline)
    check_encoders(cfg)
    if stores.train is not None:
        try:
            stores.cache(create=True)
        except (FileExistsError, ValueError) as e:
            raise EvalError(f"--cache-store: {e}") from None
        except OSError as e:
            raise _storage_error(stores, e, "create") from None
    summary = guarded_extract(stores, lambda: run_extract(cfg, progress=progress, clips=todo, expect_keys=made),
                              SettingsChanged)
    rep.extracted, rep.failed, rep.seconds = summary.ok, summary.failed, summary.wall
    rep.cache = stores.cache_url
    lost = sorted(set(made) - set(summary.keys.values()))
    if lost:    # run_extract checks expect_keys before writing; this is the same promise, kept here too
        raise EvalError(f"the eval store {stores.cache_url} got sets {sorted(summary.keys.values())}, not the "
                        f"run's {lost}")
    return rep


def extract_for_eval(stores: EvalStores, run, clips: Sequence[Clip], corpus, opts,
                     say: Callable[[str], None] = log.info) -> ExtractReport:
    """``extract_missing`` for an evaluation of ``corpus`` (a registered dataset's name, else a folder), with
    the options of ``opts`` (``workers``, ``progress``, ``missing_audio``, ``offline``); says what it extracted."""
    from emollama.corpora import ADAPTERS

    rep = extract_missing(stores, run.feature_keys, clips, run=run, workers=opts.workers, progress=opts.progress,
                          dataset=corpus.name if corpus.name in ADAPTERS else "folder", root=corpus.root,
                          missing_audio=opts.missing_audio, offline=opts.offline, say=say)
    if rep.extracted:
        say(f"extracted {len(rep.extracted)} clip(s) missing from the training store into the eval store "
            f"{rep.cache} ({rep.seconds:.1f} s)")
    return rep


def adjusted_extract(extract, preview: str | None, missing_audio: str | None, offline: bool | None):
    """The extraction's runtime and policy settings for this call (they change no value of any set)."""
    from dataclasses import replace

    if missing_audio is not None and missing_audio not in ("auto", "fail", "silence"):
        raise EvalError(f"--missing-audio {missing_audio!r}: choose fail, silence or auto")
    return replace(extract, **({"preview": str(preview)} if preview else {}),
                   **({"missing_audio": missing_audio} if missing_audio else {}),
                   **({"offline": offline} if offline is not None else {}))


def check_encoders(cfg: Config) -> None:
    """Every encoder of an extraction here, before any store is created (one message lists the missing)."""
    from emollama.pipeline.extraction import encoders_config
    from emollama.pipeline.models import check_models

    if cfg.extract.profile != "tiny" or cfg.extract.encoders:
        check_models(encoders=encoders_config(cfg), offline=cfg.extract.offline)


def guarded_extract(stores: EvalStores, call, settings_changed: type[Exception]):
    """``call()`` (an extraction into the eval store) with its errors as EvalError / EvalStorageError."""
    try:
        return call()
    except settings_changed as e:
        where = stores.train.url if stores.train is not None else stores.cache_url
        raise EvalError(f"{where}: {e}") from None
    except OSError as e:
        raise _storage_error(stores, e, "write") from None


def not_computable(run, stores: EvalStores, rep: ExtractReport) -> dict[str, str]:
    """Clip -> why it has no features, for clips that lack an imported set: the message names the set and
    both ways on (compute the view with the encoder that made it, or read another set with --feature)."""
    out: dict[str, str] = {}
    reader = stores.reader
    sets = reader.sets() if reader is not None else {}
    for name, ids in rep.not_extractable.items():
        mine = next((s for s in sets.values() if s.name == name), None)
        modality = mine.modality if mine is not None else "the view"
        made = sorted(s.name for k, s in sets.items() if mine is not None and s.modality == modality
                      and tuple(s.shape) == tuple(mine.shape) and s.name != name
                      and (reader.set_attrs(k).get("config") or {}).get("extract"))
        other = (f"pass --feature {modality}={made[0]} (a set this store can extract)" if made else
                 f"pass --feature {modality}=SET with a {modality} set extracted by emollama "
                 f"(`emollama extract`; its settings are recorded, so new clips get the same)")
        why = (f"missing from the imported set {name}, which records no extraction settings and so cannot be "
               f"computed for a new clip: extract the {modality} view with the encoder that made it "
               f"([extract.encoders.{modality}] model = its checkpoint) and read that set, or {other}")
        for cid in ids:
            out.setdefault(cid, why)
    return out


def features_profile(stores: EvalStores, keys: Sequence[str]) -> str | None:
    """Which profile made the run's features ("paper", "tiny", "imported"; "mixed: ..." when they differ),
    from the config each set records; None when no store holds them yet."""
    reader = stores.reader
    if reader is None:
        return None
    have = reader.sets()
    seen: dict[str, list[str]] = {}
    for k in keys:
        if k not in have:
            continue
        made = (reader.set_attrs(k).get("config") or {}).get("extract") or {}
        seen.setdefault(made.get("profile") or "imported", []).append(have[k].name)
    if len(seen) <= 1:
        return next(iter(seen), None)
    return "mixed: " + "; ".join(f"{p} ({', '.join(names)})" for p, names in sorted(seen.items()))


# ---------------------------------------------------------------------------------------------
# Which id a store holds a file under


def known_by_content(stores: EvalStores, keys: Sequence[str], sha256: Mapping[str, str]) -> dict[str, str]:
    """{wanted id: store id} for the files (``sha256``: wanted id -> the file's sha256) whose content a
    store holds complete in every set of ``keys``: the id under which it was extracted (its recorded
    sha256), from the training store first, then the eval store."""
    out: dict[str, str] = {}
    by_hash: dict[str, str] = {}
    train = stores.train
    cache = stores.cache()
    for st in (cache, train):      # the training store last: it wins
        if st is None:
            continue
        have = st.sets()
        usable = [k for k in keys if k in have]
        if not usable:
            continue
        complete = set.intersection(*(st.complete(k) for k in usable))
        for cid, rec in st.records().items():
            h = rec.get("sha256")
            if h and cid in complete and rec.get("status") == "ok":
                by_hash[h] = cid
    for want, h in sha256.items():
        if h in by_hash:
            out[want] = by_hash[h]
    return out


# ---------------------------------------------------------------------------------------------
# Reading the features of a set of clips


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


def feature_batcher(run, store: FeatureStore | EvalStores, clips: Sequence[Clip]):
    """(a ``train.data.FeatureBatcher`` over the clips complete in every set of the run, those clips, the
    ids of the others). With ``EvalStores``, each clip is read from the training store where it is
    complete there, else from the eval store (``MergedFeatures``)."""
    from emollama.train.data import FeatureBatcher

    keys = run.feature_keys
    if isinstance(store, EvalStores):
        train, cache = store.train, store.cache()
        if train is None:
            train, cache = cache, None
    else:
        train, cache = store, None
    if train is None:
        return None, [], [c.id for c in clips]
    have = {k: train.complete(k) if k in train.sets() else set() for k in keys}
    if cache is not None:
        cache_sets = cache.sets()
        have = {k: v | (cache.complete(k) if k in cache_sets else set()) for k, v in have.items()}
    complete = set.intersection(*have.values())
    usable = [c for c in clips if c.id in complete]
    missing = [c.id for c in clips if c.id not in complete]
    if not usable:
        return None, [], missing
    if cache is None:
        return FeatureBatcher.from_store(train, keys, [c.id for c in usable]), usable, missing
    return FeatureBatcher(MergedFeatures(train, cache, keys, [c.id for c in usable])), usable, missing


# ---------------------------------------------------------------------------------------------
# Binding a run's sets to a store's


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
        pick = choices.get(want.modality) or choices.get(want.name)
        if k in have and not pick:
            continue
        if k not in run.bindable:
            if k in have:
                continue
            lost.append(f"{want.name} ({k})")
            continue
        fits = lambda s: s.modality == want.modality and tuple(s.shape) == tuple(want.shape)   # noqa: E731
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
            if cands[0] != k:
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
