"""`emollama score`: the project's metrics for any predictions file (other systems included)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from emollama.corpora import ADAPTERS, DFEW_FOLDS

LABEL_SETS = {name: a.labels for name, a in ADAPTERS.items() if a.labels}   # the datasets' declared label sets


def register(app: typer.Typer) -> None:
    @app.command()
    def score(
        pred: Path = typer.Option(..., "--pred", exists=True, dir_okay=False,
                                  help="CSV with columns name,label,prediction (a label or a free-text answer)."),
        dataset: str = typer.Option("mer2023", "--dataset", help="Label set: mer2023 | merr | dfew."),
        labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated label set (overrides --dataset)."),
        as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
    ) -> None:
        """Score a predictions file: accuracy (WAR), weighted F1, macro F1, UAR, per-class scores and
        the confusion matrix. Answers naming no label of the set are counted and listed, never mapped."""
        from emollama.train.scoring import classification_metrics, read_predictions

        if labels:
            label_set = tuple(x.strip().lower() for x in labels.split(",") if x.strip())
        elif dataset in LABEL_SETS:
            label_set = LABEL_SETS[dataset]
        else:
            typer.echo(f"error: unknown --dataset {dataset!r}; use {', '.join(LABEL_SETS)} or --labels", err=True)
            raise typer.Exit(2)
        try:
            ids, truth, parsed, raw = read_predictions(pred, labels=label_set)
        except ValueError as e:
            typer.echo(f"error: {pred}: {e}", err=True)
            raise typer.Exit(2)
        m = classification_metrics(truth, parsed, label_set, ids=ids)
        m.unparsed = [(cid, raw[ids.index(cid)]) for cid, _ in m.unparsed]
        if as_json:
            typer.echo(json.dumps(m.to_dict(), indent=2))
        else:
            typer.echo(m.table())
            for cid, answer in m.unparsed[:10]:
                typer.echo(f"outside the label set: {cid}: {answer!r}")

    app.command("eval")(eval_cmd)
    app.command("infer")(infer_cmd)


def _fail(e: Exception, code: int = 2) -> None:
    from emollama.pipeline.evaluation import EvalStorageError

    if isinstance(e, EvalStorageError):
        code = 4          # a storage error: the eval store cannot be written
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(code)


CACHE_HELP = ("Where clips missing from the training store are extracted (default: <run>/eval-store.zarr). "
              "The training store (--store, default the run's) is only read, never written; reruns reuse "
              "what this store holds.")


def eval_cmd(
    run: Path = typer.Option(..., "--run", help="A run folder (the --out of `emollama train`)."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="mer2023 | merr | dfew | emer"),
    data: str = typer.Option(..., "--data", help="The corpus folder (emer: the CSV name,chinese,english or its folder)."),
    store: Optional[str] = typer.Option(None, "--store", "-s", help="Feature store to read (default: the run's); "
                                        "never written."),
    cache_store: Optional[str] = typer.Option(None, "--cache-store", help=CACHE_HELP),
    split: str = typer.Option("test", "--split", help="The split to evaluate."),
    fold: Optional[int] = typer.Option(None, "--fold", help="DFEW fold 1-5."),
    all_folds: bool = typer.Option(False, "--all-folds", help="DFEW: each of the five folds, then their mean."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N labelled clips of the split."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated label set to evaluate over "
                                         "(default: the corpus labels the run knows or the clips carry)."),
    label_map: Optional[List[str]] = typer.Option(None, "--label-map", help="FROM=TO: the model's label FROM counts "
                                                  "as the dataset's TO (repeat; e.g. worried=fear)."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help="Generated tokens for the emotion answer."),
    reason_tokens: int = typer.Option(96, "--reason-tokens", help="Generated tokens for EMER reasoning texts."),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Clips per forward pass."),
    workers: int = typer.Option(0, "--workers", "-w", help="Extraction of missing clips: 0 = in this process."),
    extract: bool = typer.Option(True, "--extract/--no-extract", help="Extract clips missing from the store "
                                 "(into --cache-store)."),
    generate: bool = typer.Option(True, "--generate/--no-generate", help="Also generate answers and parse them."),
    out: Optional[Path] = typer.Option(None, "--out", help="Reports here instead of <run>/eval/."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    judge_url: Optional[str] = typer.Option(None, "--judge-url", help="EMER judge: OpenAI-compatible base URL "
                                            "(env EMOLLAMA_JUDGE_URL)."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="EMER judge model (env EMOLLAMA_JUDGE_MODEL)."),
    layout: str = typer.Option("trained", "--layout", help="trained (the prompt as trained) | public-eval (the "
                               "public evaluation script's: all feature embeddings at <video>; emotion-llama runs)."),
    feature: Optional[List[str]] = typer.Option(None, "--feature", help="ROLE=SET: which store set feeds an imported "
                                                "run's ROLE (local, temporal, audio, global) where several could."),
    progress: bool = typer.Option(False, "--progress/--no-progress"),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Evaluate a trained run: MER2023 / MERR (weighted F1, accuracy, per class, confusion matrix),
    DFEW (UAR and WAR per fold and averaged), EMER (Clue / Label Overlap by an LLM judge, else a
    lexical proxy). Labels come three ways: closed set (label likelihoods), the parsed generated
    answer, and the public scorer on the generated answer (last word; outside the labels -> neutral). Reports go to <run>/eval/<dataset>[-fold<k>]/ (metrics.json, report.md, figures).
    Clips missing from the run's store are extracted with the settings of its feature sets into
    --cache-store (default <run>/eval-store.zarr); the run's store is only read. Exit status 4 when
    that store cannot be written."""
    from emollama.pipeline.evaluation import EvalError, EvalOptions, evaluate
    from emollama.corpora import DatasetError
    from emollama.train.checkpoint import CheckpointError
    from emollama.train.emer import JudgeError
    from emollama.train.model import MissingModelError
    from emollama.train.run import RunError

    if fold is not None and all_folds:
        _fail(ValueError("--fold and --all-folds exclude each other"))
    if fold is not None and fold not in DFEW_FOLDS:
        _fail(ValueError(f"--fold {fold}: DFEW folds are 1..5"))
    if dataset in ADAPTERS and ADAPTERS[dataset].folds and fold is None and not all_folds:
        fold = ADAPTERS[dataset].folds[0]
    opts = EvalOptions(run=str(run), dataset=dataset, data=data, store=store, split=split, fold=fold, limit=limit,
                       labels=[x for x in labels.split(",") if x.strip()] if labels else None,
                       label_map=list(label_map or []), max_new_tokens=max_new_tokens, reason_tokens=reason_tokens,
                       batch_size=batch_size, workers=workers, extract=extract, generate=generate,
                       out=str(out) if out else None, device=device, progress=progress,
                       judge_url=judge_url, judge_model=judge_model, layout=layout, features=list(feature or []),
                       cache_store=cache_store)
    say = (lambda s: None) if as_json else typer.echo
    try:
        res = evaluate(opts, say=say)
    except (EvalError, RunError, DatasetError, CheckpointError, MissingModelError, JudgeError,
            FileNotFoundError, KeyError) as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(res, indent=2, default=str))


def infer_cmd(
    clips: List[Path] = typer.Argument(..., help="Video files."),
    run: Path = typer.Option(..., "--run", help="A run folder (the --out of `emollama train`)."),
    store: Optional[str] = typer.Option(None, "--store", "-s", help="Feature store to read (default: the run's); "
                                        "never written."),
    cache_store: Optional[str] = typer.Option(None, "--cache-store", help=CACHE_HELP),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated label set (default: the run's)."),
    subtitle: Optional[str] = typer.Option(None, "--subtitle", help="What the person says (same for every clip)."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", help="Tokens of the reasoning text."),
    reason: bool = typer.Option(True, "--reason/--no-reason", help="Generate the reasoning text."),
    workers: int = typer.Option(0, "--workers", "-w", help="Extraction: 0 = in this process."),
    device: str = typer.Option("auto", "--device"),
    layout: str = typer.Option("trained", "--layout", help="trained | public-eval (see `emollama eval --help`)."),
    feature: Optional[List[str]] = typer.Option(None, "--feature", help="ROLE=SET for an imported run (repeat)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Label, probability of every label and reasoning text for any video, through exactly the
    features the run was trained on (extracted with its feature sets' settings into --cache-store,
    default <run>/eval-store.zarr; the run's store is only read). A path that is not a video file (a
    FIFO, a device, a folder without frames) fails on its own line; exit status 1 when any clip failed."""
    from emollama.pipeline.evaluation import EvalError, infer
    from emollama.corpora import DatasetError
    from emollama.train.checkpoint import CheckpointError
    from emollama.train.model import MissingModelError
    from emollama.train.run import RunError

    try:
        results = infer(run, clips, store=store, labels=[x for x in labels.split(",") if x.strip()] if labels else None,
                        subtitle=subtitle, max_new_tokens=max_new_tokens, workers=workers, device=device,
                        reason=reason, layout=layout, features=list(feature or []), cache_store=cache_store)
    except (EvalError, RunError, DatasetError, CheckpointError, MissingModelError, FileNotFoundError, KeyError) as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        if results and results[0].get("note"):
            typer.echo("NOTE: " + results[0]["note"])
        for r in results:
            typer.echo(f"{r['file']}  [{r['id']}]")
            if r["label"] is None:
                typer.echo(f"  failed: {r.get('error')}")
                continue
            typer.echo(f"  label: {r['label']}")
            typer.echo("  " + "  ".join(f"{k} {v:.3f}" for k, v in
                                        sorted(r["probabilities"].items(), key=lambda kv: -kv[1])))
            if r["reasoning"] is not None:
                typer.echo(f"  reasoning: {r['reasoning']}")
    if any(r["label"] is None for r in results):
        raise typer.Exit(1)
