"""Shared test settings: never touch a model hub; tiny models go to a per-session home."""

import os
import socket
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


@pytest.fixture(scope="session")
def s3_endpoint():
    """An S3-compatible server (moto) on loopback with a bucket `feats`; skip when moto is absent."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                 aws_secret_access_key="x").create_bucket(Bucket="feats")
    yield endpoint
    server.stop()

