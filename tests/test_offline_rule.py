"""Stage one and stage two read "offline" from the environment by the same rule (huggingface_hub's)."""

from __future__ import annotations

import pytest

from emollama.extract.sources import is_offline
from emollama.train.model import hub_offline


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("True", True), ("YES", True), ("on", True),
                                            ("0", False), ("", False), ("false", False), ("no", False),
                                            ("off", False)])
def test_extract_and_train_agree_on_offline(monkeypatch, var, value, expected):
    for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, value)
    assert is_offline() is expected and hub_offline() is expected
