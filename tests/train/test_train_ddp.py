"""DDP: two CPU processes (torchrun, gloo) at batch 2 each match one process at batch 4."""

import json
import os
import socket
import subprocess
import sys

import pytest

from emollama.train.checkpoint import latest_checkpoint
from emollama.train.loop import train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_global_batch(small_store, make_cfg, tmp_path):
    data, store = small_store
    feats = ["audio.hubert.mean", "local.vit_mae.mean", "temporal.videomae.mean", "global.eva.tokens"]
    # dropout off: each rank draws its own dropout masks, which one process cannot reproduce
    opts = dict(optim={"steps": 5, "batch_size": 4}, lora={"dropout": 0.0, "alpha": 64}, data={"features": feats})
    one = train(make_cfg(data, store, tmp_path / "one", **opts))

    toml = tmp_path / "ddp.toml"
    toml.write_text(f"""
[data]
root = "{data}"
store = "{store}"
features = {json.dumps(feats)}
standardize = true
[model]
profile = "tiny"
[lora]
alpha = 64
dropout = 0.0
[optim]
lr = 3e-3
min_lr = 1e-5
warmup_steps = 2
steps = 5
batch_size = 2
[run]
out = "{tmp_path / 'two'}"
seed = 7
save_every = 1000
eval_every = 0
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "emollama.pipeline.cli", "train", "-c", str(toml), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    state = json.loads((latest_checkpoint(tmp_path / "two") / "state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 4 and state["step"] == 5
    two = [h["loss"] for h in state["history"]]
    ref = [h["loss"] for h in one.history]
    assert [h["tokens"] for h in state["history"]] == [h["tokens"] for h in one.history]
    assert max(abs(a - b) for a, b in zip(two, ref)) < 1e-4, (two, ref)
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["predictions"] == m2["predictions"]
