"""FeatureStore.to_xarray: a whole set as one lazy array over every committed clip, equal to what readers read."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest

from emollama.store import FeatureDataset, FeatureStore
from store_helpers import FRAMES, TOKENS, UTT, stored, value

xr = pytest.importorskip("xarray")
dask_array = pytest.importorskip("dask.array")

SPECS = (UTT, FRAMES, TOKENS)


@pytest.fixture
def busy(tmp_path):
    """Several commits, a compaction, more commits after it, a clip removed from one set, a clip removed from
    every set, a clip overwritten (replace=True) and a later duplicate (ignored: the first copy wins)."""
    st = FeatureStore.open(tmp_path / "s")
    for s in SPECS:
        st.ensure_set(s)
    for j in range(3):
        with st.writer() as w:
            for i in range(4):
                c = f"c{j}{i}"
                w.add(c, {s.key: value(c, s) for s in SPECS})
    st.compact()
    for j in range(3, 5):
        with st.writer() as w:
            for i in range(3):
                c = f"c{j}{i}"
                w.add(c, {s.key: value(c, s) for s in SPECS})
    st.remove(["c01"], [FRAMES.key])
    st.remove(["c12"])
    with st.writer() as w:
        w.add("c20", {s.key: value("c20-new", s) for s in SPECS}, replace=True)
        w.add("c30", {UTT.key: np.zeros(UTT.shape, np.float32)})  # a duplicate: not the live copy
    return st


def _expected(st, key):
    clips = sorted(st.complete(key))
    return dict(zip(clips, st.read_many(clips, key)))


@pytest.mark.parametrize("spec", [UTT, TOKENS], ids=["vector", "tokens"])
def test_fixed_set_equals_read_many_and_dataset(busy, spec):
    st = busy
    da = st.to_xarray(spec.name)  # a unique name resolves, as read_many's does
    want = _expected(st, spec.key)
    assert sorted(da["clip"].values.tolist()) == sorted(want) and da.sizes["clip"] == len(want)
    assert "c12" not in want and "c20" in want
    assert da.dims == (("clip", "feature") if spec is UTT else ("clip", "token", "feature"))
    assert da.dtype == np.float16 and da.name == spec.name
    assert da.attrs["key"] == spec.key and da.attrs["encoder"] == spec.encoder and da.attrs["shape"] == list(spec.shape)
    got = da.compute()
    for c, x in want.items():
        np.testing.assert_array_equal(got.sel(clip=c).values, x)
    np.testing.assert_array_equal(got.sel(clip="c20").values, stored("c20-new", spec))  # the overwrite
    ds = FeatureDataset(st, [spec.key], in_memory=False)
    for item in (ds[i] for i in range(len(ds))):
        np.testing.assert_array_equal(item[spec.key].numpy(), got.sel(clip=item["id"]).values.astype(np.float32))
    assert set(ds.clip_ids) == set(want)


def test_variable_set_rows_by_clip_and_position(busy):
    st = busy
    da = st.to_xarray(FRAMES.key)
    want = _expected(st, FRAMES.key)
    assert "c01" not in want  # removed from this set only
    assert da.dims == ("row", "feature") and da.sizes["row"] == sum(len(x) for x in want.values())
    assert set(da["clip"].values.tolist()) == set(want)
    got = da.compute()
    for c, x in want.items():
        one = got.sel(clip=c)
        assert one.dims == ("position", "feature")
        np.testing.assert_array_equal(one["position"].values, np.arange(len(x)))
        np.testing.assert_array_equal(one.values, x)
    assert {c: len(g) for c, g in got.groupby("clip")} == {c: len(x) for c, x in want.items()}


def test_lazy_one_chunk_per_segment_run_and_nothing_read_until_computed(busy, monkeypatch):
    st = busy
    calls = []
    read_many = st.read_many
    monkeypatch.setattr(st, "read_many", lambda clips, key: calls.append(list(clips)) or read_many(clips, key))
    da = st.to_xarray(UTT.key)
    assert isinstance(da.data, dask_array.Array) and calls == []
    # live clips sit in the compacted segment, the two later ones and the overwrite's: one chunk each
    segs = {cp.segment for cp in st.locations(UTT.key).values()}
    assert len(da.data.chunks[0]) == len(segs) == 4
    one = da.sel(clip="c41").values
    np.testing.assert_array_equal(one, stored("c41", UTT))
    assert len(calls) == 1 and "c41" in calls[0] and len(calls[0]) <= 3  # only that chunk's clips were read
    da.values
    assert sorted(c for part in calls[1:] for c in part) == sorted(st.complete(UTT.key))


def test_view_survives_a_compaction_and_pickles(busy):
    st = busy
    da = st.to_xarray(FRAMES.key)
    want = _expected(st, FRAMES.key)
    st.compact(full=True)  # the old segments are deleted at once: reads follow the clips to the new one
    again = pickle.loads(pickle.dumps(da))  # a dask worker's copy: the store reopens by its URL
    for view in (da, again):
        got = view.compute()
        for c, x in want.items():
            np.testing.assert_array_equal(got.sel(clip=c).values, x)


def test_empty_set_and_errors(tmp_path, monkeypatch):
    st = FeatureStore.open(tmp_path / "s")
    st.ensure_set(UTT)
    st.ensure_set(FRAMES)
    empty = st.to_xarray(UTT.key)
    assert empty.shape == (0, 1024) and empty.compute().shape == (0, 1024)
    assert st.to_xarray(FRAMES.key).shape == (0, 32)
    with pytest.raises(KeyError, match="no feature set 'nope'"):
        st.to_xarray("nope")
    monkeypatch.setitem(sys.modules, "xarray", None)  # as if xarray were not installed
    with pytest.raises(ImportError, match="pip install xarray"):
        st.to_xarray(UTT.key)
