"""Reports: an evaluation's metrics.json, report.md, confusion-matrix PNGs and predictions CSVs; a training
run's loss plot.

An evaluation result is a plain dict (see ``pipeline.evaluation``); each labelled method in it
(``closed_set``: the likelihood of each label after the prompt; ``generated``: the label parsed from
the generated answer; ``public``: the public Emotion-LLaMA scorer on the generated answer, last word
and anything outside the labels counted as neutral) holds ``train.scoring.Metrics.to_dict()``. Figures use matplotlib's Agg backend.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .checkpoint import write_json

METHODS = {"closed_set": "closed set (label likelihood)", "generated": "generated answer, parsed",
           "public": "generated, public scorer"}


def confusion_png(confusion: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str) -> Path:
    """A confusion matrix (rows: truth, columns: prediction) with counts in the cells."""
    import matplotlib   # matplotlib: slow to import, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=float) if len(confusion) else np.zeros((len(labels), len(labels)))
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    rows = cm.sum(1, keepdims=True)
    shade = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)   # row-normalised colours
    ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if shade[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def summary_lines(result: Mapping[str, Any]) -> list[str]:
    """The short table printed after an eval."""
    where = result["dataset"] + (f" fold {result['fold']}" if result.get("fold") else "") + f" ({result['split']})"
    lines = []
    if result.get("note"):
        lines.append("NOTE: " + result["note"])
    lines.append(f"{where}: n={result['n']} clips, run {result['run']}")
    lines.append(f"{'method':<32} {'accuracy/WAR':>12} {'UAR':>7} {'wF1':>7} {'macroF1':>7} {'outside set':>11}")
    for key, title in METHODS.items():
        m = result.get(key)
        if not m:
            continue
        lines.append(f"{title:<32} {m['accuracy']:12.4f} {m['uar']:7.4f} {m['weighted_f1']:7.4f} "
                     f"{m['macro_f1']:7.4f} {m['unparsed']:11d}")
    if result.get("missing"):
        lines.append(f"not evaluated (no features): {len(result['missing'])}: {', '.join(result['missing'][:5])}")
    if result.get("out_dir"):
        lines.append(f"report: {Path(result['out_dir']) / 'report.md'}")
    return lines


def _per_class_table(m: Mapping[str, Any]) -> list[str]:
    lines = ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for lab in m["labels"]:
        p = m["per_class"][lab]
        lines.append(f"| {lab} | {p['precision']:.4f} | {p['recall']:.4f} | {p['f1']:.4f} | {p['support']} |")
    return lines


def write_report(result: dict, out_dir: Path, predictions: Sequence[Mapping[str, Any]] = ()) -> dict:
    """metrics.json, report.md, confusion-<method>.png and predictions-<method>.csv into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(result, out_dir=str(out_dir))
    figures = {}
    for key, title in METHODS.items():
        m = result.get(key)
        if not m:
            continue
        fig = f"confusion-{key.replace('_', '-')}.png"
        note = " (random tiny fixture)" if result.get("tiny") else ""
        confusion_png(m["confusion"], m["labels"], out_dir / fig, f"{result['dataset']}: {title}{note}")
        figures[key] = fig
    result["figures"] = figures
    result["has_predictions"] = bool(predictions)
    if predictions:
        for key, col in (("closed_set", "closed_set"), ("generated", "answer"), ("public", "public")):
            if key not in result:
                continue
            with open(out_dir / f"predictions-{key.replace('_', '-')}.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["name", "label", "prediction"])
                for p in predictions:
                    w.writerow([p["id"], p["label"], p.get(col) or ""])
        with open(out_dir / "predictions.jsonl", "w") as f:
            for p in predictions:
                f.write(json.dumps(p) + "\n")
    write_json(out_dir / "metrics.json", result, sort_keys=False)
    (out_dir / "report.md").write_text(report_markdown(result))
    return result


def report_markdown(result: Mapping[str, Any]) -> str:
    where = result["dataset"] + (f", fold {result['fold']}" if result.get("fold") else "")
    md = [f"# Evaluation: {where} ({result['split']} split)", ""]
    if result.get("note"):
        md += [f"> **{result['note']}**", ""]
    md += [f"- run: `{result['run']}` (step {result.get('step')}, profile {result.get('profile')})",
           f"- clips evaluated: {result['n']}; labels: {', '.join(result['labels'])}"]
    if result.get("label_map"):
        md.append("- label mapping (model label -> dataset label): "
                  + ", ".join(f"{a} -> {b}" for a, b in result["label_map"].items()))
    if result.get("zero_shot"):
        md.append(f"- zero-shot: the run was trained on {', '.join(result['train_labels'])}")
    if result.get("missing"):
        md.append(f"- not evaluated (no features in every set): {len(result['missing'])} "
                  f"({', '.join(result['missing'][:10])})")
    md.append(f"- generated answers: greedy, at most {result.get('max_new_tokens')} new tokens")
    if result.get("layout"):
        md.append(f"- prompt: style {result.get('prompt')}, evaluation layout {result['layout']}")
    if result.get("public"):
        md.append("- public scorer: the public evaluation script's rule (the last space-separated word of the "
                  "answer; anything outside the labels counts as neutral), for comparison with published numbers")
    methods = [(key, title, result[key]) for key, title in METHODS.items() if result.get(key)]
    if methods:
        md += ["", "| method | accuracy (WAR) | UAR | weighted F1 | macro F1 | answers outside the label set |",
               "|---|---|---|---|---|---|"]
        md += [f"| {title} | {m['accuracy']:.4f} | {m['uar']:.4f} | {m['weighted_f1']:.4f} | {m['macro_f1']:.4f} | "
               f"{m['unparsed']} |" for _, title, m in methods]
    for key, title in METHODS.items():
        m = result.get(key)
        if not m:
            continue
        md += ["", f"## {title}", ""] + _per_class_table(m)
        if key in result.get("figures", {}):
            md += ["", f"![confusion matrix, {title}]({result['figures'][key]})"]
        if m.get("unparsed_examples"):
            md += ["", f"Answers naming no label of the set ({m['unparsed']}, counted as wrong, never mapped):", ""]
            md += [f"- `{cid}`: {ans!r}" for cid, ans in m["unparsed_examples"][:20]]
    if result.get("emer"):
        e = result["emer"]
        md += ["", f"## EMER ({e['method']})", "",
               f"Clue Overlap {_fmt(e['clue_overlap'])}, Label Overlap {_fmt(e['label_overlap'])} (1-10) over "
               f"{e['n']} clips; invalid judgements: {len(e['invalid'])}."]
        if e["method"] == "lexical-proxy":
            md.append("These are lexical-proxy scores (word overlap), not the EMER judge's metric.")
    if result.get("files"):
        md += ["", f"Files: {', '.join(result['files'])}.", ""]
    else:
        preds = [f"predictions-{key.replace('_', '-')}.csv" for key, _, _ in methods]
        md += ["", f"Files: metrics.json, {', '.join(result.get('figures', {}).values()) or 'no figures'}, "
               + (f"{', '.join(preds)} (rescore with `emollama score --pred FILE`), predictions.jsonl."
                  if preds and result.get("has_predictions") else "no predictions."), ""]
    return "\n".join(md)


def fold_summary(folds: Mapping[int, Mapping[str, Any]]) -> dict:
    """UAR and WAR per fold and their mean over the folds, for each method."""
    out: dict[str, Any] = {"folds": {}, "mean": {}}
    for k, r in sorted(folds.items()):
        out["folds"][str(k)] = {key: {"uar": r[key]["uar"], "war": r[key]["accuracy"], "n": r[key]["n"]}
                                for key in METHODS if r.get(key)}
    for key in METHODS:
        vals = [r[key] for r in folds.values() if r.get(key)]
        if vals:
            out["mean"][key] = {"uar": sum(v["uar"] for v in vals) / len(vals),
                                "war": sum(v["accuracy"] for v in vals) / len(vals), "folds": len(vals)}
    return out


def fold_lines(summary: Mapping[str, Any], note: str | None = None) -> list[str]:
    lines = ["NOTE: " + note] if note else []
    lines.append(f"{'fold':<6} " + " ".join(f"{METHODS[k][:18]:>18} UAR/WAR" for k in summary["mean"]))
    for k, row in summary["folds"].items():
        lines.append(f"{k:<6} " + " ".join(f"{row[m]['uar']:>12.4f} / {row[m]['war']:.4f}" for m in summary["mean"]))
    lines.append(f"{'mean':<6} " + " ".join(f"{v['uar']:>12.4f} / {v['war']:.4f}" for v in summary["mean"].values()))
    return lines


def fold_markdown(summary: Mapping[str, Any], run: str, note: str | None) -> str:
    md = ["# Evaluation: DFEW, all folds", ""]
    if note:
        md += [f"> **{note}**", ""]
    md += [f"- run: `{run}`", "", "| fold | method | UAR | WAR | n |", "|---|---|---|---|---|"]
    for k, row in summary["folds"].items():
        for m, v in row.items():
            md.append(f"| {k} | {METHODS[m]} | {v['uar']:.4f} | {v['war']:.4f} | {v['n']} |")
    for m, v in summary["mean"].items():
        md.append(f"| mean of {v['folds']} | {METHODS[m]} | {v['uar']:.4f} | {v['war']:.4f} | |")
    md += ["", "Per-fold reports: `../dfew-fold<k>/report.md`.", ""]
    return "\n".join(md)


def loss_plot(history: list[dict], path: Path, title: str) -> None:
    """The training loss per optimizer step (and its moving mean) as a PNG, written atomically (``loss.png``)."""
    import matplotlib   # matplotlib: slow to import, only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps, loss = [h["step"] for h in history], [h["loss"] for h in history]
    ax.plot(steps, loss, lw=0.6, alpha=0.35, label="per step")
    w = max(1, min(50, len(loss) // 10))
    if w > 1:   # steps differ by task (length grouping): a moving average shows the trend
        avg = [sum(loss[max(0, i - w + 1):i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(loss))]
        ax.plot(steps, avg, lw=1.5, label=f"mean of {w}")
        ax.legend(fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
