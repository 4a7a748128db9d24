"""Fault suite, finite values wherever they enter (issue 20, defect 3):

- ``import-checkpoint`` refuses a released checkpoint with NaN or Inf, naming the tensor, and writes nothing;
- a run folder whose projectors (or adapter) hold NaN is refused at load (``load_run``: infer and eval),
  at ``--init-from`` and at ``--resume``, naming the tensor: no "label: happy" with NaN probabilities;
- ``store import`` refuses NaN, Inf and values that overflow float16, naming the file;
- extraction checks every array before it commits: a non-finite one fails its clip, naming the set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from emollama.pipeline.cli import app
from emollama.store import FeatureStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from test_released import released_state, write_released  # noqa: E402

runner = CliRunner()


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def poison(path: Path, tensor: str, value: float = float("nan")) -> None:
    """Put ``value`` into one element of ``tensor`` of a safetensors file."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state[tensor].view(-1)[0] = value
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("key,value", [("feats_llama_proj3.weight", float("nan")),
                                       ("llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
                                        float("inf"))])
def test_a_released_checkpoint_with_nan_or_inf_is_refused_at_import(tmp_path, key, value):
    state = released_state()
    state[key].view(-1)[3] = value
    ck = write_released(tmp_path / "Emotion_LLaMA.pth", state)
    out = tmp_path / "run"
    res = runner.invoke(app, ["import-checkpoint", str(ck), "--out", str(out), "--profile", "tiny"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    [err] = error_lines(res.output)
    assert f"tensor {key} holds" in err and ("1 NaN" if value != value else "1 Inf") in err
    assert not out.exists()


@pytest.fixture(scope="module")
def small(tiny_store, tmp_path_factory):
    """The shared tiny store, and a 2-step audio-only run on it."""
    data, store = tiny_store
    run = tmp_path_factory.mktemp("finite") / "run"
    res = runner.invoke(app, train(data, store, run))
    assert res.exit_code == 0, res.output
    return data, store, run


def train(data, store, out, *extra):
    return ["train", "--data", str(data), "--store", str(store), "--out", str(out), "--profile", "tiny",
            "--steps", "2", "-b", "2", "-f", "audio.hubert.mean", "--no-progress", *extra]


@pytest.mark.slow
def test_a_run_with_nan_projectors_is_refused_at_load_init_from_and_resume(small, tmp_path):
    import shutil

    from emollama.train.run import RunError, load_run

    data, store, good = small
    run = tmp_path / "poisoned"
    shutil.copytree(good, run)
    tensor = "audio_hubert_mean.weight"
    poison(run / "projectors.safetensors", tensor)
    with pytest.raises(RunError, match=rf"projectors.safetensors: tensor {tensor} holds 1 NaN"):
        load_run(run, device="cpu")
    clip = sorted((data / "video").glob("*.mp4"))[0]
    res = runner.invoke(app, ["infer", str(clip), "--run", str(run), "--no-reason"])
    assert res.exit_code == 2 and "Traceback" not in res.output and "label:" not in res.output, res.output
    assert f"tensor {tensor} holds 1 NaN" in error_lines(res.output)[0]

    res = runner.invoke(app, train(data, store, tmp_path / "next", "--init-from", str(run)))
    assert res.exit_code == 2 and f"tensor {tensor} holds 1 NaN" in error_lines(res.output)[0], res.output

    ck = run / "checkpoints" / "step-0000002"
    poison(ck / "adapter" / "adapter_model.safetensors",
           "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", float("-inf"))
    res = runner.invoke(app, train(data, store, run, "--resume"))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "q_proj.lora_A.weight holds 1 Inf of" in error_lines(res.output)[0]


def test_store_import_refuses_nan_inf_and_float16_overflow_naming_the_file(tmp_path):
    src = tmp_path / "feats"
    src.mkdir()
    np.save(src / "a.npy", np.ones(8, np.float32))
    bad = np.ones(8, np.float32)
    bad[2] = np.nan
    np.save(src / "b.npy", bad)
    args = ["store", "import", str(tmp_path / "s.zarr"), str(src), "--name", "audio.mine.utt", "--encoder", "mine",
            "--modality", "audio"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    [err] = error_lines(res.output)
    assert f"{src / 'b.npy'}: 1 NaN of 8 values" in err
    st = FeatureStore.open(tmp_path / "s.zarr")
    key = st.resolve("audio.mine.utt")
    assert st.complete(key) == {"a"}                   # the good clip before it is kept; b is not there

    bad[2] = -np.inf
    np.save(src / "b.npy", bad)
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and f"{src / 'b.npy'}: 1 Inf of 8 values" in error_lines(res.output)[0]

    big = np.ones(8, np.float32)
    big[5] = 1e5                                       # finite in float32, inf in float16
    np.save(src / "b.npy", big)
    res = runner.invoke(app, [*args, "--dtype", "float16", "--name", "audio.mine16.utt"])
    assert res.exit_code == 2, res.output
    err = error_lines(res.output)[0]
    assert f"{src / 'b.npy'}: 1 value(s) beyond float16's range (max 65504)" in err and "--dtype float32" in err
    res = runner.invoke(app, args)                     # kept as float32: finite, imported
    assert res.exit_code == 0, res.output
    st.refresh()
    assert st.complete(key) == {"a", "b"} and st.read("b", [key])[key][5] == 1e5


def test_a_non_finite_encoder_output_fails_its_clip_naming_the_set(tmp_path, monkeypatch):
    import emollama.extract.step as step
    from emollama.extract.sample import write_sample

    data = write_sample(tmp_path / "data", clips=3, seed=8)
    real = step.encode

    def leaky(prepared, m, seconds):
        rows = real(prepared, m, seconds)
        for p, row in zip(prepared, rows):
            if p.job.id == "sample_00000001":
                row["audio.hubert.frames"][0, 0] = np.nan
            if p.job.id == "sample_00000002":
                row["local.vit_mae.mean"][0] = 7e4     # stored as float16: becomes inf
        return rows

    monkeypatch.setattr(step, "encode", leaky)
    store = tmp_path / "s.zarr"
    res = runner.invoke(app, ["extract", "--dataset", "merr", "--data", str(data), "--store", str(store),
                              "--profile", "tiny", "--workers", "0", "--no-progress", "--json"])
    assert res.exit_code == 1, res.output
    failed = dict(json.loads(res.stdout[res.stdout.index("{"):])["failed"])
    assert sorted(failed) == ["sample_00000001", "sample_00000002"]
    assert "non-finite encoder output in audio.hubert.frames: 1 NaN of" in failed["sample_00000001"]
    assert "local.vit_mae.mean: 1 value(s) beyond float16's range" in failed["sample_00000002"]
    st = FeatureStore.open(store)
    assert st.verify().ok
    for key in st.sets():
        assert st.complete(key) == {"sample_00000003"}
    assert st.records()["sample_00000001"]["status"] == "failed"
    assert torch.isfinite(torch.from_numpy(st.read("sample_00000003", list(st.sets()))[st.resolve("audio.hubert.frames")]
                                           .astype(np.float32))).all()
