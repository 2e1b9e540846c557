"""diffusion.loss=vlb: the closed-form terms of the variational bound against direct computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffcap.diffusion.schedules import make_betas
from diffcap.diffusion.vlb import VariationalBound

T = 50
LOG2 = math.log(2.0)
TOL = {"rtol": 1e-5, "atol": 1e-6}  # the schedule's tables are float32, as in training


@pytest.fixture
def setup():
    betas = torch.tensor(make_betas("sqrt", T))
    g = torch.Generator().manual_seed(0)
    x0, noise, x0_hat = (torch.randn(3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    return VariationalBound(betas).double(), betas.double(), x0, noise, x0_hat


def direct_posterior(betas, x0, x_t, step):
    """q(x_{s-1} | x_s, x_0) by Bayes' rule, multiplying q(x_s | x_{s-1}) = N(sqrt(alpha_s) x_{s-1}, beta_s)
    with q(x_{s-1} | x_0) = N(sqrt(abar_{s-1}) x_0, 1 - abar_{s-1}) and completing the square."""
    alphas = 1 - betas
    abar_prev = torch.prod(alphas[:step])  # index step-1 in 0-based terms is x_step; its predecessor
    precision = alphas[step] / betas[step] + 1 / (1 - abar_prev)
    mean = (alphas[step].sqrt() / betas[step] * x_t + abar_prev.sqrt() / (1 - abar_prev) * x0) / precision
    return mean, 1 / precision


@pytest.mark.parametrize("step", [1, 7, T - 1])
def test_kl_term_is_the_kl_of_the_two_posteriors(setup, step):
    vlb, betas, x0, noise, x0_hat = setup
    abar = torch.prod(1 - betas[: step + 1])
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    t = torch.full((3,), step)
    true_mean, var = direct_posterior(betas, x0, x_t, step)
    model_mean, _ = direct_posterior(betas, x0_hat, x_t, step)
    expected = kl_divergence(Normal(true_mean, var.sqrt()), Normal(model_mean, var.sqrt())).mean(dim=(1, 2)) / LOG2
    torch.testing.assert_close(vlb.terms(x0, x_t, x0_hat, t), expected, **TOL)
    assert torch.all(vlb.terms(x0, x_t, x0, t).abs() < 1e-9)  # a perfect estimate costs nothing
    mean, logvar = vlb.posterior(x0, x_t, t)
    torch.testing.assert_close((mean, logvar.exp()), (true_mean, var.expand_as(mean)), **TOL)


def test_decoder_nll_and_prior(setup):
    vlb, betas, x0, noise, x0_hat = setup
    x_1 = (1 - betas[0]).sqrt() * x0 + betas[0].sqrt() * noise
    t0 = torch.zeros(3, dtype=torch.long)
    # at t = 0 the model's mean is its x0 estimate, at the clipped variance: that of the next step
    _, var_1 = direct_posterior(betas, x0, x_1, 1)
    expected = -Normal(x0_hat, var_1.sqrt()).log_prob(x0).mean(dim=(1, 2)) / LOG2
    torch.testing.assert_close(vlb.terms(x0, x_1, x0_hat, t0), expected, **TOL)

    abar_T = torch.prod(1 - betas)
    q_T = Normal(abar_T.sqrt() * x0, (1 - abar_T).sqrt())
    prior = kl_divergence(q_T, Normal(torch.zeros_like(x0), torch.ones_like(x0))).mean(dim=(1, 2)) / LOG2
    torch.testing.assert_close(vlb.prior(x0), prior, **TOL)


def test_the_loss_is_an_unbiased_estimate_of_the_bound_over_t(setup):
    vlb, betas, x0, noise, x0_hat = setup
    estimate = lambda x_t, t: x0_hat + 0.1 * x_t  # noqa: E731  (any function of x_t and t)
    total = vlb.total(x0, estimate, noise)
    per_t = []
    for step in range(T):
        t = torch.full((3,), step)
        abar = torch.prod(1 - betas[: step + 1])
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        per_t.append(vlb.loss(x0, x_t, estimate(x_t, t), t))
    torch.testing.assert_close(torch.stack(per_t).mean(dim=0) * T, total, **TOL)
