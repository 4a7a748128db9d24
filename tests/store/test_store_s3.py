"""A store on an S3-compatible server (moto, loopback)."""

from __future__ import annotations


import numpy as np
import pytest

from emollama.store import FeatureStore
from store_helpers import FRAMES, UTT, stored, value

pytestmark = pytest.mark.s3


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
