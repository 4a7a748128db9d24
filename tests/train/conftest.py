"""Stores for the stage-two tests: the synthetic sample extracted with the tiny encoders (once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from emollama.extract.sample import write_sample
from emollama.pipeline.cli import app


def _extract(tmp: Path, clips: int, seed: int) -> tuple[Path, Path]:
    data = write_sample(tmp / "data", clips=clips, seed=seed)
    store = tmp / "store.zarr"
    res = CliRunner().invoke(app, ["extract", "--dataset", "merr", "--data", str(data), "--store", str(store),
                                   "--profile", "tiny", "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    return data, store


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> tuple[Path, Path]:
    """16 clips (12 train, 4 test): for the mechanics (resume, interop, DDP, NaN), not accuracy."""
    return _extract(tmp_path_factory.mktemp("train-small"), 16, 11)


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> tuple[Path, Path]:
    """120 clips (90 train, 30 test): enough held-out clips for an accuracy that means something."""
    return _extract(tmp_path_factory.mktemp("train-demo"), 120, 0)


def tiny_cfg(data_root: Path, store: Path, out: Path, **sections):
    """A tiny-profile config for tests; ``sections`` = {"optim": {...}, ...} overrides."""
    from emollama.train.config import load_train_config

    base = {
        "data": {"root": str(data_root), "store": str(store), "standardize": True},
        "model": {"profile": "tiny"},
        "lora": {"alpha": 64},
        "optim": {"lr": 3e-3, "min_lr": 1e-5, "warmup_steps": 2, "steps": 6, "batch_size": 4},
        "run": {"out": str(out), "save_every": 1000, "eval_every": 0, "seed": 7},
    }
    for sec, vals in sections.items():
        base.setdefault(sec, {}).update(vals)
    return load_train_config(None, base)


@pytest.fixture
def make_cfg():
    return tiny_cfg

