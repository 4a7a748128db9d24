"""A tiny run for the tests that need one (serve, infer): imported as `from tiny_runs import tiny_run`
(tests/ is on the path through its conftest)."""

from __future__ import annotations

from pathlib import Path


def tiny_run(tmp: Path, *, clips: int = 8, seed: int = 2, features: tuple[str, ...] = ()) -> tuple[Path, Path, Path]:
    """(run, store, data): the synthetic sample (`clips`, `seed`) extracted with the tiny profile into
    ``tmp/store.zarr`` and a tiny run trained 2 steps on it into ``tmp/run`` (``features``: its -f sets)."""
    from typer.testing import CliRunner

    from emollama.extract.sample import write_sample
    from emollama.pipeline.cli import app

    runner = CliRunner()
    data = write_sample(tmp / "data", clips=clips, seed=seed)
    store, run = tmp / "store.zarr", tmp / "run"
    res = runner.invoke(app, ["extract", "--dataset", "merr", "--data", str(data), "--store", str(store),
                              "--profile", "tiny", "--workers", "0", "--no-progress"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["train", "--data", str(data), "--store", str(store), "--out", str(run),
                              "--profile", "tiny", "--steps", "2", "-b", "2", "--no-progress", "--json",
                              *[a for f in features for a in ("-f", f)]])
    assert res.exit_code == 0, res.output
    return run, store, data
