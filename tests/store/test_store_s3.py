"""A store on an S3-compatible server (moto, loopback)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from store import FeatureStore
from store_helpers import FRAMES, UTT, stored, value

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def s3_endpoint():
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
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        mp.setenv(k, v)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="feats")
    yield endpoint
    mp.undo()
    server.stop()


def test_write_read_verify_compact_through_s3_url(s3_endpoint, tmp_path):
    opts = {"endpoint_url": s3_endpoint, "key": "x", "secret": "x"}
    st = FeatureStore.open("s3://feats/x", storage_options=opts)
    ku, kf = st.ensure_set(UTT), st.ensure_set(FRAMES)
    clips = [f"c{i}" for i in range(12)]
    for part in (clips[:6], clips[6:]):
        with st.writer() as w:
            for c in part:
                w.add(c, {ku: value(c, UTT), kf: value(c, FRAMES)}, {"source": f"/v/{c}.mp4"})
    other = FeatureStore.open("s3://feats/x", create=False, storage_options=opts)
    assert other.complete(ku) == set(clips) and other.complete(kf) == set(clips)
    for c, x in zip(clips, other.read_many(clips, kf)):
        np.testing.assert_array_equal(x, stored(c, FRAMES))
    assert other.verify().ok
    assert other.remove(["c0"], [kf]) == 1
    r = other.compact()
    assert r["compacted"] == 3 and r["files_after"] < r["files_before"]
    st.refresh()
    assert st.complete(kf) == set(clips) - {"c0"}
    np.testing.assert_array_equal(st.read("c5", [ku])[ku], stored("c5", UTT))
    rep = st.verify()
    assert not rep.ok and "missing: c0" in rep.problems[0]  # removed from one set only
    info = st.info()
    assert info["clips"] == 12 and info["bytes"] > 0
