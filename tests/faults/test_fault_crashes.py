"""Fault suite, crashes: extraction killed with SIGKILL at random moments, several times in a row,
then resumed: the store verifies clean, every clip is complete, values equal an uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from emollama.extract.sample import write_sample
from emollama.store import FeatureStore

pytestmark = pytest.mark.slow


def extract_cmd(data, store):
    return [sys.executable, "-m", "emollama.pipeline.cli", "extract", "--dataset", "merr", "--data", str(data),
            "--store", str(store), "--profile", "tiny", "--workers", "0", "--batch-clips", "1",
            "--no-progress"]


def test_sigkill_at_random_moments_then_resume(tmp_path):
    data = write_sample(tmp_path / "data", clips=8, seed=5)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(extract_cmd(data, tmp_path / "ref.zarr"), env=env, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stdout + ref.stderr

    store = tmp_path / "killed.zarr"
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(extract_cmd(data, store), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(4.0, 9.0))        # imports take ~4 s; then clips commit one by one
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        if store.exists():
            st = FeatureStore.open(store)
            rep = st.verify()
            assert rep.ok, rep.problems          # never a half-written clip that reads as complete
    assert kills >= 2
    done = subprocess.run(extract_cmd(data, store), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    a, b = FeatureStore.open(tmp_path / "ref.zarr"), FeatureStore.open(store)
    assert b.verify().ok
    assert set(a.sets()) == set(b.sets())
    for key in a.sets():
        assert b.complete(key) == a.complete(key) and len(a.complete(key)) == 8
        for cid in sorted(a.complete(key)):
            np.testing.assert_array_equal(a.read(cid, [key])[key], b.read(cid, [key])[key])
