"""The random draws of one training step, independent of how the batch is split over processes.

With the global torch RNG every process of a multi-process run draws its own noise (and, seeded alike,
the same noise for every shard), so N processes with batch B would not train like one process with
batch N*B. Here every process draws the values of the *whole global batch* from a generator seeded by
(seed, step) and keeps its own rows: an example's timestep and noise depend only on the step and its
position in the global batch. A side effect: training noise needs no RNG state to resume exactly.
The extra draws cost little next to the forward pass (the noise is [B x L x D] per process).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class StepNoise:
    """Draws for this process's rows of a global batch laid out as [K x world*B] (K timesteps per
    caption, ``world`` processes of ``batch`` examples, this one being ``rank``); each method returns
    the local rows flattened to [K*B, ...], the layout of ``ids.repeat(K, 1)``."""

    def __init__(
        self,
        seed: int,
        step: int,
        *,
        k: int,
        batch: int,
        rank: int = 0,
        world: int = 1,
        device: torch.device | str = "cpu",
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        key = int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0]) >> 1
        self.seed, self.step = seed, step
        self.k, self.batch, self.rank, self.world = k, batch, rank, world
        self.device = torch.device(device)
        self.cpu = torch.Generator().manual_seed(key)
        # Large draws (the noise) happen on the accelerator, with its own generator.
        self.dev = self.cpu if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(key)
        self._gather = gather

    def _local(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(self.k, self.world * self.batch, *x.shape[1:])[
            :, self.rank * self.batch : (self.rank + 1) * self.batch
        ]
        return x.reshape(self.k * self.batch, *x.shape[2:]).to(self.device)

    @property
    def _n(self) -> int:
        return self.k * self.world * self.batch

    def randn(self, *shape: int) -> torch.Tensor:
        """[K*B x *shape] standard normal."""
        return self._local(torch.randn(self._n, *shape, generator=self.dev, device=self.device))

    def rand(self) -> torch.Tensor:
        """[K*B] uniform on [0, 1)."""
        return self._local(torch.rand(self._n, generator=self.cpu))

    def randint(self, high: int) -> torch.Tensor:
        """[K*B] integers in [0, high)."""
        return self._local(torch.randint(0, high, (self._n,), generator=self.cpu))

    def multinomial(self, probs: torch.Tensor) -> torch.Tensor:
        """[K*B] indices drawn with replacement from ``probs``."""
        return self._local(torch.multinomial(probs.cpu(), self._n, replacement=True, generator=self.cpu))

    def example_randn(self, *shape: int) -> torch.Tensor:
        """[B x *shape] standard normal, one row per example (not per timestep): this process's rows
        of a [world*B] draw. It comes from a stream of its own, keyed by (seed, step, 1), so it does
        not shift the draws of the other methods (e.g. CapDec's noise on the conditions)."""
        key = int(np.random.SeedSequence([self.seed, self.step, 1]).generate_state(1, np.uint64)[0]) >> 1
        gen = torch.Generator(self.device).manual_seed(key)
        full = torch.randn(self.world * self.batch, *shape, generator=gen, device=self.device)
        return full[self.rank * self.batch : (self.rank + 1) * self.batch]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The [K*world*B] values of the global batch from every process's [K*B] rows, in the order
        a single process would hold them (so stateful timestep samplers update identically)."""
        if self._gather is None or self.world == 1:
            return x
        full = self._gather(x.contiguous())  # [world*K*B], process-major
        return full.view(self.world, self.k, self.batch).transpose(0, 1).reshape(-1)
