"""The demo recipe learns: on 120 synthetic clips (30 held out), closed-set accuracy far above chance.

The tiny profile is a random fixture; what is learnt is what the tiny random encoders' features carry
(logistic regression on the same features: ~0.5-0.7 held-out). Chance is 1/6."""

import json
from pathlib import Path

import pytest

from emollama.train.config import load_train_config
from emollama.train.loop import train

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_stage1_recipe_reaches_far_above_chance(demo_store, tmp_path):
    data, store = demo_store
    cfg = load_train_config(REPO / "configs" / "demo-stage1.toml",
                            {"data": {"root": str(data), "store": str(store)},
                             "run": {"out": str(tmp_path / "stage1"), "eval_every": 0, "save_every": 10_000}})
    res = train(cfg)
    m = json.loads((tmp_path / "stage1" / "metrics.json").read_text())
    assert m["n"] == 30 and abs(m["chance"] - 1 / 6) < 1e-9
    assert m["accuracy"] >= 0.4, m          # chance 0.167; P(>= 12/30 right by chance) < 0.002
    assert m["weighted_f1"] >= 0.3
    first = sum(h["loss"] for h in res.history[:44]) / 44     # two epochs, both tasks
    last = sum(h["loss"] for h in res.history[-44:]) / 44
    assert last < 0.8 * first
    assert (tmp_path / "stage1" / "loss.png").stat().st_size > 1000
