"""npy / HDF5 import and export, and the torch Dataset over a store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from emollama.pipeline.cli_store import store_app
from emollama.store import FeatureDataset, FeatureSpec, FeatureStore
from emollama.store.interop import export_hdf5, export_npy, import_hdf5, import_npy_folder
from store_helpers import FRAMES, UTT, stored, value

HL_UTT = FeatureSpec("audio.hubert.utt.released", "audio", "chinese-hubert-large", "released:HL-UTT",
                     "unknown", "mean", (1024,), params={"source": "Emotion-LLaMA release"})


def _npy_folder(path, n=20):
    path.mkdir()
    rng = np.random.default_rng(0)
    ref = {}
    for i in range(n):
        clip = f"sample_{i:08d}"
        x = rng.standard_normal(1024).astype(np.float32)
        if i % 2:
            x = x[None]  # some releases store [1, 1024]
        np.save(path / f"{clip}.npy", x)
        ref[clip] = x.reshape(1024)
    return ref


def _collate(items):
    return items


def test_import_npy_folder_then_dataset_and_dataloader(tmp_path):
    ref = _npy_folder(tmp_path / "HL-UTT")
    st = FeatureStore.open(tmp_path / "s")
    res = import_npy_folder(st, tmp_path / "HL-UTT", HL_UTT, batch=8)
    assert res == {"key": HL_UTT.key, "imported": 20, "skipped": 0}
    assert import_npy_folder(st, tmp_path / "HL-UTT", HL_UTT)["skipped"] == 20  # rerun: nothing new
    assert st.complete(HL_UTT.key) == set(ref) and st.verify().ok
    assert st.set_attrs(HL_UTT.key)["config"]["imported_from"].endswith("HL-UTT")

    for in_memory in (None, False):
        ds = FeatureDataset(st, [HL_UTT.name], in_memory=in_memory)
        assert len(ds) == 20 and ds.clip_ids == sorted(ref)
        assert ds.in_memory_keys == ([HL_UTT.key] if in_memory is None else [])
        item = ds[3]
        assert item["id"] == sorted(ref)[3]
        assert item[HL_UTT.key].dtype == torch.float32 and item[HL_UTT.key].shape == (1024,)
        torch.testing.assert_close(item[HL_UTT.key], torch.from_numpy(ref[item["id"]].astype(np.float16)).float(),
                                   rtol=0, atol=0)

    ds = FeatureDataset(str(tmp_path / "s"), [HL_UTT.key], in_memory=False)
    dl = torch.utils.data.DataLoader(ds, batch_size=6, shuffle=True, num_workers=2, collate_fn=_collate)
    seen = {}
    for batch in dl:
        for it in batch:
            seen[it["id"]] = it[HL_UTT.key]
    assert set(seen) == set(ref)
    for c, t in seen.items():
        np.testing.assert_array_equal(t.numpy(), ref[c].astype(np.float16).astype(np.float32))


def test_dataset_variable_sets_several_keys_and_clip_subset(tmp_path):
    st = FeatureStore.open(tmp_path / "s")
    ku, kf = st.ensure_set(UTT), st.ensure_set(FRAMES)
    clips = [f"c{i}" for i in range(30)]
    for part in (clips[:10], clips[10:20], clips[20:]):
        with st.writer() as w:
            for c in part:
                w.add(c, {ku: value(c, UTT), kf: value(c, FRAMES)})
    with st.writer() as w:
        w.add("only_utt", {ku: value("only_utt", UTT)})
    for in_memory in (True, False):
        ds = FeatureDataset(st, [UTT.name, FRAMES.name], in_memory=in_memory, dtype=torch.float16)
        assert ds.clip_ids == sorted(clips)  # complete in every key
        items = ds.__getitems__([5, 0, 29, 5])
        assert [it["id"] for it in items] == [ds.clip_ids[i] for i in (5, 0, 29, 5)]
        for it in items:
            np.testing.assert_array_equal(it[kf].numpy(), stored(it["id"], FRAMES))
            np.testing.assert_array_equal(it[ku].numpy(), stored(it["id"], UTT))
    sub = FeatureDataset(st, [ku], clip_ids=["only_utt", "c1"])
    assert [sub[i]["id"] for i in range(2)] == ["only_utt", "c1"]
    with pytest.raises(KeyError, match="not complete in set"):
        FeatureDataset(st, [ku, kf], clip_ids=["only_utt"])
    import pickle

    clone = pickle.loads(pickle.dumps(FeatureDataset(st, [kf], in_memory=False)))
    np.testing.assert_array_equal(clone[2][kf].numpy(), stored(clone.clip_ids[2], FRAMES).astype(np.float32))


def test_hdf5_import_export_and_npy_export(tmp_path):
    h5py = pytest.importorskip("h5py")
    st = FeatureStore.open(tmp_path / "s")
    ku, kf = st.ensure_set(UTT), st.ensure_set(FRAMES)
    clips = ["a", "b", "c"]
    with st.writer() as w:
        for c in clips:
            w.add(c, {ku: value(c, UTT), kf: value(c, FRAMES)})
    assert export_hdf5(st, [UTT.name, kf], tmp_path / "out.h5") == 6
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert sorted(f[kf]) == clips and f[kf].attrs["name"] == FRAMES.name
        np.testing.assert_array_equal(f[kf]["b"][()], stored("b", FRAMES))
    # import it back as a different (declared) set
    spec2 = FeatureSpec("frames.copy", "audio", "hubert", "sha256:00", "last", "none", (None, 32))
    res = import_hdf5(st, tmp_path / "out.h5", spec2, dataset_path=kf)
    assert res["imported"] == 3
    np.testing.assert_array_equal(st.read("c", [spec2.key])[spec2.key], stored("c", FRAMES))
    assert export_npy(st, ku, tmp_path / "npy") == 3
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "a.npy"), stored("a", UTT))
    assert (tmp_path / "npy" / "spec.json").exists()


def test_cli_import_export(tmp_path):
    ref = _npy_folder(tmp_path / "mae_340_UTT", n=5)
    runner = CliRunner()
    url = str(tmp_path / "s")
    res = runner.invoke(store_app, ["import", url, str(tmp_path / "mae_340_UTT"), "--name", "video.mae.utt",
                                    "--encoder", "mae", "--modality", "local", "--weights", "released:mae_340",
                                    "--dtype", "float16"])
    assert res.exit_code == 0, res.output
    assert "imported 5 clips" in res.output
    st = FeatureStore.open(url, create=False)
    key = st.resolve("video.mae.utt")
    assert st.sets()[key].shape == (1024,) and st.sets()[key].dtype == "float16"
    res = runner.invoke(store_app, ["export", url, str(tmp_path / "o.h5"), "--set", "video.mae.utt"])
    assert res.exit_code == 0 and "exported 5" in res.output
    res = runner.invoke(store_app, ["export", url, str(tmp_path / "o_npy"), "--set", key, "--format", "npy"])
    assert res.exit_code == 0
    for c, x in ref.items():
        np.testing.assert_array_equal(np.load(tmp_path / "o_npy" / f"{c}.npy"), x.astype(np.float16))
    res = runner.invoke(store_app, ["export", url, str(tmp_path / "x.h5"), "--set", "nope"])
    assert res.exit_code == 2 and "no feature set 'nope'" in res.output
