"""What the docs and messages say is what the code does: help texts keep their square brackets, `score`
and `eval` give one macro F1 whatever the label set lists, a predictions file naming a clip twice is
refused."""

from __future__ import annotations

import csv

import pytest
from typer.testing import CliRunner

from emollama.pipeline.cli import app

runner = CliRunner()


def test_help_texts_keep_their_square_brackets():
    out = runner.invoke(app, ["extract", "--help"]).output
    assert "[extract.encoders.*]" in out
    assert "[dataset] options" in runner.invoke(app, ["datasets", "--help"]).output
    assert "<run>/eval/<dataset>[-fold<k>][-<split>][-first<N>]/" in runner.invoke(app, ["eval", "--help"]).output


def _preds(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "label", "prediction"])
        w.writerows(rows)
    return path


def test_score_gives_one_macro_f1_whatever_the_label_set_lists(tmp_path):
    """`score --dataset merr` (nine labels) and the evaluated subset give the same macro F1: labels that no
    clip has and no answer names do not count (sklearn's default), as in eval's report."""
    import json

    from sklearn.metrics import f1_score

    rows = [("a", "happy", "happy"), ("b", "sad", "happy"), ("c", "angry", "angry"), ("d", "sad", "sad"),
            ("e", "happy", "worried")]
    pred = _preds(tmp_path / "p.csv", rows)
    full = json.loads(runner.invoke(app, ["score", "--pred", str(pred), "--dataset", "merr", "--json"]).output)
    sub = json.loads(runner.invoke(app, ["score", "--pred", str(pred), "--labels", "happy,sad,angry,worried",
                                         "--json"]).output)
    truth, guess = [r[1] for r in rows], [r[2] for r in rows]
    assert full["macro_f1"] == pytest.approx(sub["macro_f1"]) == pytest.approx(
        f1_score(truth, guess, average="macro", zero_division=0))
    assert len(full["labels"]) == 9 and full["weighted_f1"] == pytest.approx(sub["weighted_f1"])
