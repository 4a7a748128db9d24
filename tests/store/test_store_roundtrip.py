"""Round trips, keys, records and failures."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from emollama.store import FeatureSpec, FeatureStore
from store_helpers import FRAMES, TOKENS, UTT, stored, value


@pytest.fixture
def st(tmp_path):
    return FeatureStore.open(tmp_path / "s.zarr")


def test_fixed_and_variable_round_trip_fp16(st):
    keys = {s.key: s for s in (UTT, FRAMES, TOKENS)}
    for s in keys.values():
        assert st.ensure_set(s) == s.key
    clips = [f"clip{i}" for i in range(7)]
    with st.writer() as w:
        for c in clips:
            w.add(c, {k: value(c, s) for k, s in keys.items()})  # fp32 in
    for k, s in keys.items():
        assert st.complete(k) == set(clips)
        got = st.read_many(clips[::-1] + clips[:2], k)  # any order, duplicates allowed
        for c, x in zip(clips[::-1] + clips[:2], got):
            assert x.dtype == np.float16
            np.testing.assert_array_equal(x, value(c, s).astype(np.float16))  # exactly fp16 rounding
    one = st.read("clip3", [FRAMES.name, TOKENS.key])
    assert one[FRAMES.key].shape == value("clip3", FRAMES).shape and one[TOKENS.key].shape == (1025, 48)


def test_fp32_kept_when_asked(st):
    spec = FeatureSpec("audio.fp32", "audio", "hubert", "sha256:00", "last", "mean", (1024,), dtype="float32")
    vspec = FeatureSpec("audio.fp32.frames", "audio", "hubert", "sha256:00", "last", "none", (None, 8), dtype="float32")
    k, kv = st.ensure_set(spec), st.ensure_set(vspec)
    x = np.random.default_rng(1).standard_normal(1024).astype(np.float32)
    y = np.random.default_rng(2).standard_normal((13, 8)).astype(np.float32)
    with st.writer() as w:
        w.add("a", {k: x, kv: y})
    got = st.read("a", [k, kv])
    assert got[k].dtype == np.float32 and np.array_equal(got[k], x)
    assert np.array_equal(got[kv], y)


def test_same_spec_same_key_different_param_new_set(st):
    a = FeatureSpec("v.mae", "local", "vitmae", "hub:facebook/vit-mae-base@abc", "last", "mean", (768,),
                    params={"frames": 8, "face": {"size": 224}})
    b = FeatureSpec("v.mae", "local", "vitmae", "hub:facebook/vit-mae-base@abc", "last", "mean", (768,),
                    params={"face": {"size": 224}, "frames": 8})  # same values, other order
    c = FeatureSpec("v.mae", "local", "vitmae", "hub:facebook/vit-mae-base@abc", "last", "mean", (768,),
                    params={"frames": 16, "face": {"size": 224}})
    assert a.key == b.key and a.key.startswith("v.mae-") and len(a.key) == len("v.mae-") + 12
    assert st.ensure_set(a) == st.ensure_set(b) == a.key
    assert st.ensure_set(c) != a.key
    assert set(st.sets()) == {a.key, c.key}
    assert FeatureSpec.from_dict(a.to_dict()) == a
    # a name shared by two sets no longer resolves; keys always do
    with pytest.raises(KeyError, match="ambiguous"):
        st.resolve("v.mae")
    assert st.resolve(c.key) == c.key
    # the set's group carries name, spec, version and config
    st2 = FeatureStore.open(st.url, create=False)
    assert st2.sets()[a.key] == a
    attrs = st2.set_attrs(a.key)
    assert attrs["name"] == "v.mae" and attrs["spec"]["params"]["frames"] == 8 and attrs["version"]


def test_shape_and_dtype_errors_are_clear(st):
    k = st.ensure_set(UTT)
    w = st.writer()
    with pytest.raises(ValueError, match=r"shape \(512,\) does not match the spec \(1024,\)"):
        w.add("x", {k: np.zeros(512, np.float32)})
    with pytest.raises(KeyError, match="ensure_set"):
        w.add("x", {"no.such.set": np.zeros(3)})
    with pytest.raises(ValueError, match="only the first dimension"):
        FeatureSpec("bad", "a", "e", "w", "l", "p", (3, None))
    with pytest.raises(ValueError, match="JSON-able"):
        FeatureSpec("bad", "a", "e", "w", "l", "p", (3,), params={"x": object()})


def test_records_failures_and_superseding_success(st):
    k = st.ensure_set(UTT)
    with st.writer() as w:
        w.add("ok1", {k: value("ok1", UTT)}, {"source": "/v/ok1.mp4", "size": 10, "duration": 2.5})
        w.fail("bad1", "no audio stream", {"source": "/v/bad1.mp4"})
    assert st.failures() == {"bad1": "no audio stream"}
    recs = st.records()
    assert recs["ok1"]["status"] == "ok" and recs["ok1"]["duration"] == 2.5
    assert recs["bad1"] == {"source": "/v/bad1.mp4", "status": "failed", "reason": "no audio stream"}
    assert st.verify().ok  # failed clips are not required in every set
    with st.writer() as w:  # a later rerun succeeds
        w.add("bad1", {k: value("bad1", UTT)})
    assert st.failures() == {}
    assert st.records()["bad1"]["status"] == "ok" and "reason" not in st.records()["bad1"]
    assert st.records()["bad1"]["source"] == "/v/bad1.mp4"  # earlier fields kept
    # another process sees the same
    other = FeatureStore.open(st.url, create=False)
    assert other.records() == st.records() and other.complete(k) == {"ok1", "bad1"}


def test_writer_discards_on_exception_and_first_copy_wins(st):
    k = st.ensure_set(UTT)
    with pytest.raises(RuntimeError):
        with st.writer() as w:
            w.add("a", {k: value("a", UTT)})
            raise RuntimeError("boom")
    assert st.complete(k) == set()
    with st.writer() as w:
        w.add("a", {k: value("a", UTT)})
    with st.writer() as w:
        w.add("a", {k: np.zeros(1024, np.float32)})  # a later duplicate does not replace the first copy
    np.testing.assert_array_equal(st.read("a", [k])[k], stored("a", UTT))
    assert st.writer().commit() is None  # empty commit: no-op


def test_plain_zarr_sees_dimension_names_and_attrs(st):
    k, kv, kt = st.ensure_set(UTT), st.ensure_set(FRAMES), st.ensure_set(TOKENS, config={"run": "t1"})
    with st.writer() as w:
        for c in ("a", "b"):
            w.add(c, {k: value(c, UTT), kv: value(c, FRAMES), kt: value(c, TOKENS)})
    g = zarr.open_group(st.url, mode="r")
    assert g.attrs["emollama"]["format"] == 1
    sg = g["sets"][kt]
    assert sg.attrs["name"] == TOKENS.name and sg.attrs["config"] == {"run": "t1"}
    assert sg.attrs["spec"]["shape"] == [1025, 48]
    (seg,) = list(sg.array_keys())
    arr = sg[seg]
    assert arr.metadata.dimension_names == ("clip", "token", "feature")
    assert arr.attrs["clips"] == ["a", "b"] and arr.shape == (2, 1025, 48)
    varr = g["sets"][kv][seg]
    assert varr.metadata.dimension_names == ("row", "feature")
    off = varr.attrs["offsets"]
    np.testing.assert_array_equal(varr[off[1] : off[2]], stored("b", FRAMES))
    assert g["sets"][k][seg].metadata.dimension_names == ("clip", "feature")


def test_xarray_opens_a_segment(st):
    xr = pytest.importorskip("xarray")
    k = st.ensure_set(UTT)
    with st.writer() as w:
        w.add("a", {k: value("a", UTT)})
    (seg,) = [s for s in zarr.open_group(st.url, mode="r")["sets"][k].array_keys()]
    ds = xr.open_zarr(st.url, group=f"sets/{k}", consolidated=False, zarr_format=3)
    da = ds[seg]
    assert da.dims == ("clip", "feature") and da.attrs["clips"] == ["a"]
    np.testing.assert_array_equal(da.values[0], stored("a", UTT))


@pytest.mark.parametrize("shard_clips", [None, 3])
def test_direct_shard_reads_equal_zarr_reads(tmp_path, monkeypatch, shard_clips):
    """The local fast path (store/_fastread.py) returns exactly what zarr returns, across shards."""
    import emollama.store.segments as mod

    if shard_clips:  # force several shards per segment, the last one partial
        monkeypatch.setattr(mod, "SHARD_BYTES", shard_clips * 1025 * 48 * 2)
    st = FeatureStore.open(tmp_path / "s")
    specs = (UTT, FRAMES, TOKENS)
    for s in specs:
        st.ensure_set(s)
    clips = [f"c{i}" for i in range(10)]
    for part in (clips[:4], clips[4:]):
        with st.writer() as w:
            for c in part:
                w.add(c, {s.key: value(c, s) for s in specs})
    st.compact()
    assert st.fast_reads
    pick = ["c9", "c0", "c5", "c5", "c3"]
    for s in specs:
        fast = st.read_many(pick, s.key)
        assert st.segments.reader(s.key, st.locations(s.key)["c0"].segment) is not None  # the fast path applies
        st.fast_reads = False
        slow = st.read_many(pick, s.key)
        st.fast_reads = True
        for c, a, b in zip(pick, fast, slow):
            assert a.dtype == b.dtype and np.array_equal(a, b)
            np.testing.assert_array_equal(a, stored(c, s))


def test_store_pickles_to_a_reopened_store(st):
    import pickle

    k = st.ensure_set(UTT)
    with st.writer() as w:
        w.add("a", {k: value("a", UTT)})
    clone = pickle.loads(pickle.dumps(st))
    assert clone.url == st.url and clone.complete(k) == {"a"}
    np.testing.assert_array_equal(clone.read("a", [k])[k], stored("a", UTT))


def test_all_zero_rows_round_trip(tmp_path):
    """Zeros are real values (HuBERT of silence can be exactly zero): their chunks are written."""
    st = FeatureStore.open(tmp_path / "z.zarr")
    k = st.ensure_set(UTT)
    with st.writer() as w:
        w.add("silent", {k: np.zeros(UTT.shape, np.float32)})
    again = FeatureStore.open(tmp_path / "z.zarr", create=False)
    np.testing.assert_array_equal(again.read("silent", [k])[k], np.zeros(UTT.shape, np.float16))
    assert again.verify().ok
