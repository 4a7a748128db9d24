"""Fault suite, training: a process that dies while writing a checkpoint never costs the last one."""

import subprocess
import sys

import pytest

from emollama.train.checkpoint import latest_checkpoint
from train_helpers import tiny_toml
from emollama.train.loop import train

CRASH_IN_CHECKPOINT = """
import os, sys
import emollama.train.checkpoint as ck
real = ck.write_json
def dying_write_json(path, obj):
    # the process dies (as under SIGKILL: no cleanup) while writing the step-4 checkpoint
    if path.name == "state.json" and obj.get("step") == 4:
        os._exit(137)
    return real(path, obj)
ck.write_json = dying_write_json
from emollama.pipeline.cli import app
app(sys.argv[1:])
"""


@pytest.mark.slow
def test_death_while_writing_a_checkpoint_keeps_the_last_one(small_store, make_cfg, tmp_path):
    data, store = small_store
    opts = dict(optim={"steps": 8, "batch_size": 4}, data={"features": ["audio.hubert.mean"]},
                run={"save_every": 2})
    full = train(make_cfg(data, store, tmp_path / "full", **opts))
    run = tmp_path / "crashed"
    toml = tiny_toml(tmp_path / "c.toml", data, store, run, steps=8)
    proc = subprocess.run([sys.executable, "-c", CRASH_IN_CHECKPOINT, "train", "-c", str(toml), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stdout + proc.stderr
    # the half-written step-4 checkpoint is a hidden temp folder; step 2 is the last complete one
    leftovers = [p.name for p in (run / "checkpoints").iterdir()]
    assert any(name.startswith(".step-0000004") for name in leftovers), leftovers
    assert latest_checkpoint(run).name == "step-0000002"
    assert (run / "adapter" / "adapter_model.safetensors").exists()      # the exported step-2 weights
    resumed = train(make_cfg(data, store, run, **opts), resume=True)
    assert resumed.step == 8
    a = [h["loss"] for h in resumed.history]
    b = [h["loss"] for h in full.history]
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-6
