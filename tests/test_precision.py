"""``auto`` precision: bf16 only where the machine computes it natively (diffcap.precision)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import small_config

from diffcap import precision
from diffcap.config import ConfigError, apply_override, validate
from diffcap.data.contract import FeatureStore
from diffcap.experiments.budget import reset_accelerate
from diffcap.pipeline import CaptionPipeline
from diffcap.training import Trainer


@pytest.fixture(params=[False, True], ids=["avx2-only", "native-bf16"])
def native(request, monkeypatch):
    """Pretend the machine has (or lacks) native bf16 matmuls, whatever this one has."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: request.param)
    return request.param


def test_auto_resolves_by_the_machine(native):
    assert precision.training_precision("auto", "cpu") == ("bf16" if native else "no")
    assert precision.sampling_in_bf16("auto", "cpu") is native
    # explicit settings are honoured either way
    assert precision.training_precision("no", "cpu") == "no"
    assert precision.training_precision("bf16", "cpu") == "bf16"
    assert precision.sampling_in_bf16("bf16", "cpu") and not precision.sampling_in_bf16("fp32", "cpu")


def test_explicit_bf16_without_native_support_warns(monkeypatch, caplog):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="diffcap.precision"):
        assert precision.training_precision("bf16", "cpu") == "bf16"
    assert "no native bf16" in caplog.text


def test_native_bf16_on_this_cpu_is_pytorchs_own_check():
    assert precision.native_bf16("cpu") is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_config_accepts_auto_and_names_the_choices():
    cfg = small_config(Path("unused"))
    apply_override(cfg, "train.mixed_precision=auto")
    apply_override(cfg, "sampler.precision=auto")
    validate(cfg)
    apply_override(cfg, "sampler.precision=bf17")
    with pytest.raises(ConfigError, match="auto"):
        validate(cfg)


def test_trainer_and_pipeline_follow_auto(native, feature_data, tmp_path, monkeypatch):
    cfg = small_config(feature_data, steps=3)
    cfg.train.mixed_precision, cfg.sampler.precision = "auto", "auto"
    reset_accelerate()  # Accelerate keeps one process state, and with it the precision of an earlier test
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.accelerator.mixed_precision == ("bf16" if native else "no")
    trainer.train(resume=False)
    pipe = CaptionPipeline.from_pretrained(tmp_path / "run")
    asked = []
    real = pipe._model_for
    monkeypatch.setattr(pipe, "_model_for", lambda p: asked.append(p) or real(p))
    feats = FeatureStore.open(cfg.data.features).get(["val0", "val1"])
    assert len(pipe(feats).texts) == 2
    assert asked == ["bf16" if native else "fp32"]
    reset_accelerate()
