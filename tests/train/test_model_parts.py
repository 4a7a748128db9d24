"""The model's parts without an LM: a projector is standardize then Linear (two modules) and keeps the
flat tensor names of every run folder's projectors.safetensors; fresh weights draw their random numbers
in the same order as a plain Linear per projector; the token order comes from one table."""

import pytest
import torch

from emollama.train.checkpoint import CheckpointError, PROJECTORS, load_projectors, save_projectors
from emollama.train.model import Projectors, layout_for, projector_specs
from emollama.train.params import SetShape

H = 8
SETS = [("kg", SetShape("global.x", "global", (1 + 8, 6))), ("ka", SetShape("audio.x", "audio", (5,))),
        ("kl", SetShape("local.x", "local", (3,)))]


def _feats(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"kg": torch.randn(2, 9, 6, generator=g) * 2 + 1, "ka": torch.randn(2, 5, generator=g) + 3,
            "kl": torch.randn(2, 3, generator=g)}


def _fitted(seed=0) -> Projectors:
    torch.manual_seed(seed)
    p = Projectors(projector_specs(SETS, H, patch_group=2))
    g = torch.Generator().manual_seed(seed + 1)
    for name, layer in p.layers.items():
        d = layer.norm.mean.numel()
        p.set_statistics(name, torch.randn(d, generator=g), torch.rand(d, generator=g) + 0.5)
    return p


def test_a_projector_is_standardize_then_linear():
    p = _fitted()
    feats = _feats()
    audio = p.layers["audio_x"]
    assert [n for n, _ in audio.named_children()] == ["norm", "linear"]
    x = feats["ka"]
    manual = ((x - audio.norm.mean) / audio.norm.std) @ audio.linear.weight.T + audio.linear.bias
    assert torch.equal(p.project("audio_x", x)[:, 0], manual)
    # patches: ln_vision, standardized per token value, then 2 tokens concatenated per Linear input
    patches = p.layers["global_x_patches"]
    z = p.prepare("global_x_patches", feats["kg"])
    z = ((z - patches.norm.mean) / patches.norm.std).reshape(2, 4, 12)
    assert torch.equal(p.project("global_x_patches", feats["kg"]), patches.linear(z))


def test_projectors_save_the_flat_names_and_load_back_to_the_same_outputs(tmp_path):
    from safetensors.torch import load_file

    p = _fitted()
    save_projectors(p, tmp_path, {"projectors": []})
    saved = load_file(str(tmp_path / PROJECTORS))
    assert set(saved) == {f"{n}.{t}" for n in ("global_x_patches", "global_x_cls", "audio_x", "local_x")
                          for t in ("weight", "bias", "feature_mean", "feature_std")}
    assert torch.equal(saved["audio_x.feature_std"], p.layers["audio_x"].norm.std)
    fresh = Projectors(projector_specs(SETS, H, patch_group=2))
    load_projectors(fresh, tmp_path)
    layout = layout_for(list(p.specs.values()))
    with torch.no_grad():
        assert torch.equal(fresh.slots(layout, _feats()), p.slots(layout, _feats()))


def test_a_projector_file_written_before_the_split_loads_and_mis_shapes_are_named(tmp_path):
    """Older run folders hold, per projector, the tensors of one Linear subclass with two buffers:
    ``weight``, ``bias``, ``feature_mean``, ``feature_std``. They load, and compute W((x-m)/s)+b."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    old = {"local_x.weight": torch.randn(H, 3, generator=g), "local_x.bias": torch.randn(H, generator=g),
           "local_x.feature_mean": torch.randn(3, generator=g), "local_x.feature_std": torch.rand(3, generator=g) + 0.5}
    save_file(old, str(tmp_path / PROJECTORS))
    p = Projectors(projector_specs(SETS[2:], H))
    load_projectors(p, tmp_path)
    x = _feats()["kl"]
    manual = ((x - old["local_x.feature_mean"]) / old["local_x.feature_std"]) @ old["local_x.weight"].T \
        + old["local_x.bias"]
    with torch.no_grad():
        assert torch.equal(p.project("local_x", x)[:, 0], manual)
    save_file({**old, "local_x.weight": torch.zeros(H, 4)}, str(tmp_path / PROJECTORS))
    with pytest.raises(CheckpointError, match=r"local_x.*weight has shape \[8, 4\], expected \[8, 3\]"):
        load_projectors(p, tmp_path)


def test_fresh_projectors_draw_like_one_linear_each_in_spec_order():
    """The loss curves of runs made before the split depend on it: the same seed, the same weights."""
    specs = projector_specs(SETS, H, patch_group=2)
    torch.manual_seed(3)
    ours = Projectors(specs)
    torch.manual_seed(3)
    plain = [torch.nn.Linear(s.in_features, s.out_features) for s in specs]
    for s, lin in zip(specs, plain):
        assert torch.equal(ours.layers[s.name].linear.weight, lin.weight)
        assert torch.equal(ours.layers[s.name].linear.bias, lin.bias)


def test_the_token_order_comes_from_one_table():
    from emollama.train.config import PAPER_FEATURES
    from emollama.train.modalities import MODALITIES
    from emollama.train.params import PAPER_SHAPES

    sets = [("kw", SetShape("wav2vec2.x", "speech", (4,))), ("ka", SetShape("audio.x", "audio", (5,))),
            ("kg", SetShape("global.x", "global", (9, 6))), ("kt", SetShape("temporal.x", "temporal", (2,))),
            ("kl", SetShape("local.x", "local", (3,)))]
    layout = layout_for(projector_specs(sets, H, patch_group=2))
    assert [s.name for s in layout.video] == ["global_x_patches"]
    assert [s.name for s in layout.feature] == ["local_x", "temporal_x", "audio_x", "wav2vec2_x", "global_x_cls"]
    assert [m.name for m in MODALITIES] == ["local", "temporal", "audio", "global"]
    assert PAPER_FEATURES == ["global.eva.tokens", "local.vit_mae.mean", "temporal.videomae.mean", "audio.hubert.mean"]
    assert all(PAPER_SHAPES[m.paper_set] == (m.name, m.paper_shape) for m in MODALITIES)
