"""Seed-log settings that change training: diffusion.loss=vlb and model.freeze_projections."""

from __future__ import annotations

import json

import pytest
import torch

from diffcap.config import Config, ConfigError, DiffusionConfig, ModelConfig
from diffcap.diffusion.vlb import VariationalBound
from diffcap.models.diffusion_captioner import DiffusionCaptioner

IDS = torch.tensor([[2, 3, 5, 0, 0], [4, 4, 2, 6, 0]])


def tiny(diffusion: DiffusionConfig, **model) -> DiffusionCaptioner:
    cfg = ModelConfig(
        **{"d_model": 16, "n_layers": 1, "n_heads": 2, "emb_dim": 8, "cond_dim": 4, "cond_tokens": 1} | model
    )
    torch.manual_seed(0)
    return DiffusionCaptioner(cfg, diffusion, vocab_size=8, seq_len=5)


def test_vlb_loss_is_the_bound_over_t(monkeypatch):
    diffusion = DiffusionConfig(num_timesteps=40, loss="vlb", cond_dropout=0.0)
    model = tiny(diffusion, self_condition=False)
    x0 = model.embedding(IDS)
    # a denoiser that knows the caption: every KL term is 0, so at t >= 1 the loss is the prior's share
    monkeypatch.setattr(model, "forward", lambda x_t, t, *args, return_logits=False, **kw: (x0, None))
    t = torch.tensor([5, 30])
    terms = model.diffusion.training_losses(model, IDS, torch.randn(2, 4), t=t)
    bound = VariationalBound(model.diffusion.betas)
    torch.testing.assert_close(terms["diffusion"], bound.prior(x0).mean() / 40)
    l1 = tiny(DiffusionConfig(num_timesteps=40, cond_dropout=0.0), self_condition=False).diffusion
    assert float(l1.training_losses(model, IDS, torch.randn(2, 4), t=t)["diffusion"].detach()) == 0  # L1 sees none


def test_vlb_trains(feature_data, tmp_path):
    from conftest import small_config

    from diffcap.training import Trainer

    cfg = small_config(feature_data, steps=30)
    cfg.diffusion.loss, cfg.diffusion.prior_weight = "vlb", 0.0
    cfg.train.log_every = 1
    Trainer(cfg, tmp_path / "run").train(resume=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()]
    losses = torch.tensor([row["train/loss"] for row in rows if "train/loss" in row])
    assert len(losses) == 30 and torch.isfinite(losses).all()
    assert losses[-5:].mean() < 0.7 * losses[:5].mean()  # the bound's gradients train the model


def test_frozen_projections_start_as_the_identity_and_do_not_train():
    diffusion = DiffusionConfig(num_timesteps=40, cond_dropout=0.0)
    model = tiny(diffusion, d_model=8, freeze_projections=True, projection_bias=False)
    d = model.denoiser
    assert d.in_proj.bias is None and d.out_proj.bias is None
    assert torch.equal(d.in_proj.weight, torch.eye(8).repeat(1, 2)) and torch.equal(d.out_proj.weight, torch.eye(8))
    assert not d.in_proj.weight.requires_grad and not d.out_proj.weight.requires_grad
    model.training_losses(IDS, torch.randn(2, 4))["loss"].backward()
    assert d.in_proj.weight.grad is None and d.out_proj.weight.grad is None
    assert d.cond_proj[0].weight.grad is not None  # the rest trains

    wide = tiny(diffusion, freeze_projections=True)  # emb_dim 8 -> d_model 16: frozen where they start
    assert not wide.denoiser.in_proj.weight.requires_grad and wide.denoiser.in_proj.bias is not None


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="freeze_projections"):
        Config.load(None, ["model.freeze_projections=true", "model.score_interpolation=true"])
    with pytest.raises(ConfigError, match="diffusion.loss=vlb"):
        Config.load(None, ["diffusion.loss=vlb", "diffusion.mask_predict_prob=0.5"])
