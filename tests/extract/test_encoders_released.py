"""The authors' own checkpoint files (EVA/LAVIS, MAE, VideoMAE layouts) load into our encoders and
give the same outputs as the same weights in transformers/timm folders."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from emollama.extract import encoders as E
from emollama.extract.models import (EVA_ARCH, EVA_IMG_SIZE, WeightsFileError, default_heads, resample_pos_embed,
                            videomae_config, vit_mae_config)

torch = pytest.importorskip("torch")


def _jitter(model, seed: int):
    """Move every weight off its init (zero biases, unit norms) so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _frames(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


# --- EVA (LAVIS eva_vit_g.pth layout) ---------------------------------------------------------

EVA_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias",
                  "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                  "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def _tiny_eva_224(depth: int, seed: int = 0):
    import timm

    torch.manual_seed(seed)
    m = timm.create_model(EVA_ARCH, pretrained=False, img_size=224, num_classes=0, embed_dim=48, depth=depth,
                          num_heads=2, mlp_ratio=2.0)
    return _jitter(m, seed)


def _lavis_layout(model, dtype) -> dict:
    """The original EVA key layout, written from the facts' key list (not from timm's names)."""
    sd = model.state_dict()
    out = {k: sd[k] for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")}
    for i in range(len(model.blocks)):
        out.update({f"blocks.{i}.{k}": sd[f"blocks.{i}.{k}"] for k in EVA_BLOCK_KEYS})
    assert set(sd) - set(out) == {"norm.weight", "norm.bias"}  # the layouts agree up to the final norm
    return {k: v.detach().to(dtype).clone() for k, v in out.items()}


def _timm_folder(model, folder: Path) -> Path:
    from timm.models import save_for_hf

    save_for_hf(model, str(folder), safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_args"]["img_size"] in (224, [224, 224])
    return folder


def _facts_resample(pos: "torch.Tensor", grid: int) -> "torch.Tensor":
    """The facts, written out independently: bicubic, align_corners False, no antialias, CLS kept."""
    import torch.nn.functional as F

    pos = pos.float()
    g = int((pos.shape[1] - 1) ** 0.5)
    patches = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_eva_lavis_file_equals_timm_folder(tmp_path, dtype):
    dt = getattr(torch, dtype)
    m = _tiny_eva_224(depth=4)
    if dt == torch.float16:  # the real file is fp16: compare with the same fp16-rounded weights in fp32
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.half().float())
    folder = _timm_folder(m, tmp_path / "timm-eva224")
    file = tmp_path / "eva_vit_g.pth"
    sd = _lavis_layout(m, dt)
    torch.save(sd if dt == torch.float32 else {"model": sd}, file)

    from_folder = E.load_encoder("global", E.ModelSource(str(folder)), device="cpu", offline=True, home=tmp_path)
    from_file = E.load_encoder("global", E.ModelSource(str(file), config=str(folder)), device="cpu",
                               offline=True, home=tmp_path)
    assert from_file.weights == _sha(file)
    assert from_file.params["checkpoint"] == {"format": "eva", "num_heads": 2}
    for enc in (from_folder, from_file):
        # the position embedding: 16x16 -> 32x32 exactly as the facts say, CLS kept
        want = _facts_resample(m.pos_embed.detach(), EVA_IMG_SIZE // 14)
        assert torch.equal(enc.model.pos_embed.detach(), want)
        assert enc.params["pos_embed"].startswith("resampled from 16x16 patches: bicubic, align_corners False, "
                                                  "no antialias")
        assert enc.size == (448, 448) and enc.params["blocks"] == 3 and enc.params["depth"] == 4
        assert enc.outputs["tokens"].shape == (1025, 48)
    frames = [_frames((300, 500, 3), 1), _frames((448, 448, 3), 2)]
    for a, b in zip(from_file.encode(frames), from_folder.encode(frames)):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])  # bit-identical on CPU fp32


def test_eva_file_tokens_match_an_independent_forward(tmp_path):
    """All blocks but the last, no final norm, 448x448 bicubic + CLIP mean/std, facts' pos resample."""
    from PIL import Image

    m = _tiny_eva_224(depth=4, seed=3)
    file = tmp_path / "eva.pth"
    torch.save(_lavis_layout(m, torch.float16), file)
    (tmp_path / "cfg.json").write_text(json.dumps({"num_heads": 2}))
    enc = E.load_encoder("global", E.ModelSource(str(file), config=str(tmp_path / "cfg.json")), device="cpu",
                         offline=True, home=tmp_path)
    assert len(enc.model.blocks) == 3 and enc.layer == "blocks[:3]"
    assert isinstance(enc.model.norm, torch.nn.Identity)
    assert enc.params["mean"] == list(E.EVA_CLIP_MEAN) and enc.params["std"] == list(E.EVA_CLIP_STD)
    assert enc.params["resize"] == "whole frame, bicubic (PIL)"

    frame = _frames((240, 320, 3), 4)
    got = enc.encode([frame])[0]["tokens"]
    # independent reference from the fp16-rounded weights
    sd = {k: v.float() for k, v in torch.load(file, weights_only=True).items()}
    with torch.no_grad():
        for k, v in sd.items():
            m.state_dict()[k].copy_(v)
        img = np.asarray(Image.fromarray(frame).resize((448, 448), Image.BICUBIC), np.float32) / 255.0
        x = (torch.from_numpy(img) - torch.tensor(E.EVA_CLIP_MEAN)) / torch.tensor(E.EVA_CLIP_STD)
        x = torch.nn.functional.conv2d(x.permute(2, 0, 1)[None], sd["patch_embed.proj.weight"],
                                       sd["patch_embed.proj.bias"], stride=14)
        x = torch.cat([sd["cls_token"], x.flatten(2).transpose(1, 2)], dim=1) + _facts_resample(sd["pos_embed"], 32)
        for blk in m.blocks[:3]:
            x = blk(x)
    np.testing.assert_allclose(got, x[0].numpy(), atol=1e-5, rtol=1e-5)


def test_eva_file_keeps_39_of_40_blocks(tmp_path):
    m = _tiny_eva_224(depth=40, seed=5)
    file = tmp_path / "eva40.pth"
    sd = _lavis_layout(m, torch.float16)
    sd.update({"norm.weight": torch.ones(48, dtype=torch.float16), "norm.bias": torch.zeros(48, dtype=torch.float16)})
    torch.save(sd, file)
    (tmp_path / "cfg.json").write_text(json.dumps({"model_args": {"num_heads": 2}}))
    enc = E.load_encoder("global", E.ModelSource(str(file), config=str(tmp_path / "cfg.json")), device="cpu",
                         offline=True, home=tmp_path)
    assert (enc.params["depth"], enc.params["blocks"], len(enc.model.blocks)) == (40, 39, 39)
    assert enc.layer == "blocks[:39]" and enc.params["final_norm"] is False
    assert isinstance(enc.model.norm, torch.nn.Identity)
    assert all(p.dtype == torch.float32 for p in enc.model.parameters())  # fp16 file, fp32 weights on CPU
    want = {k: v.float() for k, v in sd.items()}
    got = enc.model.state_dict()
    for k in ("cls_token", "patch_embed.proj.weight", "blocks.38.attn.q_bias", "blocks.38.mlp.fc2.weight"):
        assert torch.equal(got[k], want[k]), k


def test_resample_pos_embed_is_the_facts_resample_not_timms():
    from timm.layers import resample_abs_pos_embed

    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 1 + 16 * 16, 48, generator=g)
    ours = resample_pos_embed(pos, 32)
    assert ours.shape == (1, 1 + 32 * 32, 48)
    assert torch.equal(ours, _facts_resample(pos, 32))
    assert torch.equal(ours[:, 0], pos[:, 0])
    assert torch.equal(resample_pos_embed(pos.half(), 32), _facts_resample(pos.half(), 32))  # fp16 in: fp32 math
    assert torch.equal(resample_pos_embed(pos, 16), pos)  # same grid: untouched
    # timm's own resample antialiases (other values): the reason the timm path resamples itself
    timms = resample_abs_pos_embed(pos, new_size=(32, 32), num_prefix_tokens=1)
    assert (timms - ours).abs().max() > 1e-2


# --- MAE (MAE repository layout) --------------------------------------------------------------

def _pick(sd: dict, *names: str):
    for n in names:
        if n in sd:
            return sd[n]
    raise KeyError(names)


def _layer(sd: dict, i: int, *suffixes: str):
    return _pick(sd, *(f"{b}{s}" for s in suffixes for b in (f"layers.{i}.", f"encoder.layer.{i}.")))


def _hf_blocks_to_timm(sd: dict, depth: int, prefix: str, bias: str) -> dict:
    """Inverse mapping, transformers ViT layers -> timm-style blocks (fused qkv)."""
    out = {}
    for i in range(depth):
        b = f"{prefix}blocks.{i}."
        q = _layer(sd, i, "attention.q_proj.weight", "attention.attention.query.weight")
        k = _layer(sd, i, "attention.k_proj.weight", "attention.attention.key.weight")
        v = _layer(sd, i, "attention.v_proj.weight", "attention.attention.value.weight")
        out[b + "attn.qkv.weight"] = torch.cat([q, k, v])
        if bias == "fused":
            out[b + "attn.qkv.bias"] = torch.cat([
                _layer(sd, i, "attention.q_proj.bias", "attention.attention.query.bias"),
                _layer(sd, i, "attention.k_proj.bias", "attention.attention.key.bias"),
                _layer(sd, i, "attention.v_proj.bias", "attention.attention.value.bias")])
        else:  # VideoMAE: q and v biases, no key bias
            out[b + "attn.q_bias"] = _layer(sd, i, "attention.attention.query.bias", "attention.attention.q_bias")
            out[b + "attn.v_bias"] = _layer(sd, i, "attention.attention.value.bias", "attention.attention.v_bias")
        for ours, theirs in (("attn.proj", ("attention.o_proj", "attention.output.dense")),
                             ("norm1", ("layernorm_before",)), ("norm2", ("layernorm_after",)),
                             ("mlp.fc1", ("mlp.fc1", "intermediate.dense")), ("mlp.fc2", ("mlp.fc2", "output.dense"))):
            for wb in ("weight", "bias"):
                out[f"{b}{ours}.{wb}"] = _layer(sd, i, *(f"{t}.{wb}" for t in theirs))
    return out


def _mae_file_dict(model) -> dict:
    sd = model.state_dict()
    depth = model.config.num_hidden_layers
    enc = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    enc.update(_hf_blocks_to_timm(sd, depth, "", "fused"))
    d = model.config.hidden_size
    decoder = {"mask_token": torch.randn(1, 1, 16), "decoder_embed.weight": torch.randn(16, d),
               "decoder_embed.bias": torch.randn(16), "decoder_pos_embed": torch.randn(1, 197, 16),
               "decoder_blocks.0.attn.qkv.weight": torch.randn(48, 16), "decoder_norm.weight": torch.randn(16),
               "decoder_pred.weight": torch.randn(768, 16), "decoder_pred.bias": torch.randn(768)}
    return {**{k: v.detach().clone() for k, v in enc.items()}, **decoder}


def _tiny_mae(seed=0, **overrides):
    from transformers import ViTMAEModel

    cfg = vit_mae_config("tiny")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    return _jitter(ViTMAEModel(cfg), seed)


def test_mae_file_equals_hf_folder(tmp_path):
    m = _tiny_mae()
    folder = tmp_path / "hf-mae"
    m.save_pretrained(folder)
    file = tmp_path / "mae_340.pth"
    torch.save({"model": _mae_file_dict(m), "optimizer": {"state": {}, "param_groups": []}, "epoch": 340,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(lr=1e-3, model="mae_vit_large")}, file)
    from_folder = E.load_encoder("local", E.ModelSource(str(folder)), device="cpu", offline=True, home=tmp_path)
    from_file = E.load_encoder("local", E.ModelSource(str(file), config=str(folder)), device="cpu", offline=True,
                               home=tmp_path)
    assert from_file.weights == _sha(file) == E.weights_identity(E.ModelSource(str(file)), offline=True,
                                                                 home=tmp_path)
    assert from_file.params["checkpoint"]["num_heads"] == 2
    assert from_file.params["checkpoint"]["layer_norm_eps"] == m.config.layer_norm_eps  # from the config
    clips = [_frames((3, 224, 224, 3), 1), _frames((1, 180, 200, 3), 2)]
    for a, b in zip(from_file.encode(clips), from_folder.encode(clips)):
        np.testing.assert_array_equal(a["mean"], b["mean"])


def test_mae_file_without_config_uses_the_documented_defaults(tmp_path):
    """heads = width // 64, LayerNorm eps 1e-6 (the MAE repository's), exact GELU; .safetensors works."""
    from safetensors.torch import save_file

    m = _tiny_mae(seed=1, hidden_size=64, num_attention_heads=1, intermediate_size=96, layer_norm_eps=1e-6)
    folder = tmp_path / "hf-mae64"
    m.save_pretrained(folder)
    file = tmp_path / "mae64.safetensors"
    save_file({k: v.contiguous() for k, v in _mae_file_dict(m).items()}, str(file))
    from_file = E.load_encoder("local", E.ModelSource(str(file)), device="cpu", offline=True, home=tmp_path)
    from_folder = E.load_encoder("local", E.ModelSource(str(folder)), device="cpu", offline=True, home=tmp_path)
    assert from_file.params["checkpoint"] == {"format": "mae", "num_heads": 1, "layer_norm_eps": 1e-6,
                                              "hidden_act": "gelu"}
    clip = [_frames((2, 224, 224, 3), 3)]
    np.testing.assert_array_equal(from_file.encode(clip)[0]["mean"], from_folder.encode(clip)[0]["mean"])


# --- VideoMAE (VideoMAE repository layout) ----------------------------------------------------

def _tiny_videomae(seed=0):
    from transformers import VideoMAEModel

    torch.manual_seed(seed)
    return _jitter(VideoMAEModel(videomae_config("tiny")), seed)


def _videomae_file_dict(model) -> dict:
    sd = model.state_dict()
    enc = {"encoder.patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "encoder.patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "encoder.norm.weight": sd["layernorm.weight"], "encoder.norm.bias": sd["layernorm.bias"]}
    enc.update(_hf_blocks_to_timm(sd, model.config.num_hidden_layers, "encoder.", "qv"))
    d = model.config.hidden_size
    decoder = {"mask_token": torch.randn(1, 1, 16), "encoder_to_decoder.weight": torch.randn(16, d),
               "decoder.blocks.0.attn.qkv.weight": torch.randn(48, 16), "decoder.norm.weight": torch.randn(16),
               "decoder.head.weight": torch.randn(1536, 16), "decoder.head.bias": torch.randn(1536)}
    return {**{k: v.detach().clone() for k, v in enc.items()}, **decoder}


def test_videomae_file_equals_hf_folder(tmp_path):
    m = _tiny_videomae()
    folder = tmp_path / "hf-videomae"
    m.save_pretrained(folder)
    file = tmp_path / "maeV_399.pth"
    torch.save({"module": _videomae_file_dict(m)}, file)
    from_folder = E.load_encoder("temporal", E.ModelSource(str(folder)), device="cpu", offline=True, home=tmp_path)
    from_file = E.load_encoder("temporal", E.ModelSource(str(file), config=str(folder)), device="cpu",
                               offline=True, home=tmp_path)
    assert from_file.weights == _sha(file)
    ck = from_file.params["checkpoint"]
    assert (ck["num_heads"], ck["num_frames"], ck["image_size"], ck["final_norm"]) == (2, 16, 224, True)
    assert from_file.params["tokens"] == 1568 and from_file.layer == from_folder.layer
    clips = [_frames((16, 224, 224, 3), 1), _frames((16, 160, 200, 3), 2)]
    for a, b in zip(from_file.encode(clips), from_folder.encode(clips)):
        np.testing.assert_array_equal(a["mean"], b["mean"])


def test_videomae_fine_tuned_layout_and_stored_pos_embed(tmp_path):
    """No `encoder.` prefix + fc_norm/head (fine-tuned): the un-normed tokens, as transformers gives with
    use_mean_pooling; a stored pos_embed must be the fixed sinusoid table; a minimal json config keeps
    the original defaults (eps 1e-6)."""
    from transformers import VideoMAEModel
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

    m = _tiny_videomae(seed=2)
    sd = {k[len("encoder."):]: v for k, v in _videomae_file_dict(m).items()
          if k.startswith("encoder.") and not k.startswith("encoder.norm.")}
    sd.update({"fc_norm.weight": torch.ones(24), "fc_norm.bias": torch.zeros(24), "head.weight": torch.zeros(7, 24),
               "head.bias": torch.zeros(7), "pos_embed": get_sinusoid_encoding_table(1568, 24)})
    file = tmp_path / "videomae_ft.pth"
    torch.save({"model": sd}, file)
    (tmp_path / "heads.json").write_text(json.dumps({"num_attention_heads": 2}))
    enc = E.load_encoder("temporal", E.ModelSource(str(file), config=str(tmp_path / "heads.json")), device="cpu",
                         offline=True, home=tmp_path)
    assert enc.layer == "last_hidden_state"
    assert enc.params["checkpoint"]["final_norm"] is False and enc.params["checkpoint"]["layer_norm_eps"] == 1e-6
    cfg = videomae_config("tiny")
    cfg.use_mean_pooling, cfg.layer_norm_eps = True, 1e-6
    ref = VideoMAEModel(cfg).eval()
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("layernorm.")})
    clip = [_frames((16, 224, 224, 3), 5)]
    want = E.wrap_model("temporal", ref, weights="mem", device="cpu").encode(clip)[0]["mean"]
    np.testing.assert_array_equal(enc.encode(clip)[0]["mean"], want)
    sd["pos_embed"] = torch.randn(1, 1568, 24)
    torch.save(sd, file)
    with pytest.raises(WeightsFileError, match="sinusoid"):
        E.load_encoder("temporal", E.ModelSource(str(file), config=str(tmp_path / "heads.json")), device="cpu",
                       offline=True, home=tmp_path)


# --- errors -----------------------------------------------------------------------------------

class NotATensor:  # a pickled object that needs code to load
    pass


def test_bad_files_fail_naming_the_keys(tmp_path):
    m = _tiny_mae()
    folder = tmp_path / "hf-mae"
    m.save_pretrained(folder)
    good = _mae_file_dict(m)

    def load(sd, name, **kw):
        f = tmp_path / name
        torch.save(sd, f)
        return E.load_encoder("local", E.ModelSource(str(f), **kw), device="cpu", offline=True, home=tmp_path)

    sd = dict(good)
    del sd["blocks.1.attn.qkv.weight"], sd["norm.bias"]
    with pytest.raises(WeightsFileError, match=r"missing keys: blocks\.1\.attn\.qkv\.weight, norm\.bias"):
        load(sd, "missing.pth", config=str(folder))
    sd = dict(good, **{"blocks.0.mlp.fc2.weight": torch.zeros(40, 81)})
    with pytest.raises(WeightsFileError,
                       match=r"mis-shaped keys: blocks\.0\.mlp\.fc2\.weight \(40, 81\) \(expected \(40, 80\)\)"):
        load(sd, "misshaped.pth", config=str(folder))
    sd = dict(good, **{"blocks.0.attn.rel_pos_bias": torch.zeros(3)})
    with pytest.raises(WeightsFileError, match=r"unexpected keys: blocks\.0\.attn\.rel_pos_bias"):
        load(sd, "unexpected.pth", config=str(folder))
    with pytest.raises(WeightsFileError, match=r"heads.*config"):  # 40 wide: width // 64 cannot say
        load(good, "noconfig.pth")
    with pytest.raises(WeightsFileError, match="refused: loading it would run code"):
        load({"model": good, "extra": NotATensor()}, "code.pth", config=str(folder))
    with pytest.raises(WeightsFileError, match="vit_mae"):  # a config of the wrong model
        videomae_cfg = tmp_path / "hf-videomae"
        _tiny_videomae().save_pretrained(videomae_cfg)
        load(good, "wrongcfg.pth", config=str(videomae_cfg))
    f = tmp_path / "good.pth"
    torch.save(good, f)
    with pytest.raises(ValueError, match="local, temporal and global"):
        E.load_encoder("audio", E.ModelSource(str(f)), device="cpu", offline=True, home=tmp_path)
    with pytest.raises(ValueError, match="applies to a weights file only"):
        E.load_encoder("local", E.ModelSource(str(folder), config=str(folder)), device="cpu", offline=True,
                       home=tmp_path)


def test_default_heads():
    assert (default_heads(1408), default_heads(1280), default_heads(1024), default_heads(768)) == (16, 16, 16, 12)
    with pytest.raises(WeightsFileError, match="config"):
        default_heads(40)


# --- sources ----------------------------------------------------------------------------------

def test_file_source_forms_and_identity(tmp_path):
    (tmp_path / "ckpt").mkdir()
    f = tmp_path / "ckpt" / "mae_340.pth"
    torch.save({"model": {"x": torch.ones(2)}}, f)
    (tmp_path / "vit-mae-large").mkdir()
    src = E.ModelSource.from_value({"model": "ckpt/mae_340.pth", "config": "vit-mae-large"}, base=tmp_path)
    assert src == E.ModelSource(str(f.resolve()), None, str((tmp_path / "vit-mae-large").resolve()))
    assert src.to_dict() == {"model": str(f.resolve()), "config": str((tmp_path / "vit-mae-large").resolve())}
    assert E.ModelSource.from_value(src.to_dict()) == src
    assert src.weights_file() == f.resolve() and E.ModelSource(str(tmp_path)).weights_file() is None
    cfg = E.EncodersConfig.from_dict({"local": {"model": "ckpt/mae_340.pth", "config": "vit-mae-large"},
                                      "global": {"model": "org/eva", "revision": "v1"}}, base=tmp_path)
    assert cfg.source("local") == src and cfg.source("global") == E.ModelSource("org/eva", "v1")
    assert E.EncodersConfig.from_dict(cfg.to_dict()) == cfg
    # identity: the sha256 of the file's bytes, cached like folders
    home = tmp_path / "home"
    assert E.weights_identity(src, offline=True, home=home) == _sha(f)
    assert str(f.resolve()) in json.loads((home / "hashes.json").read_text())
    torch.save({"model": {"x": torch.zeros(3)}}, f)
    assert E.weights_identity(src, offline=True, home=home) == _sha(f)
    # a missing file is a missing file, not a hub id
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        E.weights_identity(E.ModelSource("ckpt/nowhere.pth"), offline=True)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a weights file"):
        E.ModelSource(str(tmp_path / "notes.txt")).local_path()
