"""The variational bound of Gaussian diffusion over word embeddings, in closed form.

The bound on -log p(x_0) is (Ho et al. 2020, arXiv 2006.11239, eq. 5)

    L = L_T + sum_{t>=1} L_{t-1} + L_0,
    L_T     = KL(q(x_T | x_0) || N(0, I))                      the prior term
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))    two Gaussians: closed form
    L_0     = -log p(x_0 | x_1)                                 the decoder NLL

Here p(x_{t-1} | x_t) is the posterior q(x_{t-1} | x_t, x_0) with the model's x0 estimate put in for
x_0, at the posterior's own (fixed) variance, as improved DDPM's "fixed small" variances (Nichol &
Dhariwal 2021, arXiv 2102.09672, whose ``normal_kl`` and clipped log-variance this follows). At t = 0
the posterior mean is the x0 estimate itself, and the decoder is that Gaussian's density of the true
embeddings (continuous, as Diffusion-LM's embeddings are, arXiv 2205.14217; the rounding cross-entropy,
-log p(w | x_0), stays a separate term). Timestep indices are 0-based as in the rest of diffcap: index t
is the DDPM step t + 1, so index 0 is x_1. Every term is in bits per embedding dimension.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, exp(logvar)), elementwise, in nats."""
    return 0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def _bits_per_dim(nats: torch.Tensor) -> torch.Tensor:
    return nats.mean(dim=tuple(range(1, nats.dim()))) / math.log(2.0)  # [B]


class VariationalBound(nn.Module):
    """The terms of the bound for the schedule ``betas`` [T]; buffers outside the state dict."""

    def __init__(self, betas: torch.Tensor):
        super().__init__()
        b = betas.double()
        abar = torch.cumprod(1 - b, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=b.dtype), abar[:-1]])
        variance = b * (1 - abar_prev) / (1 - abar)  # beta~_t, 0 at index 0
        tables = {
            "abar": abar,
            # q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, variance) (Ho et al., eq. 7)
            "coef_x0": b * abar_prev.sqrt() / (1 - abar),
            "coef_xt": (1 - abar_prev) * (1 - b).sqrt() / (1 - abar),
            # improved DDPM clips the log-variance at index 0 (where it is log 0) to index 1's
            "logvar": torch.log(torch.cat([variance[1:2], variance[1:]])),
        }
        for name, table in tables.items():
            self.register_buffer(name, table.float(), persistent=False)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] broadcast over ``like`` [B x L x D] (t [B] per caption, or [B x L] per position)."""
        values = table[t]
        return values.reshape(*values.shape, *([1] * (like.dim() - values.dim())))

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and (clipped) log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.coef_x0, t, x0) * x0 + self._at(self.coef_xt, t, x0) * x_t
        return mean, self._at(self.logvar, t, x0).expand_as(mean)

    def terms(self, x0: torch.Tensor, x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """L_{t-1} for t >= 1 and the decoder NLL L_0 at t = 0, per caption [B], given the model's x0
        estimate ``x0_hat`` from ``x_t`` (all [B x L x D], ``t`` [B])."""
        true_mean, logvar = self.posterior(x0, x_t, t)
        model_mean, _ = self.posterior(x0_hat, x_t, t)
        kl = _bits_per_dim(normal_kl(true_mean, logvar, model_mean, logvar))
        decoder_nll = _bits_per_dim(gaussian_nll(x0, model_mean, logvar))
        return torch.where(t == 0, decoder_nll, kl)

    def prior(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per caption [B]."""
        abar_T = self.abar[-1]
        mean, logvar = abar_T.sqrt() * x0, torch.log(1 - abar_T).expand_as(x0)
        return _bits_per_dim(normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0)))

    def loss(self, x0: torch.Tensor, x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The bound divided by T, per caption [B]: for t drawn uniformly, L_t + L_T / T has expectation
        (L_T + sum_t L_t) / T, so that the loss stays on the scale of one term."""
        return self.terms(x0, x_t, x0_hat, t) + self.prior(x0) / len(self.abar)

    def total(self, x0: torch.Tensor, x0_hat_of, noise: torch.Tensor) -> torch.Tensor:
        """The whole bound per caption [B], every t evaluated: ``x0_hat_of(x_t, t)`` gives the model's
        estimate; x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise. For checks and small T only."""
        total = self.prior(x0)
        for step in range(len(self.abar)):
            t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
            a = self._at(self.abar, t, x0)
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            total = total + self.terms(x0, x_t, x0_hat_of(x_t, t), t)
        return total
