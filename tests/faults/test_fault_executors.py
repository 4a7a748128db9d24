"""One key, one meaning (issue 20, item 11): the same clips extracted in this process, with torch on
several threads, and on a local dask cluster of two one-thread workers give the same feature-set keys
and the same bytes in every set. Before, `audio.hubert.frames` differed on most clips (float16 steps):
the float sums of a CPU encoder follow torch's intra-op thread count, which the executor set. Now the
encoders compute on `[extract] cpu_threads` threads wherever they run (docs/design.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from emollama.pipeline.cli import app
from emollama.store import FeatureStore


def _extract(data, store, workers: int) -> None:
    res = CliRunner().invoke(app, ["extract", "--dataset", "merr", "--data", str(data), "--store", str(store),
                                   "--profile", "tiny", "--workers", str(workers), "--prep-workers", "1", "--no-progress"])
    assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_in_process_and_two_workers_store_the_same_keys_and_bytes(tmp_path, monkeypatch):
    from emollama.extract.sample import write_sample

    monkeypatch.setenv("EMOLLAMA_HOME", str(tmp_path / "home"))
    data = write_sample(tmp_path / "data", clips=8, seed=11)
    before = torch.get_num_threads()
    torch.set_num_threads(4)   # in-process extraction as on a 4-core machine; the workers get 1 thread each
    try:
        _extract(data, tmp_path / "inproc.zarr", 0)
    finally:
        torch.set_num_threads(before)
    _extract(data, tmp_path / "workers.zarr", 2)

    a, b = FeatureStore.open(tmp_path / "inproc.zarr"), FeatureStore.open(tmp_path / "workers.zarr")
    assert sorted(a.sets()) == sorted(b.sets()) and len(a.sets()) == 5
    for key in a.sets():
        assert a.spec(key).params["cpu_threads"] == 1
        ids = sorted(a.complete(key))
        assert ids == sorted(b.complete(key)) and len(ids) == 8
        for x, y in zip(a.read_many(ids, key), b.read_many(ids, key)):
            x, y = np.asarray(x), np.asarray(y)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes(), f"{key} differs between the executors"


def test_more_threads_than_cores_is_a_warning_naming_the_fix():
    from emollama.extract.registry import EncoderInfo
    from emollama.pipeline.extraction import cpu_threads_note

    def info(dtype):
        return {"audio": EncoderInfo(name="hubert", input_kind="waveform", weights="w", layer="last",
                                     frame_rate=50.0, compute_dtype=dtype, params={}, outputs={})}

    cpu, gpu = info("float32"), info("float16")
    assert cpu_threads_note(1, cpu, 2, cores=2) is None          # --workers 2 x 1 thread on 2 cores
    assert cpu_threads_note(2, cpu, 1, cores=2) is None          # in-process, 2 threads
    note = cpu_threads_note(2, cpu, 2, cores=2)
    assert note.startswith("encoding on the CPU asks for 2 worker(s) x 2 thread(s) ([extract] cpu_threads) on 2 core(s)")
    assert "fewer --workers" in note and "cpu_threads" in note
    assert "asks for 4 thread(s)" in cpu_threads_note(4, cpu, 1, cores=2)
    assert cpu_threads_note(8, gpu, 4, cores=2) is None          # encoders on a GPU ignore it
    assert cpu_threads_note(8, cpu, None, cores=2) is None       # a cluster elsewhere: its cores are unknown
