"""Noise schedules as beta sequences of length T (index t = 0 .. T-1, as in diffusers).

All three are defined through alpha_bar(t) = prod_{s<=t} (1 - beta_s):
- linear: DDPM (Ho et al. 2020, arXiv 2006.11239), betas 1e-4 .. 0.02 for T = 1000, rescaled for
  other T as in improved DDPM (Nichol & Dhariwal 2021, arXiv 2102.09672, appendix).
- cosine: improved DDPM, alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2), s = 0.008.
- sqrt: Diffusion-LM (Li et al. 2022, arXiv 2205.14217), alpha_bar(u) = 1 - sqrt(u + s), s = 1e-4,
  which adds noise fast at small t: word embeddings are far apart, so a little noise barely
  changes the nearest word.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np


def betas_from_alpha_bar(
    alpha_bar: Callable[[float], float], num_timesteps: int, max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(u), u in [0, 1], into T betas (improved DDPM, eq. 17).

    diffusers has this helper only for its built-in transforms, not for Diffusion-LM's sqrt.
    """
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.asarray(betas, dtype=np.float64)


def _cosine(u: float, s: float = 0.008) -> float:
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2


def _sqrt(u: float, s: float = 1e-4) -> float:
    return 1.0 - math.sqrt(u + s)


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    if schedule == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if schedule == "cosine":
        return betas_from_alpha_bar(_cosine, num_timesteps)
    if schedule == "sqrt":
        return betas_from_alpha_bar(_sqrt, num_timesteps)
    raise ValueError(f"unknown noise schedule {schedule!r}; choose linear, cosine or sqrt")


def alpha_bar(betas: np.ndarray) -> np.ndarray:
    return np.cumprod(1.0 - betas)
