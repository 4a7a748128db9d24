"""Fault suite, training stopped with Ctrl-C (issue 19, item 6):

- SIGINT to a real `emollama train` saves a checkpoint of the current step, prints
  ``interrupted at step N: rerun with --resume``, exits 130, and ``--resume`` ends with exactly the
  weights of an uninterrupted run;
- a second Ctrl-C, in the middle of a step, stops at once and names the last complete checkpoint;
- piped training (stderr not a terminal, no -v) prints a loss line every ``run.log_every`` steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import tiny_toml  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 40
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}    # the same arithmetic in every process


def train_cmd(toml: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "emollama.pipeline.cli", "train", "-c", str(toml), *extra]


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {**load_file(str(run / "projectors.safetensors")),
            **load_file(str(run / "adapter" / "adapter_model.safetensors"))}


def test_ctrl_c_saves_the_current_step_and_resume_gives_the_uninterrupted_weights(tiny_store, tmp_path):
    data, store = tiny_store
    full_toml = tiny_toml(tmp_path / "full.toml", data, store, tmp_path / "full", steps=STEPS, save_every=1000,
                          batch_size=2, log_every=1)
    full = subprocess.run(train_cmd(full_toml), env=ENV, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stdout + full.stderr
    # piped: stderr is no terminal, no -v, no bar: a loss line every log_every (1) steps
    lines = [line for line in full.stderr.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{i}/{STEPS}" for i in range(1, STEPS + 1)]
    assert all(" loss " in line and " lr " in line for line in lines)

    run = tmp_path / "stopped"
    toml = tiny_toml(tmp_path / "stopped.toml", data, store, run, steps=STEPS, save_every=1000, batch_size=2,
                     log_every=1)
    proc = subprocess.Popen(train_cmd(toml), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("step 3/"):
                proc.send_signal(signal.SIGINT)
                break
        err = "".join(seen) + proc.stderr.read()
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = [line for line in err.splitlines() if line.startswith("interrupted")]
    assert len(last) == 1, err
    step = int(last[0].split()[3].rstrip(":"))
    assert 3 <= step < STEPS
    ck = run / "checkpoints" / f"step-{step:07d}"
    assert last[0] == f"interrupted at step {step}: rerun with --resume (checkpoint {ck})"
    assert ck.is_dir() and sorted(p.name for p in (run / "checkpoints").iterdir()) == [ck.name]
    assert not (run / "metrics.json").exists() and not (run / ".lock").exists()

    resumed = subprocess.run(train_cmd(toml, "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {ck} at step {step}" in resumed.stdout
    a, b = weights(run), weights(tmp_path / "full")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_a_second_ctrl_c_mid_step_names_the_last_complete_checkpoint(tiny_store, tmp_path, monkeypatch):
    from emollama.train.config import load_train_config
    from emollama.train.loop import Recipe, TrainingInterrupted, train

    data, store = tiny_store
    toml = tiny_toml(tmp_path / "t.toml", data, store, tmp_path / "run", steps=8, save_every=3, batch_size=2)
    real = Recipe.train_step

    def pressed(self, micro, lr, epoch):
        if self.step == 4:            # Ctrl-C twice while step 5 runs: the handler raises the second time
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, micro, lr, epoch)

    monkeypatch.setattr(Recipe, "train_step", pressed)
    cfg = load_train_config(toml)
    with pytest.raises(TrainingInterrupted) as e:
        train(cfg)
    ck = tmp_path / "run" / "checkpoints" / "step-0000003"
    assert str(e.value) == ("interrupted at step 4: rerun with --resume, which continues from the last complete "
                            f"checkpoint, step 3 ({ck})")
    assert e.value.step == 3 and e.value.checkpoint == ck
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler    # the handler is gone again
    monkeypatch.setattr(Recipe, "train_step", real)
    assert train(load_train_config(toml), resume=True).step == 8
