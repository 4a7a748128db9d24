"""`emollama score`: the project's metrics for any predictions file (other systems included)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from store.datasets import DFEW_LABELS, MER2023_LABELS, MERR_LABELS

LABEL_SETS = {"mer2023": MER2023_LABELS, "merr": MERR_LABELS,
              "dfew": tuple(DFEW_LABELS[i] for i in sorted(DFEW_LABELS))}


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
        from train.scoring import classification_metrics, read_predictions

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
