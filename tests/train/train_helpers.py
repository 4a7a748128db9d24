"""Helpers for the stage-two tests (imported by name: tests/ has no packages)."""

from pathlib import Path


def tiny_toml(path: Path, data: Path, store: Path, run: Path, *, steps: int, save_every: int = 2) -> Path:
    """The same audio-only tiny run as `tiny_cfg(..., data={"features": ["audio.hubert.mean"]})`, as a
    TOML file for `emollama train -c` in a subprocess."""
    path.write_text(f"""
[data]
root = "{data}"
store = "{store}"
features = ["audio.hubert.mean"]
[model]
profile = "tiny"
[lora]
alpha = 64
[optim]
lr = 3e-3
min_lr = 1e-5
warmup_steps = 2
steps = {steps}
batch_size = 4
[run]
out = "{run}"
seed = 7
save_every = {save_every}
eval_every = 0
""")
    return path
