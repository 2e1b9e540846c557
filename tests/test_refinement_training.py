"""Training for few-step refinement: step-unrolled examples (diffusion.unroll_prob) build x_t exactly as
the DDIM sampler does, and grid timesteps (diffusion.timestep_sampler=grid) are the sampler's own."""

import pytest
import torch

from diffcap.config import Config, ConfigError, DiffusionConfig, validate
from diffcap.diffusion.diffusion import GaussianDiffusion
from diffcap.diffusion.sampler import make_scheduler


@pytest.mark.parametrize("steps", [2, 3, 5])
def test_unrolled_x_t_is_the_ddim_step(steps):
    diffusion = GaussianDiffusion(DiffusionConfig(schedule="linear", num_timesteps=200))
    scheduler = make_scheduler("ddim", diffusion, steps)
    g = torch.Generator().manual_seed(0)
    x_from, x0_hat = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    t_from = int(scheduler.timesteps[0])
    t_to = t_from - 200 // steps  # DDIMScheduler.step's own previous timestep
    expected = scheduler.step(x0_hat, scheduler.timesteps[0], x_from).prev_sample
    got = diffusion.unrolled_x_t(x0_hat, x_from, torch.full((3,), t_from), torch.full((3,), t_to))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unroll_needs_x0_objective():
    cfg = Config()
    cfg.diffusion.unroll_prob, cfg.diffusion.objective = 0.5, "eps"
    with pytest.raises(ConfigError, match="unroll_prob"):
        validate(cfg)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7])
def test_trailing_timesteps_match_the_sampler(steps):
    from diffcap.diffusion.timesteps import trailing_timesteps

    diffusion = GaussianDiffusion(DiffusionConfig(schedule="linear", num_timesteps=2000))
    assert trailing_timesteps(2000, steps) == make_scheduler("ddim", diffusion, steps).timesteps.tolist()


def test_grid_timesteps_draw_only_sampler_timesteps():
    from diffcap.diffusion.timesteps import GridTimesteps

    grid = GridTimesteps(2000, 3)
    t, w = grid.sample(4000, "cpu")
    assert sorted(set(t.tolist())) == [666, 999, 1332, 1999]
    assert torch.equal(w, torch.ones(4000))


def test_unrolled_examples_learn_from_the_ddim_step_of_the_first_estimate(feature_data, tmp_path):
    """With unroll_prob=1 the no-gradient pass runs at t = T-1 from x_T, and the pass that is trained
    sees exactly the DDIM step from that clamped estimate, with the estimate as self-conditioning."""
    from conftest import small_config

    from diffcap.data.contract import FeatureStore
    from diffcap.training import Trainer

    cfg = small_config(feature_data, steps=2)
    cfg.diffusion.unroll_prob = 1.0
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train(resume=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    calls = []

    def spy(x_t, t, cond, self_cond=None, drop_cond=None, return_logits=False):
        out = original(x_t, t, cond, self_cond, drop_cond, return_logits=return_logits)
        calls.append((x_t, t, self_cond, out[0] if return_logits else out))
        return out

    original, model.forward = model.forward, spy
    ids = trainer.tokenizer.encode(["a red cube", "a blue ball"])
    feats = FeatureStore.open(feature_data / "features.safetensors").get(["img0", "img1"])
    torch.manual_seed(0)
    model.training_losses(ids, feats)
    (x_first, t_first, sc_first, first), (x_t, t, self_cond, _) = calls
    top = cfg.diffusion.num_timesteps - 1
    assert t_first.tolist() == [top, top] and sc_first is None
    expected = model.diffusion.unrolled_x_t(model.embedding.clamp(first), x_first, t_first, t)
    torch.testing.assert_close(x_t, expected)
    torch.testing.assert_close(self_cond, first)


def test_training_with_unroll_and_grid_timesteps_still_overfits(feature_data, tmp_path):
    from conftest import CAPTIONS, small_config

    from diffcap.data.contract import FeatureStore
    from diffcap.pipeline import CaptionPipeline
    from diffcap.training import Trainer

    cfg = small_config(feature_data, steps=400)
    cfg.diffusion.timesteps_per_caption = 4
    cfg.diffusion.unroll_prob, cfg.diffusion.timestep_sampler, cfg.diffusion.grid_steps = 0.5, "grid", 3
    Trainer(cfg, tmp_path / "run").train(resume=False)
    pipe = CaptionPipeline.from_pretrained(tmp_path / "run")
    feats = FeatureStore.open(feature_data / "features.safetensors").get([f"img{i}" for i in range(8)])
    for steps in (1, 2, 3):
        assert pipe(feats, seed=0, steps=steps, method="ddim").texts == CAPTIONS
