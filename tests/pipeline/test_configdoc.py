"""docs/config.md is written from the config dataclasses: it lists every key, and it is up to date."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from emollama.pipeline.config import Config
from emollama.pipeline.configdoc import render
from emollama.train.config import TrainConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_docs_config_md_is_up_to_date():
    assert DOC.read_text() == render(), "docs/config.md is out of date: run `make docs`"


def test_every_key_of_both_configs_is_documented():
    text = render()
    for root in (Config, TrainConfig):
        todo = [(f.name, f.default_factory()) for f in dataclasses.fields(root)]
        while todo:
            where, obj = todo.pop()
            assert f"### `[{where}]`" in text, where
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if dataclasses.is_dataclass(v):
                    todo.append((f"{where}.{f.name}", v))
                elif f.name != "encoders":
                    assert f"| `{f.name}` |" in text, f"{where}.{f.name}"
    assert '### `[extract.encoders.NAME]` with `encoder = "hf"`' in text
