"""`store compare` / store.compare.compare_sets: per-clip cosine between two sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from emollama.pipeline.cli_store import store_app
from emollama.store import FeatureSpec, FeatureStore
from emollama.store.compare import compare_sets, format_comparison

A = FeatureSpec("local.test.mean", "local", "vitmae", "sha256:00", "last", "mean", (16,), dtype="float32")
B = FeatureSpec("local.test.released", "local", "released:x", "authors:x", "unknown", "mean", (16,), dtype="float32")
FRAMES = FeatureSpec("local.test.frames", "local", "vitmae", "sha256:00", "last", "none", (None, 16), dtype="float32")
WIDE = FeatureSpec("local.test.wide", "local", "vitmae", "sha256:00", "last", "mean", (32,), dtype="float32")


def _vec(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(16).astype(np.float32)


def _fill(st: FeatureStore, spec: FeatureSpec, values: dict[str, np.ndarray]) -> str:
    key = st.ensure_set(spec)
    with st.writer() as w:
        for c, x in values.items():
            w.add(c, {key: x})
    return key


@pytest.fixture
def two_sets(tmp_path):
    """A: c00..c11; B: the same vectors for c00..c10 except c05 negated and c07 scaled, plus only_b."""
    st = FeatureStore.open(tmp_path / "s")
    a = {f"c{i:02d}": _vec(i) for i in range(12)}
    b = {c: x.copy() for c, x in a.items() if c != "c11"}
    b["c05"] = -b["c05"]
    b["c07"] = 3.0 * b["c07"]  # same direction: cosine 1
    b["only_b"] = _vec(99)
    _fill(st, A, a)
    _fill(st, B, b)
    return st


def test_compare_known_vectors(two_sets):
    st = two_sets
    r = compare_sets(st, A.name, st, B.key, worst=3, per_clip=True)
    assert r["a"]["key"] == A.key and r["b"]["name"] == B.name
    assert (r["n_common"], r["only_a"], r["only_b"], r["undefined"]) == (11, 1, 1, 0)
    assert r["worst"][0]["clip"] == "c05" and r["worst"][0]["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert len(r["worst"]) == 3 and all(w["cosine"] == pytest.approx(1.0, abs=1e-6) for w in r["worst"][1:])
    assert r["cosine"]["min"] == pytest.approx(-1.0, abs=1e-6)
    assert r["cosine"]["median"] == pytest.approx(1.0, abs=1e-6)
    assert r["cosine"]["mean"] == pytest.approx((10 - 1) / 11, abs=1e-6)
    assert r["per_clip"]["c07"] == pytest.approx(1.0, abs=1e-6)
    assert set(r["per_clip"]) == {f"c{i:02d}" for i in range(11)}
    # a set against itself: every cosine 1, store_b None means the same store; batches smaller than the set
    same = compare_sets(st, A.key, None, A.name, worst=0, batch=5)
    assert (same["n_common"], same["only_a"], same["only_b"], same["worst"]) == (12, 0, 0, [])
    assert same["cosine"]["min"] == pytest.approx(1.0, abs=1e-6)
    text = format_comparison(r)
    assert "common 11" in text and "only in A 1" in text and "c05" in text.splitlines()[-3]


def test_compare_variable_time_mean_and_zero_vectors(tmp_path):
    st = FeatureStore.open(tmp_path / "s")
    frames = {f"c{i}": np.random.default_rng(i).standard_normal((3 + i, 16)).astype(np.float32) for i in range(4)}
    means = {c: x.mean(axis=0) for c, x in frames.items()}
    means["c2"] = np.zeros(16, np.float32)  # no direction: no cosine, listed first
    _fill(st, FRAMES, frames)
    _fill(st, A, means)
    r = compare_sets(st, FRAMES.name, st, A.name)
    assert r["a"]["time_mean"] and not r["b"]["time_mean"]
    assert (r["n_common"], r["undefined"]) == (4, 1)
    assert r["worst"][0] == {"clip": "c2", "cosine": None}
    assert r["cosine"]["min"] == pytest.approx(1.0, abs=1e-6)
    json.dumps(r, allow_nan=False)  # JSON-able, no NaN


def test_compare_shape_mismatch_and_unknown_set(tmp_path):
    st = FeatureStore.open(tmp_path / "s")
    _fill(st, A, {"c": _vec(0)})
    _fill(st, WIDE, {"c": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match=r"per-clip shapes must be equal") as e:
        compare_sets(st, A.name, st, WIDE.name)
    assert "[16]" in str(e.value) and "[32]" in str(e.value)
    with pytest.raises(KeyError, match="no feature set 'nope'"):
        compare_sets(st, A.name, st, "nope")


def test_cli_compare_json_table_other_store_and_errors(two_sets, tmp_path):
    st = two_sets
    runner = CliRunner()
    url = st.url
    res = runner.invoke(store_app, ["compare", url, A.name, B.name, "--worst", "2", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert (r["n_common"], r["only_a"], r["only_b"]) == (11, 1, 1)
    assert [w["clip"] for w in r["worst"]][:1] == ["c05"] and len(r["worst"]) == 2
    assert r["worst"][0]["cosine"] == pytest.approx(-1.0, abs=1e-6)
    assert r["cosine"]["min"] == pytest.approx(-1.0, abs=1e-6)

    res = runner.invoke(store_app, ["compare", url, A.name, B.name])
    assert res.exit_code == 0, res.output
    assert "median" in res.output and "c05" in res.output

    other = FeatureStore.open(tmp_path / "other")
    _fill(other, B, {"c00": _vec(0), "c01": -_vec(1), "x": _vec(5)})
    res = runner.invoke(store_app, ["compare", url, A.key, B.name, "--store-b", other.url, "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert (r["n_common"], r["only_a"], r["only_b"]) == (2, 10, 1) and r["worst"][0]["clip"] == "c01"
    assert r["b"]["store"] == other.url

    _fill(st, WIDE, {"c00": np.ones(32, np.float32)})
    res = runner.invoke(store_app, ["compare", url, A.name, WIDE.name])
    assert res.exit_code == 2 and "per-clip shapes must be equal" in res.output
    res = runner.invoke(store_app, ["compare", url, A.name, "nope"])
    assert res.exit_code == 2 and "no feature set 'nope'" in res.output
