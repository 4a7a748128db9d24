"""Shared test settings: never touch a model hub; tiny models go to a per-session home."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("EMOLLAMA_HOME", tempfile.mkdtemp(prefix="emollama-test-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SAMPLES = (REPO.parent / "shared" / "samples" / "mer2023-examples").resolve()


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The ten real MER2023 clips beside the project; skip when absent (a user's clone has none)."""
    if not SAMPLES.is_dir() or not any(SAMPLES.glob("*.mp4")):
        pytest.skip(f"real sample clips not found at {SAMPLES}")
    return SAMPLES
