"""verify() and `emollama store verify`: corrupted chunks, missing clips; remove()."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from emollama.pipeline.cli_store import store_app
from emollama.store import FeatureStore
from store_helpers import FRAMES, UTT, stored, value

runner = CliRunner()


def _fill(st, clips, specs=(UTT, FRAMES)):
    keys = {st.ensure_set(s): s for s in specs}
    with st.writer() as w:
        for c in clips:
            w.add(c, {k: value(c, s) for k, s in keys.items()})
    return list(keys)


def test_clean_store_verifies_and_cli_exits_zero(tmp_path):
    st = FeatureStore.open(tmp_path / "s")
    _fill(st, ["a", "b", "c"])
    rep = st.verify()
    assert rep.ok and rep.problems == [] and rep.checked_segments == 2 and rep.checked_clips == 3
    res = runner.invoke(store_app, ["verify", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    assert "store OK" in res.output


def test_verify_catches_a_corrupted_chunk(tmp_path):
    st = FeatureStore.open(tmp_path / "s")
    ku, kf = _fill(st, [f"c{i}" for i in range(40)])
    shards = sorted((tmp_path / "s" / "sets" / kf).rglob("c/*/*"))
    assert len(shards) == 1 and shards[0].is_file()
    raw = bytearray(shards[0].read_bytes())
    mid = len(raw) // 3
    raw[mid : mid + 16] = bytes(16)  # overwrite bytes inside a chunk (not the shard index at the end)
    shards[0].write_bytes(bytes(raw))
    rep = FeatureStore.open(tmp_path / "s", create=False).verify()
    assert not rep.ok
    assert len(rep.problems) == 1 and kf in rep.problems[0] and "do not decode" in rep.problems[0]
    res = runner.invoke(store_app, ["verify", str(tmp_path / "s")])
    assert res.exit_code == 1 and "do not decode" in res.output
    # readers refuse the damaged chunk too (checksums), instead of returning wrong values
    reader = FeatureStore.open(tmp_path / "s", create=False)
    with pytest.raises(ValueError, match="checksum"):
        reader.read_many([f"c{i}" for i in range(40)], kf)
    np.testing.assert_array_equal(reader.read("c1", [ku])[ku], stored("c1", UTT))  # other sets unharmed
    # a deleted data file is caught too (zarr alone would read it as zeros)
    shards[0].unlink()
    rep = FeatureStore.open(tmp_path / "s", create=False).verify(deep=False)
    assert not rep.ok and "0 data file(s) where 1 are expected" in rep.problems[0]


def test_verify_catches_a_clip_missing_from_one_set(tmp_path):
    st = FeatureStore.open(tmp_path / "s")
    ku, kf = _fill(st, ["a", "b"])
    with st.writer() as w:
        w.add("c", {ku: value("c", UTT)})  # c never gets its frames
    rep = st.verify()
    assert not rep.ok and len(rep.problems) == 1
    assert kf in rep.problems[0] and "1 clip(s) missing: c" in rep.problems[0]
    res = runner.invoke(store_app, ["verify", str(tmp_path / "s")])
    assert res.exit_code == 1 and "missing: c" in res.output
    with st.writer() as w:
        w.add("c", {kf: value("c", FRAMES)})
    assert st.verify().ok
    assert runner.invoke(store_app, ["verify", str(tmp_path / "s")]).exit_code == 0


def test_remove_one_clip_from_one_set_then_rewrite(tmp_path):
    st = FeatureStore.open(tmp_path / "s")
    ku, kf = _fill(st, ["a", "b", "c"])
    assert st.remove(["b"], [FRAMES.name]) == 1
    assert st.complete(kf) == {"a", "c"} and st.complete(ku) == {"a", "b", "c"}
    with pytest.raises(KeyError, match="not complete"):
        st.read("b", [kf])
    rep = st.verify()
    assert not rep.ok and "missing: b" in rep.problems[0]
    # another process agrees
    assert FeatureStore.open(st.url, create=False).complete(kf) == {"a", "c"}
    with st.writer() as w:  # a rerun recomputes it
        w.add("b", {kf: value("b", FRAMES) * 2})
    assert st.verify().ok
    np.testing.assert_array_equal(st.read("b", [kf])[kf], (value("b", FRAMES) * 2).astype(np.float16))
    # removing from every set forgets the clip: gone from sets and records, verify stays clean
    assert st.remove(["a"]) == 1
    assert "a" not in st.complete(ku) and "a" not in st.complete(kf) and "a" not in st.records()
    assert st.verify().ok
    assert st.remove(["zzz"]) == 0


def test_cli_ls_info_rm_and_help(tmp_path):
    url = str(tmp_path / "s")
    st = FeatureStore.open(url)
    ku, kf = _fill(st, ["a", "b"])
    with st.writer() as w:
        w.fail("x", "no face found")
    out = runner.invoke(store_app, ["ls", url]).output
    assert len(out.strip().splitlines()) == 2 and ku in out and kf in out
    import json

    res = runner.invoke(store_app, ["info", url, "--json"])
    d = json.loads(res.output)
    assert d["clips"] == 3 and d["failures"] == 1 and d["failed"] == {"x": "no face found"}
    assert {s["key"]: s["clips"] for s in d["sets"]} == {ku: 2, kf: 2} and d["bytes"] > 0 and d["files"] > 0
    assert "no face found" in runner.invoke(store_app, ["info", url]).output
    res = runner.invoke(store_app, ["rm", url, "--clip", "a", "--set", UTT.name])
    assert res.exit_code == 0 and "removed 1" in res.output
    assert FeatureStore.open(url, create=False).complete(ku) == {"b"}
    for cmd in ("ls", "info", "verify", "import", "export", "rm", "compact"):
        h = runner.invoke(store_app, [cmd, "--help"])
        assert h.exit_code == 0 and "Usage" in h.output
    bad = runner.invoke(store_app, ["info", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "no feature store" in bad.output
