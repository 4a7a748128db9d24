"""Metrics agree with sklearn; answers are parsed, never silently mapped to a class."""

import io

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, \
    precision_recall_fscore_support

from emollama.train.scoring import classification_metrics, parse_label, read_predictions

LABELS = ["neutral", "angry", "happy", "sad", "worried", "surprise"]


def check_against_sklearn(y_true, y_pred, labels):
    m = classification_metrics(y_true, y_pred, labels)
    assert m.accuracy == pytest.approx(accuracy_score(y_true, y_pred))
    assert m.weighted_f1 == pytest.approx(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0))
    # macro F1 over the classes in the truth or the predictions: sklearn's default label set
    assert m.macro_f1 == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    for i, lab in enumerate(labels):
        assert m.per_class[lab]["precision"] == pytest.approx(p[i])
        assert m.per_class[lab]["recall"] == pytest.approx(r[i])
        assert m.per_class[lab]["f1"] == pytest.approx(f[i])
        assert m.per_class[lab]["support"] == s[i]
    assert m.confusion == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    present = sorted(set(y_true))
    if set(y_pred) <= set(y_true):   # sklearn's balanced accuracy warns and differs otherwise
        assert m.uar == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m.uar == pytest.approx(np.mean([m.per_class[c]["recall"] for c in present]))
    return m


@pytest.mark.parametrize("seed", range(5))
def test_random_data_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = list(rng.choice(LABELS, 200))
    y_pred = [t if rng.random() < 0.6 else rng.choice(LABELS) for t in y_true]
    check_against_sklearn(y_true, y_pred, LABELS)


def test_edge_cases_match_sklearn():
    # a class never predicted
    check_against_sklearn(["happy", "sad", "sad", "angry"], ["happy", "happy", "happy", "angry"], LABELS)
    # a class absent from the truth (but predicted)
    m = check_against_sklearn(["happy", "happy", "sad"], ["happy", "worried", "sad"], LABELS)
    assert m.per_class["worried"]["support"] == 0 and m.uar == pytest.approx((0.5 + 1.0) / 2)
    # a single class
    m = check_against_sklearn(["sad"] * 4, ["sad"] * 4, ["sad"])
    assert m.accuracy == m.weighted_f1 == m.uar == 1.0


def test_answers_outside_the_label_set_are_counted_not_mapped():
    m = classification_metrics(["happy", "sad", "angry"], ["happy", None, "angry"], LABELS, ids=["a", "b", "c"])
    assert m.unparsed == [("b", "")] and m.accuracy == pytest.approx(2 / 3)
    assert sum(map(sum, m.confusion)) == 2            # never counted as "neutral"
    with pytest.raises(ValueError, match="not in the label set"):
        classification_metrics(["bored"], ["happy"], LABELS)


@pytest.mark.parametrize("answer, label", [
    ("Happy.", "happy"), ("ANGRY!", "angry"), ("surprised", "surprise"), ("She looks anxious", "worried"),
    ("The person is not sad; rather, she is joyful.", "happy"), ("  sadness  ", "sad"),
    ("I cannot tell.", None), ("happily", None), ("bored", None),
])
def test_parse_label_handles_case_punctuation_synonyms(answer, label):
    assert parse_label(answer, LABELS) == label


def test_read_predictions_parses_free_text():
    text = io.StringIO("name,label,prediction\na,happy,Happy!\nb,Sad,she seems upset\nc,angry,no idea\n")
    ids, truth, pred, raw = read_predictions(text, labels=LABELS)
    assert ids == ["a", "b", "c"] and truth == ["happy", "sad", "angry"] and pred == ["happy", "sad", None]
    assert raw[2] == "no idea"


def test_score_command_reads_any_predictions_file(tmp_path):
    import json

    from typer.testing import CliRunner

    from emollama.pipeline.cli import app

    f = tmp_path / "pred.csv"
    f.write_text("name,label,prediction\na,happy,happy\nb,sad,Sadness.\nc,angry,I am not sure\nd,fear,afraid\n")
    r = CliRunner().invoke(app, ["score", "--pred", str(f), "--dataset", "dfew", "--json"])
    assert r.exit_code == 0, r.output
    m = json.loads(r.output)
    assert m["n"] == 4 and m["accuracy"] == 0.75 and m["unparsed"] == 1
    assert m["unparsed_examples"] == [["c", "I am not sure"]]
    r = CliRunner().invoke(app, ["score", "--pred", str(f), "--dataset", "mer2023"])
    assert r.exit_code == 2 and "not in the label set" in r.output      # 'fear' is not a MER2023 label
