"""A robustness report: the same clips scored under each condition (``emollama eval --conditions``).

A condition changes what the model sees of a clip, one way each:

- ``full``: nothing (the baseline every other row is compared with);
- ``drop:M[+M...]``: the features of modalities M are zeros (the model keeps their tokens: a trained
  model has no way to leave a view out, and zeros are what it reads of nothing). M is a modality of the
  run (``local``, ``temporal``, ``audio``, ``global``, or a further encoder's name), ``face`` (every
  modality read from the face crops or the whole frame), ``voice`` (every modality read from the
  waveform), or ``each`` (one condition per modality);
- ``noise:SNR``: white noise over the audio at SNR dB (``noise``: 10 dB);
- ``blur:F``: the faces blurred, radius F x the face square's side (``blur``: 0.05);
- ``no-subtitle``: the subtitle left out of the prompt.

Noise and blur change inputs, so their features are extracted: with the run's recorded settings plus
``[extract.perturb]`` (``extract.perturb``), only by the encoders whose input they change (a noise condition
runs the audio encoders and nothing else), into the run's eval store. Those sets have keys of their own
(their spec holds the perturbation), so a rerun extracts nothing, and the other sets are read where they
are. Drops and the subtitle are applied at scoring. Every condition is scored on the same clips: those
with features under all of them.

The report folder is the evaluation's, with ``-conditions``: ``metrics.json`` (each condition's metrics
and what it changed), ``conditions.csv``, ``report.md`` and ``conditions.png`` (a bar per metric and
condition, chance marked), and ``predictions.jsonl`` (one row per clip and condition).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from emollama.corpora import ADAPTERS, Clip, Corpus
from emollama.extract.perturb import PerturbSettings
from emollama.extract.registry import FACE_INPUTS, WAVEFORM
from emollama.extract.settings import meta
from emollama.pipeline.extraction import SettingsChanged, encoders_config, run_extract
from emollama.pipeline.features import (EvalError, EvalStores, adjusted_extract, check_encoders, extract_for_eval,
                                        extraction_config, feature_batcher, features_profile, guarded_extract)
from emollama.pipeline.scores import candidates, score_clips
from emollama.pipeline.subtitles import eval_subtitles
from emollama.train.checkpoint import write_json
from emollama.train.tiny import TINY_WARNING

log = logging.getLogger(__name__)

DEFAULT_CONDITIONS = ("full", "drop:each", "drop:face", "drop:voice", "drop:face+voice", "noise:10", "noise:0",
                      "blur:0.05", "no-subtitle")
DEFAULT_SNR_DB = 10.0
DEFAULT_BLUR = 0.05
GRAMMAR = ("full | drop:M[+M...] (M: a modality of the run, face, voice, or each) | noise[:SNR_DB] | "
           "blur[:FRACTION] | no-subtitle")
# the paper's modalities by input, for sets that record no extraction settings (imported)
PAPER_INPUTS = {"audio": WAVEFORM, "local": "face_frames", "temporal": "face_clip", "global": "frame"}
METRICS = (("closed_set", "accuracy", "closed-set accuracy"), ("closed_set", "uar", "closed-set UAR"),
           ("closed_set", "weighted_f1", "closed-set weighted F1"), ("generated", "accuracy", "generated accuracy"))


@dataclass(frozen=True)
class Condition:
    """One way of changing what the model sees: modalities zeroed, inputs perturbed, the subtitle left out."""

    name: str
    drop: tuple[str, ...] = ()                   # modalities whose features are zeros
    perturb: tuple[tuple[str, float], ...] = ()  # [extract.perturb] fields set
    subtitle: bool = True

    @property
    def settings(self) -> PerturbSettings:
        return PerturbSettings(**dict(self.perturb))

    def describe(self) -> str:
        parts = []
        if self.drop:
            parts.append(f"{', '.join(self.drop)} zeroed")
        for k, v in self.perturb:
            parts.append(f"audio noise at {v:g} dB SNR" if k == "audio_snr_db" else f"faces blurred (radius {v:g} "
                         "x face side)")
        if not self.subtitle:
            parts.append("no subtitle")
        return "; ".join(parts) or "nothing changed"

    def identity(self) -> tuple:
        return (tuple(sorted(self.drop)), self.perturb, self.subtitle)


def parse_conditions(specs: Sequence[str], inputs: Mapping[str, str]) -> list[Condition]:
    """The conditions named by ``specs`` (``GRAMMAR``; empty: ``DEFAULT_CONDITIONS``) for a run whose
    modalities read ``inputs`` (modality -> input kind). Every bad spec is listed at once; a condition
    equal to an earlier one is left out."""
    specs = list(specs) or list(DEFAULT_CONDITIONS)
    groups = {"face": [m for m, k in inputs.items() if k in FACE_INPUTS],
              "voice": [m for m, k in inputs.items() if k == WAVEFORM]}
    out: list[Condition] = []
    problems: list[str] = []
    for spec in specs:
        s = spec.strip().lower()
        head, _, arg = s.partition(":")
        try:
            if s == "full":
                out.append(Condition("full"))
            elif s == "no-subtitle":
                out.append(Condition("no-subtitle", subtitle=False))
            elif head == "drop" and arg == "each":
                out += [Condition(f"drop:{m}", drop=(m,)) for m in inputs]
            elif head == "drop" and arg:
                mods: list[str] = []
                for part in arg.split("+"):
                    if part in groups:
                        if not groups[part]:
                            raise ValueError(f"the run reads no {part} modality (it has {', '.join(inputs)})")
                        mods += groups[part]
                    elif part in inputs:
                        mods.append(part)
                    else:
                        raise ValueError(f"{part!r} is not a modality of the run ({', '.join(inputs)}), face, voice "
                                         "or each")
                out.append(Condition(s, drop=tuple(dict.fromkeys(mods))))
            elif head == "noise":
                snr = float(arg) if arg else DEFAULT_SNR_DB
                out.append(Condition(f"noise:{snr:g}", perturb=(("audio_snr_db", snr),)))
            elif head == "blur":
                frac = float(arg) if arg else DEFAULT_BLUR
                if not 0 < frac <= 1:
                    raise ValueError("the blur radius is a fraction of the face's side: above 0, at most 1")
                out.append(Condition(f"blur:{frac:g}", perturb=(("face_blur", frac),)))
            else:
                raise ValueError(f"expected {GRAMMAR}")
        except ValueError as e:
            why = str(e) if "could not convert" not in str(e) else f"{arg!r} is not a number"
            problems.append(f"--condition {spec}: {why}")
    if problems:
        raise EvalError("; ".join(problems))
    seen: set = set()
    unique = []
    for c in out:
        if c.identity() not in seen:
            seen.add(c.identity())
            unique.append(c)
    return unique


def perturbed_inputs(cond: Condition) -> set[str]:
    """The input kinds a condition's perturbation changes (what its value fields name)."""
    by_name = {f.name: f for f in fields(PerturbSettings)}
    return {kind for name, _ in cond.perturb for kind in meta(by_name[name])["inputs"]}


def modality_inputs(run, stores: EvalStores) -> dict[str, str]:
    """Modality -> the input kind its encoder reads, for the run's sets: from the extraction settings a set
    records (its encoder entry), else the paper's table (``PAPER_INPUTS``) for imported sets."""
    reader = stores.reader
    made = [k for k in run.feature_keys
            if reader is not None and k in reader.sets() and (reader.set_attrs(k).get("config") or {}).get("extract")]
    entries: dict[str, str] = {}
    for k in made:
        cfg = extraction_config(reader, [k])
        entries.update({e.name: e.input for e in encoders_config(cfg)})
    out = {}
    for k in run.feature_keys:
        m = run.specs[k].modality
        kind = entries.get(m, PAPER_INPUTS.get(m))
        if kind is None:
            raise EvalError(f"the set {run.specs[k].name} records no extraction settings and its modality {m!r} is "
                            "not one of the paper's: which input it reads is unknown, so it cannot be grouped")
        out[m] = kind
    return out


@dataclass
class Plan:
    """A condition and the sets it reads: run key -> the key of its perturbed set (noise, blur)."""

    cond: Condition
    keys: dict[str, str] = field(default_factory=dict)
    extracted: int = 0
    failed: list = field(default_factory=list)
    skipped: str | None = None   # why it is not scored


def plan_perturbed(run, stores: EvalStores, cond: Condition, clips: Sequence[Clip], inputs: Mapping[str, str],
                   corpus: Corpus, opts, say: Callable[[str], None]) -> Plan:
    """Extract the sets ``cond``'s perturbation changes for ``clips`` into the eval store (a rerun: nothing),
    with the run's recorded settings plus ``[extract.perturb]``, only by the encoders of those sets."""
    kinds = perturbed_inputs(cond)
    affected = [k for k in run.feature_keys if inputs[run.specs[k].modality] in kinds]
    if not affected:
        return Plan(cond, skipped="changes no input of the run's sets")
    if not opts.extract:
        return Plan(cond, skipped="its features must be extracted (run without --no-extract)")
    reader = stores.reader
    imported = [run.specs[k].name for k in affected if not (reader.set_attrs(k).get("config") or {}).get("extract")]
    if imported:
        return Plan(cond, skipped=f"the imported set(s) {imported} record no extraction settings to perturb")
    cfg = extraction_config(reader, affected, dataset=corpus.name if corpus.name in ADAPTERS else "folder",
                            root=corpus.root, workers=opts.workers, target=stores.cache_url,
                            target_options=stores.cache_options)
    cfg.extract = replace(adjusted_extract(cfg.extract, None, opts.missing_audio, opts.offline), perturb=cond.settings)
    check_encoders(cfg)
    views = sorted({run.specs[k].modality for k in affected})
    summary = guarded_extract(stores, lambda: run_extract(cfg, progress=opts.progress, clips=list(clips), views=views),
                              SettingsChanged)
    if summary.ok:
        say(f"{cond.name}: extracted {len(summary.ok)} clip(s) for {', '.join(views)} into {stores.cache_url} "
            f"({summary.wall:.1f} s)")
    return Plan(cond, {k: summary.keys[run.specs[k].name] for k in affected}, len(summary.ok), summary.failed)


@contextlib.contextmanager
def bound(run, stores: EvalStores, keys: Mapping[str, str]):
    """The run reading ``keys[k]`` (sets of the eval store) wherever it reads ``k``, for the block."""
    if not keys:
        yield
        return
    sets = stores.cache().sets()
    old = {k: run.specs[k] for k in keys}
    run.rebind(dict(keys), {k: sets[v] for k, v in keys.items()})
    try:
        yield
    finally:
        run.rebind({v: k for k, v in keys.items()}, {v: old[k] for k, v in keys.items()})


class Zeroed:
    """A feature batcher whose sets ``keys`` read as zeros (a dropped modality)."""

    def __init__(self, batcher, keys: Sequence[str]):
        self.batcher, self.zero = batcher, set(keys)
        self.keys = batcher.keys

    def __contains__(self, clip_id: str) -> bool:
        return clip_id in self.batcher

    def __call__(self, clip_ids: Sequence[str]) -> dict[str, Any]:
        feats = self.batcher(clip_ids)
        return {k: (v if k not in self.zero else
                    torch.zeros_like(v) if torch.is_tensor(v) else [torch.zeros_like(x) for x in v])
                for k, v in feats.items()}


def evaluate_conditions(run, stores: EvalStores, corpus: Corpus, opts, clips: list[Clip], split: str,
                        targets: list[str], label_map: dict[str, str], out: Path, scope: dict,
                        say: Callable[[str], None], t0: float) -> dict:
    """Every condition of ``opts.conditions`` on ``clips``; writes the report into ``out``."""
    inputs = modality_inputs(run, stores)
    conds = parse_conditions(opts.conditions, inputs)
    if opts.extract:
        extract_for_eval(stores, run, clips, corpus, opts, say)
    clips, subtitles = eval_subtitles(run, stores, clips, opts, corpus.name, corpus.root, say)   # the dataset's, else ASR text
    plans = [plan_perturbed(run, stores, c, clips, inputs, corpus, opts, say) if c.perturb else Plan(c)
             for c in conds]
    usable_ids: set[str] | None = None
    for p in plans:
        if p.skipped:
            say(f"condition {p.cond.name} not scored: {p.skipped}")
            continue
        with bound(run, stores, p.keys):
            _, usable, _ = feature_batcher(run, stores, clips)
        ids = {c.id for c in usable}
        usable_ids = ids if usable_ids is None else usable_ids & ids
    common = [c for c in clips if usable_ids and c.id in usable_ids]
    if not common:
        raise EvalError(f"none of the {len(clips)} clips has features under every condition (extract them first, "
                        "or name fewer conditions with --condition)")
    prompts = run.prompt_encoder(targets, opts.layout)
    ids, truth = [c.id for c in common], [c.label for c in common]
    rows, preds = [], []
    for p in plans:
        if p.skipped:
            continue
        with bound(run, stores, p.keys):
            batcher, usable, _ = feature_batcher(run, stores, common)
            zero = [k for k in run.feature_keys if run.specs[k].modality in p.cond.drop]
            seen = common if p.cond.subtitle else [replace(c, subtitle=None) for c in common]
            sc = score_clips(run, prompts, Zeroed(batcher, zero) if zero else batcher, seen, targets, label_map,
                             batch_size=opts.batch_size, generate_tokens=opts.max_new_tokens if opts.generate else None)
            feature_sets = {run.specs[k].name: k for k in run.feature_keys}
        rows.append({"name": p.cond.name, "description": p.cond.describe(), "drop": list(p.cond.drop),
                     "perturb": dict(p.cond.perturb), "subtitle": p.cond.subtitle, "n": len(common),
                     "feature_sets": feature_sets, "extracted": p.extracted, "failed": p.failed,
                     **sc.metrics(truth, targets, ids)})
        for i, cid in enumerate(ids):
            preds.append({"condition": p.cond.name, "id": cid, "label": truth[i], "closed_set": sc.closed[i],
                          "probabilities": dict(zip(targets, map(float, sc.probs[i]))),
                          "answer": sc.answers[i] if sc.answers else None, "parsed": sc.parsed[i] if sc.parsed else None})
    base = next((r for r in rows if r["name"] == "full"), None)
    for r in rows:
        r["delta_accuracy"] = (r["closed_set"]["accuracy"] - base["closed_set"]["accuracy"]) if base else None
    result = {"dataset": corpus.name, "split": split, "fold": opts.fold, "scope": scope, "run": str(run.path),
              "step": run.step, "profile": run.config.model.profile, "tiny": run.tiny,
              "feature_profile": features_profile(stores, run.feature_keys),
              "note": TINY_WARNING if run.tiny else None, "labels": targets, "candidates": candidates(targets, label_map),
              "chance": 1 / len(targets), "n": len(common), "missing": [c.id for c in clips if c.id not in usable_ids],
              "subtitles": subtitles.to_dict(), "conditions": rows, "skipped": [{"name": p.cond.name, "reason": p.skipped} for p in plans if p.skipped],
              "eval_store": stores.cache_url, "seconds": {"total": round(time.perf_counter() - t0, 3)},
              "out_dir": str(out),
              "files": ["metrics.json", "report.md", "conditions.csv", "conditions.png", "predictions.jsonl"]}
    write_report(result, out, preds)
    for line in condition_lines(result):
        say(line)
    return result


# ---------------------------------------------------------------------------------------------
# The report


def _columns(result: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    return [m for m in METRICS if any(m[0] in r for r in result["conditions"])]


def write_report(result: dict, out: Path, preds: Sequence[Mapping[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cols = _columns(result)
    with open(out / "conditions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["condition", "description", "n"] + [f"{m}_{k}" for m, k, _ in cols] + ["delta_accuracy"])
        for r in result["conditions"]:
            w.writerow([r["name"], r["description"], r["n"]] + [f"{r[m][k]:.4f}" for m, k, _ in cols]
                       + ["" if r["delta_accuracy"] is None else f"{r['delta_accuracy']:+.4f}"])
    with open(out / "predictions.jsonl", "w") as f:
        for p in preds:
            f.write(json.dumps(p) + "\n")
    conditions_png(result, out / "conditions.png")
    write_json(out / "metrics.json", result, sort_keys=False)
    (out / "report.md").write_text(conditions_markdown(result))


def conditions_png(result: Mapping[str, Any], path: Path) -> Path:
    """Grouped bars: each metric per condition, chance as a dashed line."""
    import matplotlib   # heavy: only when a report is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = result["conditions"], _columns(result)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(rows) + 4), 4.4))
    width = 0.8 / len(cols)
    for j, (m, k, title) in enumerate(cols):
        xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[m][k] for r in rows], width, label=title)
    ax.axhline(result["chance"], color="0.3", linestyle="--", linewidth=1, label=f"chance ({result['chance']:.2f})")
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    note = " (tiny random fixture: not a result)" if result.get("tiny") else ""
    ax.set_title(f"{result['dataset']} ({result['split']}), n={result['n']}: metrics per condition{note}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def conditions_markdown(result: Mapping[str, Any]) -> str:
    cols = _columns(result)
    lines = [f"# Robustness: {result['dataset']} ({result['split']})", ""]
    if result.get("note"):
        lines += [f"> **{result['note']}**", ""]
    lines += [f"Run `{result['run']}`, {result['n']} clips scored under every condition, chance "
              f"{result['chance']:.3f}. Dropped modalities read zeros; noise and blur were extracted into "
              f"`{result['eval_store']}` with `[extract.perturb]`.", "",
              "| condition | what changed | " + " | ".join(t for _, _, t in cols) + " | Δ accuracy |",
              "|---|---|" + "---|" * (len(cols) + 1)]
    for r in result["conditions"]:
        delta = "" if r["delta_accuracy"] is None else f"{r['delta_accuracy']:+.3f}"
        lines.append(f"| {r['name']} | {r['description']} | " + " | ".join(f"{r[m][k]:.3f}" for m, k, _ in cols)
                     + f" | {delta} |")
    for s in result["skipped"]:
        lines.append(f"\nNot scored: {s['name']}: {s['reason']}.")
    if result.get("missing"):
        lines.append(f"\nLeft out (no features under every condition): {len(result['missing'])}: "
                     + ", ".join(result["missing"][:10]))
    lines += ["", "![metrics per condition](conditions.png)", ""]
    return "\n".join(lines)


def condition_lines(result: Mapping[str, Any]) -> list[str]:
    """The table printed after ``eval --conditions``."""
    lines = ["NOTE: " + result["note"]] if result.get("note") else []
    lines.append(f"{result['dataset']} ({result['split']}): n={result['n']} clips under every condition, "
                 f"chance {result['chance']:.3f}")
    lines.append(f"{'condition':<18} {'accuracy':>8} {'UAR':>7} {'wF1':>7} {'delta':>7}  what changed")
    for r in result["conditions"]:
        c = r["closed_set"]
        delta = "" if r["delta_accuracy"] is None else f"{r['delta_accuracy']:+.3f}"
        lines.append(f"{r['name']:<18} {c['accuracy']:8.4f} {c['uar']:7.4f} {c['weighted_f1']:7.4f} {delta:>7}  "
                     f"{r['description']}")
    for s in result["skipped"]:
        lines.append(f"not scored: {s['name']}: {s['reason']}")
    lines.append(f"report: {Path(result['out_dir']) / 'report.md'} (closed set; generated in metrics.json)")
    return lines
