import pytest

from diffcap.config import Config, ConfigError


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  fusion: add\ntrain:\n  steps: 7\n")
    cfg = Config.load(path, ["train.lr=0.002", "model.backbone=null", "sampler.clamp=false"])
    assert (cfg.model.fusion, cfg.train.steps, cfg.train.lr, cfg.sampler.clamp) == ("add", 7, 0.002, False)
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("override,message", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("nosection.x=1", "unknown config key 'nosection'"),
    ("train.steps=1.5", "'train.steps' must be an integer"),
    ("model.fusion=sum", "'model.fusion' is 'sum'"),
    ("train.steps", "must look like section.key=value"),
])
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
