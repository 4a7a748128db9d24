"""Stage one, orchestrated: corpus -> tasks -> executor -> store, with a summary.

Idempotent like datatrove: a clip complete in every feature set is skipped (its completion mark is
in the store), a clip that failed is retried, a clip whose content changed is recomputed (its earlier
features stay until the new ones are committed; a file only touched or copied keeps them as they are).
A rerun with nothing to do loads no model and starts no worker: the feature-set keys come from the
cached encoder descriptions (`extract.encoders.known_outputs`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from emollama.extract.asr import ASR_VIEW, WhisperAsr
from emollama.extract.encoders import (EncoderEntry, EncodersConfig, KnownOutputs, file_sha256, known_outputs,
                                       remember_outputs, resolve_encoders)
from emollama.extract.step import (ClipJob, ExtractSettings, StepSettings, build_specs, computes_on_cpu,
                                   describe_encoders, resolved, run_batch, run_batches)
from emollama.pipeline.config import Config
from emollama.extract.prep import default_workers
from emollama.pipeline.executors import InlineExecutor, available_cores, make_executor
from emollama.pipeline.models import check_models
from emollama.store import FeatureSpec, FeatureStore, StorageError, profile_summary
from emollama.corpora import Clip, clip_has_sound, load_corpus

log = logging.getLogger(__name__)


def cpu_threads_note(threads: int, infos: dict, processes: int | None, cores: int | None = None) -> str | None:
    """A warning when encoders computing on a CPU, each process on `threads` (extract.cpu_threads, fixed:
    part of the key), ask for more threads than this machine's cores; None when they fit, compute on a
    GPU, or run on a cluster elsewhere (`processes` None)."""
    if processes is None or not any(computes_on_cpu(i) for i in infos.values()):
        return None
    cores = cores or available_cores()
    if processes * threads <= cores:
        return None
    who = f"{processes} worker(s) x {threads}" if processes > 1 else f"{threads}"
    return (f"encoding on the CPU asks for {who} thread(s) ([extract] cpu_threads) on {cores} core(s): "
            "oversubscribed threads make it several times slower; use fewer --workers, or a lower "
            "cpu_threads (a new feature-set key: values depend on the thread count)")


@dataclass
class ExtractSummary:
    store: str
    keys: dict[str, str]                  # output name -> feature-set key
    profiles: dict[str, str] = field(default_factory=dict)   # output name -> the profile that made its set
    total: int = 0                        # clips in the corpus (accepted by the adapter)
    skipped: int = 0                      # already complete
    ok: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)   # refused by the dataset adapter
    no_face: list[str] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)   # complete clips whose file content changed
    kept: list[str] = field(default_factory=list)         # ... whose recompute failed: earlier features kept
    unchanged: list[str] = field(default_factory=list)    # complete clips touched/copied, same sha256: kept
    preview_failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    executor: str = ""
    batch_clips: int = 0               # clips per task (one store commit) this run used
    prep_workers: int = 0              # preparation processes per encoding worker (the most any reported; 0: a thread)
    detect_on: str = ""                # where MTCNN ran: prep (each clip on a preparation process's CPU) | encoder
    compact_error: str | None = None   # the end-of-run compaction failed (the clips are committed)

    @property
    def exit_code(self) -> int:
        return 4 if self.compact_error else 1 if self.failed else 0

    @property
    def profile(self) -> str:
        """The profile that made the sets, in one word when they agree (`store.profile_summary`)."""
        return profile_summary(self.profiles)

    def to_dict(self) -> dict:
        """The summary as `--json` prints it: every field, and `profile`."""
        return {**asdict(self), "profile": self.profile}

    def lines(self) -> list[str]:
        out = [f"store {self.store}  ({self.executor})",
               f"profile: {profile_summary(self.profiles, note=True)}",
               f"clips: {self.total} in corpus, {self.skipped} already complete, {len(self.ok)} extracted, "
               f"{len(self.failed)} failed, {len(self.rejected)} rejected by the dataset adapter"]
        if self.ok:
            out.append(f"throughput: {len(self.ok) / max(self.wall, 1e-9):.2f} clips/s over {self.wall:.1f} s "
                       f"({self.prep_workers or 'no'} preparation process(es) per encoding worker, "
                       f"{self.batch_clips} clips per task, faces detected "
                       f"{'on the encoding side' if self.detect_on == 'encoder' else 'clip by clip'})")
            work = {k: v for k, v in self.seconds.items() if k != "wait"}
            spent = sum(work.values()) or 1.0
            out.append("time: " + ", ".join(f"{k} {v:.1f}s ({100 * v / spent:.0f}%)" for k, v in work.items())
                       + (" (decode: summed over the preparation processes)" if self.detect_on == "encoder"
                          else " (decode and faces: summed over the preparation processes)"))
            if "wait" in self.seconds:
                out.append(f"encoders waited for prepared clips {self.seconds['wait']:.1f} s of {self.wall:.1f} s")
        if self.no_face:
            out.append(f"no face found (whole frames used) in {len(self.no_face)}: {', '.join(self.no_face[:10])}")
        if self.recomputed:
            out.append(f"content changed since extraction, recomputed: {len(self.recomputed)} "
                       f"({len(self.kept)} failed and keep their earlier features)")
        if self.unchanged:
            out.append(f"size/mtime changed but content identical (sha256), kept as is: {len(self.unchanged)}")
        for cid, why in self.preview_failed[:10]:
            out.append(f"preview not written for {cid} (the clip itself is fine): {why}")
        for cid, why in self.failed[:20]:
            out.append(f"FAILED {cid}: {why}")
        if len(self.failed) > 20:
            out.append(f"... and {len(self.failed) - 20} more failures (emollama store info --json)")
        for cid, why in self.rejected[:10]:
            out.append(f"rejected {cid}: {why}")
        return out


def encoders_config(cfg: Config, home: Path | None = None) -> EncodersConfig:
    """The run's encoders: the profile's four views (each replaced by its [extract.encoders.<view>]
    table when given), then the further named tables, then speech recognition when [extract.asr] is
    enabled (the entry `asr`: Whisper, its text set asr.whisper.text)."""
    base = resolve_encoders(cfg.extract.profile, cfg.extract.encoders, home=home)
    a = cfg.extract.asr
    if not a.enabled:
        return base
    entry = EncoderEntry(ASR_VIEW, WhisperAsr.name, a.source(cfg.extract.profile, home), a.options())
    return EncodersConfig(base.entries + (entry,))


def settings_from(cfg: Config) -> ExtractSettings:
    """The step's settings: the StepSettings fields of [extract], as they are, plus the encoders, with
    `faces.detect_on = "auto"` resolved here (`extract.step.resolved`), so every worker does the same."""
    e = cfg.extract
    step = {f.name: getattr(e, f.name) for f in fields(StepSettings)}
    if e.offline is None and e.profile == "tiny" and not e.encoders and not (e.asr.enabled and e.asr.model):
        step["offline"] = True   # the tiny profile is built locally: never ask a hub
    return resolved(ExtractSettings(**step, encoders=encoders_config(cfg)))


def source_change(clip: Clip, record: dict | None) -> str | None:
    """How a complete clip's source differs from what was extracted (files only; folders are not
    re-scanned): None (same size and mtime), "touched" (size or mtime differ but the content's sha256 is
    the recorded one: a `touch`, a copy without -t, an unzip) or "changed" (new content)."""
    if not record or not clip.source.is_file():
        return None
    st = clip.source.stat()
    size_differs = record.get("size") not in (None, st.st_size)
    mtime_differs = record.get("mtime") is not None and abs(record["mtime"] - st.st_mtime) > 1e-3
    if not size_differs and not mtime_differs:
        return None
    if size_differs or not record.get("sha256"):
        return "changed"
    try:
        return "touched" if file_sha256(clip.source) == record["sha256"] else "changed"
    except OSError:
        return "changed"   # unreadable now: let the task record why


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)   # a store write failing for one of these: exit 4


def is_storage_error(e: BaseException) -> bool:
    """A storage error (exit status 4): the store is not writable, or a write hit a full disk or a
    read-only file system. The store raises StorageError (one line, nothing committed lost)."""
    return isinstance(e, StorageError) or (isinstance(e, OSError) and e.errno in STORAGE_ERRNOS)


def source_size(source: Path) -> int | None:
    """Bytes of a clip (a video file, or the frames of a frame folder): a stand-in for its duration that
    costs one stat per file, no decoding. None when it cannot be read (the task will record why)."""
    try:
        if source.is_dir():
            return sum(e.stat().st_size for e in os.scandir(source) if e.is_file())
        return source.stat().st_size
    except OSError:
        return None


def plan_tasks(jobs: Sequence[ClipJob], sizes: Sequence[int | None], batch_clips: int) -> list[list[ClipJob]]:
    """Group clips into tasks of about `batch_clips` typical clips of work, longest tasks first.

    A clip's cost is half fixed (faces, and the local/temporal/global encoders see a fixed number of
    frames whatever the length) and half proportional to its length (the decoding pass and the audio
    encoder), with the length taken from the file size relative to the corpus median (1 unit = a median
    clip). A task closes at `batch_clips` clips or `batch_clips` units, whichever comes first, and a clip
    that would take it past 1.25x that starts the next one, so long clips travel in smaller tasks.
    Tasks are returned largest first, so the long ones do not straggle at the end."""
    if not jobs:
        return []
    known = [s for s in sizes if s]
    median = statistics.median(known) if known else 1.0
    costs = [0.5 + 0.5 * ((s or median) / median) for s in sizes]
    tasks: list[list[ClipJob]] = []
    task_cost: list[float] = []
    cur: list[ClipJob] = []
    acc = 0.0
    for job, c in zip(jobs, costs):
        if cur and acc + c > 1.25 * batch_clips:   # a long clip would overload this task: start the next
            tasks.append(cur)
            task_cost.append(acc)
            cur, acc = [], 0.0
        cur.append(job)
        acc += c
        if len(cur) >= batch_clips or acc >= batch_clips:
            tasks.append(cur)
            task_cost.append(acc)
            cur, acc = [], 0.0
    if cur:
        tasks.append(cur)
        task_cost.append(acc)
    order = sorted(range(len(tasks)), key=lambda i: -task_cost[i])   # stable: equal costs keep corpus order
    return [tasks[i] for i in order]


def task_clips(e, ex: InlineExecutor) -> int:
    """Clips per task: `batch_clips` when set, else 4 per preparation process of a worker (at least 8),
    so that every preparation process has clips to work on until the task's last micro-batch. The
    processes per worker: `prep_workers` when set, else the worker's cores (in this process: its torch
    threads; a local cluster's worker: its threads; a remote worker: unknown, 1)."""
    if e.batch_clips:
        return e.batch_clips
    p = e.prep_workers
    if p is None:
        p = default_workers() if type(ex) is InlineExecutor else (ex.threads or 1)
    return max(8, 4 * p)


def parse_storage_options(items: Sequence[str]) -> dict:
    """`KEY=VALUE` strings (the CLI's repeatable --storage-option) into fsspec storage options; a value
    that reads as JSON (true, 3, {"a": 1}) is decoded, anything else stays a string."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"storage option {item!r}: expected KEY=VALUE (e.g. endpoint_url=http://host:9000)")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


class SettingsChanged(RuntimeError):
    """The extraction settings no longer produce the feature sets the caller needs."""


NOTHING_TO_DO = "nothing to do: no model loaded, no worker started"


def cached_specs(known: KnownOutputs, settings: ExtractSettings) -> dict[str, FeatureSpec] | None:
    """The specs of `settings` from the cached encoder descriptions, or None when one is missing (or
    does not make a valid spec): then the workers load the encoders and tell."""
    if not known.complete:
        log.info("loading %s once to learn their outputs (not in %s yet)", ", ".join(known.missing), known.file)
        return None
    try:
        return build_specs(known.infos, settings)
    except (ValueError, TypeError) as err:
        log.warning("ignoring the cached encoder descriptions in %s (%s): loading the encoders", known.file, err)
        return None


def lost_keys(specs: dict[str, FeatureSpec], expect_keys: Sequence[str] | None) -> list[str]:
    """The expected feature-set keys that `specs` do not produce."""
    return sorted(set(expect_keys or ()) - {spec.key for spec in specs.values()})


@dataclass
class ClipPlan:
    """Which clips a run extracts under `keys`: those not complete in every set, and the complete ones
    whose file content changed (`recomputed`); complete clips only touched or copied are `unchanged`."""

    keys: dict[str, str]
    todo: list[ClipJob]
    skipped: int
    recomputed: list[str]
    unchanged: list[str]

    def fill(self, summary: ExtractSummary) -> None:
        summary.skipped, summary.recomputed, summary.unchanged = self.skipped, self.recomputed, self.unchanged


def plan_clips(store: FeatureStore, clips: Sequence[Clip], keys: dict[str, str]) -> ClipPlan:
    """The clips to extract under `keys` (output name -> set key; a set not in the store yet is empty)."""
    have = store.sets()
    per_set = {name: store.complete(k) if k in have else set() for name, k in keys.items()}
    complete = set.intersection(*per_set.values()) if keys else set()
    records = store.records() if complete else {}
    changed: set[str] = set()
    unchanged: list[str] = []
    for c in clips:
        if c.id in complete:
            how = source_change(c, records.get(c.id))
            if how == "changed":
                changed.add(c.id)
            elif how == "touched":
                unchanged.append(c.id)
    if changed:
        # recomputed without removing anything first: the new rows supersede the old ones only when
        # they are committed, so an interrupted or failed recompute leaves the earlier features
        log.warning("%d clip(s) changed on disk since extraction; recomputing them", len(changed))
    # absolute sources: the preparation processes (and dask workers) may run in another folder
    todo = [ClipJob(c.id, str(Path(c.source).absolute()), replace=c.id in changed, has_sound=clip_has_sound(c),
                    views=None if c.id in changed else lacking_views(c.id, per_set))
            for c in clips if c.id not in complete or c.id in changed]
    return ClipPlan(dict(keys), todo, len(clips) - len(todo), sorted(changed), unchanged)


def lacking_views(clip_id: str, per_set: dict[str, set[str]]) -> tuple[str, ...] | None:
    """The encoder entries (views) whose sets lack the clip (None: every one does, or none: the whole clip)."""
    views: dict[str, bool] = {}
    for name, have in per_set.items():
        view = name.split(".", 1)[0]
        views[view] = views.get(view, False) or clip_id not in have
    lacking = tuple(v for v, lacks in views.items() if lacks)
    return None if not lacking or len(lacking) == len(views) else lacking


def _profiles(store: FeatureStore, keys: dict[str, str]) -> dict[str, str]:
    """Output name -> the profile recorded with its set (a set made earlier keeps the config that made it)."""
    made = store.profiles(list(keys.values()))
    return {name: made[key] for name, key in keys.items()}


def run_extract(cfg: Config, *, progress: bool = True, limit: int | None = None,
                clips: Sequence[Clip] | None = None, expect_keys: Sequence[str] | None = None,
                views: Sequence[str] | None = None) -> ExtractSummary:
    """Extract the corpus of `cfg` (or the given `clips`) into its store; `expect_keys`: the feature
    sets the settings must produce (e.g. a trained run's), checked before anything is written; `views`:
    only these encoders (by name) run, the other sets are neither made nor planned (eval's conditions
    recompute the sets a perturbation changes and read the others where they are; ("asr",): the text set
    of clips whose features are elsewhere)."""
    e = cfg.extract
    if clips is None:
        corpus = load_corpus(cfg.dataset.kind, cfg.dataset.root, **cfg.dataset.options)
        clips, rejected = corpus.clips, list(corpus.rejected)
    else:
        clips, rejected = list(clips), []
    clips = clips[:limit] if limit else clips
    settings = settings_from(cfg)
    if views is not None:
        unknown = sorted(set(views) - set(settings.encoders.names))
        if unknown:
            raise ValueError(f"no encoder named {unknown}: the extraction has {', '.join(settings.encoders.names)}")
        settings = replace(settings, encoders=EncodersConfig(tuple(e for e in settings.encoders if e.name in views)))
    # every encoder checked before the store exists or any worker starts; without a hub: local files only
    if check_models(encoders=settings.encoders, offline=settings.offline) and not settings.offline:
        settings = replace(settings, offline=True)
    local = None if "://" in str(e.store) else Path(e.store)
    fresh = local is not None and not local.exists()
    try:
        store = FeatureStore.open(e.store, storage_options=e.storage_options or None)
    except OSError as err:
        if not isinstance(err, StorageError) and (is_storage_error(err) or err.errno in (errno.EACCES, errno.EPERM)):
            raise StorageError(f"the store {e.store} cannot be created ({err.strerror or err}): nothing committed "
                               "was lost; make it writable or use another --store, then rerun", err.errno) from None
        raise
    try:
        return _extract_into(store, cfg, settings, clips, rejected, progress, expect_keys)
    except BaseException:
        if fresh and not store.sets():     # a store this run created and left empty (e.g. an encoder failed
            shutil.rmtree(local, ignore_errors=True)   # to load): not left behind
        raise


def _extract_into(store: FeatureStore, cfg: Config, settings, clips: list[Clip], rejected: list, progress: bool,
                  expect_keys: Sequence[str] | None) -> ExtractSummary:
    e = cfg.extract
    store.check_writable()   # a read-only store or a full disk stops here, before any model is loaded
    t0 = time.perf_counter()
    config = cfg.to_dict()
    config["extract"]["faces"]["detect_on"] = settings.faces.detect_on   # resolved: eval redoes what ran here
    # The keys from the cache of encoder descriptions (no model): a rerun with nothing to do ends here,
    # with no model loaded and no worker started.
    known = known_outputs(settings.encoders, device=settings.device, offline=settings.offline)
    guess, plan = cached_specs(known, settings), None
    if guess is not None and not lost_keys(guess, expect_keys):
        plan = plan_clips(store, clips, {name: spec.key for name, spec in guess.items()})
        if not plan.todo:
            keys = {name: store.ensure_set(spec, config=config) for name, spec in guess.items()}
            summary = ExtractSummary(store=e.store, keys=keys, profiles=_profiles(store, keys), total=len(clips),
                                     rejected=rejected, executor=NOTHING_TO_DO, detect_on=settings.faces.detect_on)
            plan.fill(summary)
            summary.wall = time.perf_counter() - t0
            return summary
    with make_executor(e.workers, e.scheduler, device=e.device) as ex:
        if ex.dashboard and progress:
            tqdm.write(f"dask dashboard: {ex.dashboard}", file=sys.stderr)
        infos = ex.call(describe_encoders, settings)   # the encoders as the workers load them: they decide
        remember_outputs(known, infos)
        note = cpu_threads_note(settings.cpu_threads, infos, ex.local_processes)
        if note:
            log.warning("%s", note)
        specs = build_specs(infos, settings)
        lost = lost_keys(specs, expect_keys)
        if lost:
            raise SettingsChanged(
                f"the extraction settings no longer produce feature set(s) {lost} (they give "
                f"{sorted(spec.key for spec in specs.values())}): the encoder weights or code changed since "
                "those features were made. Extract with the original models, or use only clips already stored.")
        keys = {name: store.ensure_set(spec, config=config) for name, spec in specs.items()}
        summary = ExtractSummary(store=e.store, keys=keys, profiles=_profiles(store, keys), total=len(clips),
                                 rejected=rejected, executor=ex.name, detect_on=settings.faces.detect_on)
        if plan is None or plan.keys != keys:   # the cached guess was wrong (or absent): plan again
            plan = plan_clips(store, clips, keys)
        plan.fill(summary)
        todo = plan.todo
        summary.batch_clips = task_clips(e, ex)
        tasks = plan_tasks(todo, [source_size(Path(j.source)) for j in todo], summary.batch_clips)
        log.info("%d clip(s) to extract in %d task(s) on %s", len(todo), len(tasks), ex.name)
        bar = tqdm(total=len(todo), desc="extract", unit="clip", disable=not progress or not todo, dynamic_ncols=True)
        for jobs, result, error in ex.map_unordered(
                run_batch, tasks, many=run_batches, settings=settings, store_url=e.store, keys=keys,
                storage_options=e.storage_options or None, preview_dir=e.preview):
            if error is not None:
                if is_storage_error(error):
                    # the disk filled up (or the store became read-only) under the run: stop here, do not
                    # compute every remaining clip only to fail its commit too
                    log.warning("%d clip(s) of this run were committed before the store failed", len(summary.ok))
                    raise error
                # The task died as a whole (not one clip): nothing of it was committed; a rerun retries.
                summary.failed += [(j.id, f"task error: {type(error).__name__}: {error}") for j in jobs]
            else:
                summary.ok += result.ok
                summary.failed += result.failed
                summary.no_face += result.no_face
                summary.kept += result.kept
                summary.preview_failed += result.preview_failed
                summary.prep_workers = max(summary.prep_workers, result.prep_workers)
                for k, v in result.seconds.items():
                    summary.seconds[k] = summary.seconds.get(k, 0.0) + v
            bar.update(len(jobs))
            bar.set_postfix(failed=len(summary.failed))
        bar.close()
    if e.compact and (summary.ok or summary.failed):
        store.refresh()
        try:
            store.compact(keep_s=3600)   # readers that opened the store earlier keep their data for an hour
        except StorageError as err:      # every clip is committed already: keep the summary, report it
            summary.compact_error = str(err)
    summary.wall = time.perf_counter() - t0
    return summary
