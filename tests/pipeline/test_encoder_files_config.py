"""An encoder given as a weights file (+ its architecture folder) in the extraction TOML reaches the loader."""

import pytest

from emollama.pipeline.config import load_config
from emollama.pipeline.extraction import encoders_config
from emollama.train.config import ConfigError


def test_weights_file_and_config_pass_from_toml_to_the_encoder_source(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    toml = tmp_path / "x.toml"
    toml.write_text(f"""
[dataset]
kind = "folder"
root = "{data}"
[extract]
store = "{tmp_path / 's.zarr'}"
profile = "paper"
global_frame = "first"
[extract.encoders.global]
model = "/models/eva_vit_g.pth"
[extract.encoders.local]
model = "/models/mae_340.pth"
config = "/models/vit-mae-large"
""")
    cfg = load_config(toml)
    enc = encoders_config(cfg)
    assert enc.source("global").model == "/models/eva_vit_g.pth" and enc.source("global").config is None
    assert (enc.source("local").model, enc.source("local").config) == ("/models/mae_340.pth", "/models/vit-mae-large")
    assert enc.source("audio").model == "TencentGameMate/chinese-hubert-large"   # the profile's
    # the resolved config (saved with every feature set) rebuilds the same sources
    again = load_config(None, {"dataset": {"kind": "folder", "root": str(data)}, "extract": cfg.to_dict()["extract"]})
    assert encoders_config(again) == enc
    toml.write_text(toml.read_text() + 'weights = "x"\n')
    with pytest.raises(ConfigError, match=r"unknown keys \['weights'\]"):
        load_config(toml)
