"""What the denoiser predicts, and how to turn its output back into an x0 estimate.

Each objective is a small class chosen once from the config, so the diffusion core has no mode
strings. Notation: x_t = a_t x0 + s_t eps with a_t = sqrt(alpha_bar_t), s_t = sqrt(1 - alpha_bar_t).
"""

from __future__ import annotations

import torch


class Objective:
    """``tables`` is the owning diffusion module; its buffers ``a``, ``s`` (T,) and ``a_ext``, ``s_ext``
    (T+1,, index 0 = clean data) are read at call time so they follow the module across devices."""

    def __init__(self, tables):
        self.tables = tables

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return table[t][:, None, None]  # (B,) -> (B, 1, 1) for broadcasting over (B, L, D)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_x0(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PredictX0(Objective):
    """Predict the clean embeddings (Diffusion-LM; the seed's choice)."""

    def target(self, x0, noise, t):
        return x0

    def to_x0(self, out, x_t, t):
        return out


class PredictEps(Objective):
    """Predict the noise (DDPM). x0 = (x_t - s_t eps) / a_t, unstable where a_t -> 0."""

    def target(self, x0, noise, t):
        return noise

    def to_x0(self, out, x_t, t):
        return (x_t - self._at(self.tables.s, t) * out) / self._at(self.tables.a, t).clamp(min=1e-4)


class PredictXtk(Objective):
    """Predict x_{t-k} on the same noise path, the seed's x_{t-30} (k = step_gap).

    With x_{t-k} = a' x0 + s' eps and x_t = a x0 + s eps, eliminating eps gives
    x0 = (s' x_t - s x_{t-k}) / (s' a - s a'). For t < k the target is x0 itself (a'=1, s'=0).
    """

    def __init__(self, tables, k: int):
        super().__init__(tables)
        self.k = k

    def _prev(self, t):
        return (t - self.k).clamp(min=-1) + 1

    def target(self, x0, noise, t):
        p, tb = self._prev(t), self.tables
        return self._at(tb.a_ext, p) * x0 + self._at(tb.s_ext, p) * noise

    def to_x0(self, out, x_t, t):
        p, tb = self._prev(t), self.tables
        a, s = self._at(tb.a, t), self._at(tb.s, t)
        a2, s2 = self._at(tb.a_ext, p), self._at(tb.s_ext, p)
        return (s2 * x_t - s * out) / (s2 * a - s * a2)


def make_objective(name: str, tables, step_gap: int) -> Objective:
    if name == "x0":
        return PredictX0(tables)
    if name == "eps":
        return PredictEps(tables)
    if name == "xtk":
        return PredictXtk(tables, step_gap)
    raise ValueError(f"unknown objective {name!r}; choose x0, eps or xtk")
