import re

import pytest

from diffcap.config import Config, ConfigError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  fusion: add\ntrain:\n  steps: 7\n")
    cfg = Config.load(path, ["train.lr=0.002", "model.backbone=null", "sampler.clamp=false"])
    assert (cfg.model.fusion, cfg.train.steps, cfg.train.lr, cfg.sampler.clamp) == ("add", 7, 0.002, False)
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'"),
        ("nosection.x=1", "unknown config key 'nosection'"),
        ("train.steps=1.5", "'train.steps' must be an integer"),
        ("model.fusion=sum", "'model.fusion' is 'sum'"),
        ("train.steps", "must look like section.key=value"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        Config.load(None, [override])


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.epochs'"):
        Config.load(path)
    with pytest.raises(ConfigError, match="config file not found"):
        Config.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "section, message",
    [
        ({"sampler": {"mbr": 1000000}}, "sampler.mbr must be in 1..64"),
        ({"sampler": {"method": "bogus"}}, "'sampler.method' is 'bogus'"),
        ({"model": {"kind": "gan"}}, "'model.kind' is 'gan'"),
    ],
)
def test_a_run_config_is_validated_when_loaded(section, message):
    with pytest.raises(ConfigError, match=f"run/config.json: .*{message}"):
        Config.from_dict(section, "run/config.json")


def test_resolve_returns_a_new_config_with_the_condition_shape(tmp_path):
    from pathlib import Path

    import torch

    from diffcap.config import resolve
    from diffcap.data.contract import FeatureSpec
    from diffcap.text.tokenizer import CaptionTokenizer

    cfg = Config()
    tokenizer = CaptionTokenizer.build_word_level(["a dog"], max_length=5)
    grid = FeatureSpec(Path("f.safetensors"), (49, 768), torch.float16, {"encoder": "clip", "kind": "clip-image"})
    resolved = resolve(cfg, grid, tokenizer)
    assert (resolved.model.cond_tokens, resolved.model.cond_dim) == (49, 768)
    assert (resolved.data.encoder, resolved.data.encoder_kind) == ("clip", "clip-image")
    assert (cfg.model.cond_tokens, cfg.model.cond_dim, cfg.data.encoder) == (0, 0, "")  # not written into
    pixels = FeatureSpec(Path("f.safetensors"), (3, 64, 64), torch.uint8, {"kind": "pixels"})
    with pytest.raises(ConfigError, match="set model.image_encoder=cnn"):
        resolve(cfg, pixels, tokenizer)
    cfg.model.image_encoder = "cnn"
    cnn = resolve(cfg, pixels, tokenizer).model
    assert (cnn.cond_tokens, cnn.cond_dim) == (16, 128)


@pytest.mark.parametrize(
    "setting, named",
    [
        ("model.freeze_projections=true", "model.freeze_projections=true"),
        ("model.projection_bias=false", "model.projection_bias=false"),
        ("model.cond_segments=1,1", "model.cond_segments='1,1'"),
    ],
)
def test_denoiser_settings_are_refused_for_the_autoregressive_captioner(setting, named):
    Config.load(None, [setting])  # a diffusion run takes them
    with pytest.raises(ConfigError, match=re.escape(named)) as info:
        Config.load(None, ["model.kind=autoregressive", setting])
    assert "a setting of the diffusion denoiser; model.kind=autoregressive has none" in str(info.value)
