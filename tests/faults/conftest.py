"""A store the fault tests of training share: 8 synthetic clips extracted with the tiny profile."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, store): 8 clips of the synthetic sample (6 train, 2 test), every tiny set."""
    from emollama.extract.sample import write_sample
    from emollama.pipeline.cli import app

    tmp = tmp_path_factory.mktemp("faults-store")
    data = write_sample(tmp / "data", clips=8, seed=4)
    store = tmp / "store.zarr"
    res = CliRunner().invoke(app, ["extract", "--dataset", "merr", "--data", str(data), "--store", str(store),
                                   "--profile", "tiny", "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    return data, store
