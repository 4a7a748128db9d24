"""Progress bars only where someone watches: the default follows whether stderr is a terminal."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import emollama.pipeline.cli as cli
import emollama.pipeline.extraction as extraction
import emollama.train.loop as loop

runner = CliRunner()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("tty,flag,expect", [(False, [], False), (True, [], True),
                                             (False, ["--progress"], True), (True, ["--no-progress"], False)])
def test_extract_and_train_show_bars_only_on_a_terminal(monkeypatch, tmp_path, tty, flag, expect):
    seen = {}

    def fake_extract(cfg, *, progress, limit=None):
        seen["extract"] = progress
        raise _Stop

    def fake_train(cfg, *, progress, **kw):
        seen["train"] = progress
        raise _Stop

    monkeypatch.setattr(cli, "on_terminal", lambda: tty)  # CliRunner swaps sys.stderr itself
    monkeypatch.setattr(extraction, "run_extract", fake_extract)
    monkeypatch.setattr(loop, "train", fake_train)
    (tmp_path / "data").mkdir()
    res = runner.invoke(cli.app, ["extract", "--dataset", "folder", "--data", str(tmp_path / "data"),
                                  "--store", str(tmp_path / "s.zarr"), *flag])
    assert isinstance(res.exception, _Stop), res.output
    toml = tmp_path / "t.toml"
    toml.write_text(f'[data]\nroot = "{tmp_path / "data"}"\nstore = "{tmp_path / "s.zarr"}"\n'
                    f'features = ["audio.hubert.mean"]\n[model]\nprofile = "tiny"\n[run]\nout = "{tmp_path / "r"}"\n')
    res = runner.invoke(cli.app, ["train", "-c", str(toml), *flag])
    assert isinstance(res.exception, _Stop), res.output
    assert seen == {"extract": expect, "train": expect}
