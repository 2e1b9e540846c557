"""How training draws timesteps: uniformly, or loss-aware importance sampling.

Loss-aware sampling is improved DDPM's LossSecondMomentResampler (Nichol & Dhariwal 2021,
arXiv 2102.09672, section 3.3): draw t with probability proportional to sqrt(E[L_t^2]) and reweight the
loss by 1 / (T p_t) so its expectation is unchanged. The prototype found the high-noise band decides
the content while low t is trivially solved; this puts the updates where the loss is. We keep the
history per band of timesteps rather than per t, so that it fills within a CPU-sized run.

"warped" draws t the same way but does not reweight, so the objective itself moves its weight to the
hard noise levels: a banded version of CDCD's time warping (Dieleman et al. 2022, arXiv 2211.15089),
which also fits the distribution of t to the loss instead of keeping the ELBO weighting.
"""

from __future__ import annotations

import torch


class UniformTimesteps:
    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(self, batch: int, device, noise=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``noise``: a :class:`~diffcap.diffusion.noise.StepNoise` to draw from (training), else the
        global RNG."""
        if noise is not None:
            t = noise.randint(self.num_timesteps)
        else:
            t = torch.randint(0, self.num_timesteps, (batch,), device=device)
        return t, torch.ones(batch, device=device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass


class LossAwareTimesteps(UniformTimesteps):
    def __init__(
        self,
        num_timesteps: int,
        *,
        bands: int = 20,
        history: int = 10,
        uniform_prob: float = 0.001,
        reweight: bool = True,
    ):
        super().__init__(num_timesteps)
        self.reweight = reweight
        self.bands = min(bands, num_timesteps)
        self.history = torch.zeros(self.bands, history)
        self.filled = torch.zeros(self.bands, dtype=torch.long)
        self.uniform_prob = uniform_prob

    def band_probs(self) -> torch.Tensor:
        if (self.filled < self.history.shape[1]).any():
            return torch.full((self.bands,), 1.0 / self.bands)
        w = self.history.pow(2).mean(dim=1).sqrt()
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.bands

    def sample(self, batch, device, noise=None):
        p = self.band_probs()
        band = noise.multinomial(p).cpu() if noise is not None else torch.multinomial(p, batch, replacement=True)
        width = self.num_timesteps / self.bands
        lo = (band.float() * width).floor()
        hi = ((band.float() + 1) * width).floor()
        frac = noise.rand().cpu() if noise is not None else torch.rand(batch)
        t = (lo + frac * (hi - lo)).long().clamp(max=self.num_timesteps - 1)
        weights = 1.0 / (self.bands * p[band]) if self.reweight else torch.ones(batch)
        return t.to(device), weights.to(device)

    def band_of(self, t: torch.Tensor) -> torch.Tensor:
        return (t.cpu() * self.bands // self.num_timesteps).clamp(max=self.bands - 1)

    def update(self, t, losses):
        for b, loss in zip(self.band_of(t).tolist(), losses.detach().float().cpu().tolist()):
            h = self.history[b]
            self.history[b] = torch.cat([h[1:], torch.tensor([loss])])
            self.filled[b] += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.clone(), "filled": self.filled.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.history.copy_(state["history"])
        self.filled.copy_(state["filled"])


def trailing_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The timesteps a sampler with ``timestep_spacing="trailing"`` evaluates: diffusers' formula, written
    out because the sampler module imports this one (tests/test_refinement_training.py checks they agree)."""
    return [round(num_timesteps - i * num_timesteps / steps) - 1 for i in range(steps)]


class GridTimesteps(UniformTimesteps):
    """Uniform over the timesteps that a 1..``max_steps``-step trailing sampler evaluates: a few-step
    sampler only ever asks the network about these, so training spends all its updates there."""

    def __init__(self, num_timesteps: int, max_steps: int):
        super().__init__(num_timesteps)
        grid = sorted({t for s in range(1, max_steps + 1) for t in trailing_timesteps(num_timesteps, s)})
        self.grid = torch.tensor(grid)

    def sample(self, batch, device, noise=None):
        i = noise.randint(len(self.grid)).cpu() if noise is not None else torch.randint(0, len(self.grid), (batch,))
        return self.grid[i].to(device), torch.ones(batch, device=device)


def make_timestep_sampler(name: str, num_timesteps: int, grid_steps: int = 5) -> UniformTimesteps:
    if name == "uniform":
        return UniformTimesteps(num_timesteps)
    if name == "loss_aware":
        return LossAwareTimesteps(num_timesteps)
    if name == "warped":
        return LossAwareTimesteps(num_timesteps, reweight=False)
    if name == "grid":
        return GridTimesteps(num_timesteps, grid_steps)
    raise ValueError(f"unknown timestep sampler {name!r}; choose uniform, loss_aware, warped or grid")
