"""Importing the authors' released feature folders (MER2023 / MER2024) with no flags."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from emollama.pipeline.cli_store import store_app
from emollama.store import FeatureStore
from emollama.store.interop import RELEASED, import_released, released_preset, released_spec, storage_dtype


def _release(folder, n=4, dtype=np.float32, lead=True):
    """folder/<clip>.npy, each [1, 1024] (or [1024]); returns clip -> [1024] array as written."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(folder.name))
    ref = {}
    for i in range(n):
        clip = f"sample_{i:08d}"
        x = rng.standard_normal(1024).astype(dtype)
        x[0] = np.float32(1e-40) if dtype == np.float32 else x[0]  # a subnormal must survive too
        np.save(folder / f"{clip}.npy", x[None] if lead else x)
        ref[clip] = x
    return ref


def _import(url, folder, *flags):
    res = CliRunner().invoke(store_app, ["import", str(url), str(folder), *flags])
    return res


@pytest.mark.parametrize("folder, name, modality, described", [
    ("mae_340_UTT", "local.mae_340_utt.released", "local", "MAE ViT-L/16"),
    ("HL-UTT", "audio.hl_utt.released", "audio", "chinese-hubert-large utterance mean"),
])
def test_cli_import_released_folder_without_flags_is_bit_exact(tmp_path, folder, name, modality, described):
    src = tmp_path / "MER2023" / folder
    ref = _release(src)
    url = tmp_path / "s"
    res = _import(url, src)
    assert res.exit_code == 0, res.output
    assert "imported 4 clips" in res.output and name in res.output and "float32" in res.output
    st = FeatureStore.open(url, create=False)
    key = st.resolve(name)
    spec = st.sets()[key]
    assert (spec.modality, spec.shape, spec.dtype, spec.pooling) == (modality, (1024,), "float32", "mean")
    assert spec.encoder == f"released:{folder}" and spec.weights == f"authors:{folder}"
    assert spec.params["folder"] == folder and spec.params["release"] == "MER2023"
    assert described in spec.params["description"]
    assert st.set_attrs(key)["config"]["source_dtype"] == "float32"
    got = st.read_many(sorted(ref), key)
    for c, x in zip(sorted(ref), got):
        assert x.dtype == np.float32 and x.shape == (1024,)
        assert x.tobytes() == ref[c].tobytes()  # bit-identical
    assert _import(url, src).output.count("(4 already there)") == 1  # rerun: nothing new, same set


def test_cli_released_flags_override_and_float64_float16(tmp_path):
    url = tmp_path / "s"
    src = tmp_path / "MER2024" / "HL_23_UTT"
    ref = _release(src, n=3, dtype=np.float64, lead=False)
    res = _import(url, src, "--name", "audio.hubert.mean", "--param", "note=mine")
    assert res.exit_code == 0, res.output
    assert "note: source dtype float64 stored as float32" in res.output
    st = FeatureStore.open(url, create=False)
    spec = st.sets()[st.resolve("audio.hubert.mean")]
    assert (spec.modality, spec.encoder, spec.dtype) == ("audio", "released:HL_23_UTT", "float32")
    assert spec.params["release"] == "MER2024" and spec.params["note"] == "mine"
    assert st.set_attrs(spec.key)["config"]["source_dtype"] == "float64"
    for c, x in zip(sorted(ref), st.read_many(sorted(ref), spec.key)):
        np.testing.assert_array_equal(x, ref[c].astype(np.float32))

    src16 = tmp_path / "MER2023" / "maeV_399_UTT"
    ref16 = _release(src16, n=2, dtype=np.float16)
    assert _import(url, src16).exit_code == 0
    st.refresh()  # another process (the CLI) committed since st was opened
    key = st.resolve("temporal.maev_399_utt.released")
    assert st.sets()[key].dtype == "float16" and st.sets()[key].modality == "temporal"
    for c, x in zip(sorted(ref16), st.read_many(sorted(ref16), key)):
        assert x.tobytes() == ref16[c].tobytes()
    # an explicit --dtype still wins
    assert _import(url, src16, "--name", "t16as32", "--dtype", "float32").exit_code == 0
    st.refresh()
    assert st.sets()[st.resolve("t16as32")].dtype == "float32"


def test_cli_unknown_folder_without_flags_lists_presets(tmp_path):
    src = tmp_path / "my_feats"
    _release(src, n=1)
    res = _import(tmp_path / "s", src)
    assert res.exit_code == 2
    for preset in RELEASED:
        assert preset in res.output
    assert "--name" in res.output and "--encoder" in res.output and "--modality" in res.output
    assert not (tmp_path / "s").exists()  # nothing created
    res = _import(tmp_path / "s", src, "--name", "x.y.z", "--modality", "local")
    assert res.exit_code == 2 and "--encoder" in res.output and "--name," not in res.output


def test_python_api(tmp_path):
    assert released_preset("/data/MER2023/hl-utt/")[0] == "HL-UTT"  # case and '-'/'_' tolerant
    assert released_preset("features") is None
    names = {released_spec(f).name for f in RELEASED}
    assert len(names) == len(RELEASED) and "temporal.maevideo_399_23_utt.released" in names
    with pytest.raises(KeyError, match="mae_340_UTT"):
        released_spec("features")
    assert storage_dtype("keep", "float32") == ("float32", None)
    assert storage_dtype("keep", "float16") == ("float16", None)
    assert storage_dtype("keep", "float64")[0] == "float32"
    assert storage_dtype("float16", "float32")[1] is not None
    src = tmp_path / "MER2023" / "mae_340_23_UTT"
    ref = _release(src, n=3)
    st = FeatureStore.open(tmp_path / "s")
    res = import_released(st, src, batch=2)
    assert res["imported"] == 3 and res["key"] == released_spec(src).key
    for c, x in zip(sorted(ref), st.read_many(sorted(ref), res["key"])):
        assert x.tobytes() == ref[c].tobytes()
    assert st.verify().ok
