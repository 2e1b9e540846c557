"""Gaussian diffusion over word embeddings: the forward process and the training losses.

The schedule lives here as buffers; the denoiser never sees it. Losses come back as a dict of named
terms so each can be logged (improved-diffusion style), plus per-sample values and timesteps for the
loss-per-quartile report.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import DiffusionConfig
from .noise import StepNoise
from .objectives import make_objective
from .schedules import alpha_bar, make_betas
from .timesteps import make_timestep_sampler
from .vlb import VariationalBound


class GaussianDiffusion(nn.Module):
    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.cfg = cfg
        self.num_timesteps = cfg.num_timesteps
        betas = make_betas(cfg.schedule, cfg.num_timesteps)
        ab = torch.tensor(alpha_bar(betas), dtype=torch.float32)
        self.register_buffer("betas", torch.tensor(betas, dtype=torch.float32), persistent=False)
        self.register_buffer("alpha_bar", ab, persistent=False)
        self.register_buffer("a", ab.sqrt(), persistent=False)
        self.register_buffer("s", (1 - ab).sqrt(), persistent=False)
        # Index 0 is the clean data, index t+1 timestep t: lets x_{t-k} reach "t = -1" without branches.
        self.register_buffer("a_ext", torch.cat([torch.ones(1), ab.sqrt()]), persistent=False)
        self.register_buffer("s_ext", torch.cat([torch.zeros(1), (1 - ab).sqrt()]), persistent=False)
        self.objective = make_objective(cfg.objective, self, cfg.step_gap)
        self.timesteps = make_timestep_sampler(cfg.timestep_sampler, cfg.num_timesteps, cfg.grid_steps)
        self.vlb = VariationalBound(self.betas) if cfg.loss == "vlb" else None

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I); [B x L x D]."""
        return self.a[t][:, None, None] * x0 + self.s[t][:, None, None] * noise

    def unrolled_x_t(
        self, x0_hat: torch.Tensor, x_from: torch.Tensor, t_from: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The DDIM step (eta 0) from ``x_from`` at ``t_from`` to t, given the estimate ``x0_hat``:
        a_t x0_hat + s_t eps_hat with eps_hat = (x_from - a_from x0_hat) / s_from, exactly what
        diffusers' DDIMScheduler computes for prediction_type="sample"; [B x L x D]."""
        at = lambda table, i: table[i][:, None, None]  # noqa: E731
        eps_hat = (x_from - at(self.a, t_from) * x0_hat) / at(self.s, t_from)
        return at(self.a, t) * x0_hat + at(self.s, t) * eps_hat

    def predict_x0(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.objective.to_x0(out, x_t, t)

    def _distance(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        diff = pred - target
        d = diff.abs() if self.cfg.loss == "l1" else diff.pow(2)
        return _position_mean(d.mean(dim=2), weight)  # (B,)

    def mask_predict_state(
        self, x0: torch.Tensor, eps: torch.Tensor, content: torch.Tensor, scores: torch.Tensor, share: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A partly clean training state (CMLM's masking, with Gaussian noise as the mask).

        Args:
            x0, eps: [B x L x D] clean embeddings and noise.
            content: [B x L] True at the caption's words, False at its padding. As in CMLM, whose
                length is known once predicted, only words are noised; the padding stays clean.
            scores: [B x L] random values: the lowest-scored words are noised.
            share: [B] uniform on [0, 1): n = floor(share * words) + 1 words are noised, 1..words.
        Returns:
            (x [B x L x D], t [B x L], noised [B x L] bool): noised positions at t = T-1, the rest
            clean at t = 0, each position told its own time.
        """
        words = content.sum(dim=1)
        count = torch.minimum((share * words).long() + 1, words)
        rank = scores.masked_fill(~content, float("inf")).argsort(dim=1).argsort(dim=1)
        noised = rank < count[:, None]
        top = torch.full_like(count, self.num_timesteps - 1)
        x = torch.where(noised[..., None], self.q_sample(x0, top, eps), x0)
        t = torch.where(noised, self.num_timesteps - 1, 0)
        return x, t, noised

    def training_losses(
        self,
        model,
        ids: torch.Tensor,
        features: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: StepNoise | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses for one batch.

        Args:
            model: the :class:`~diffcap.models.diffusion_captioner.DiffusionCaptioner` whose forward passes
                run the denoiser (possibly its DDP wrapper).
            ids: [B x L] token ids.
            features: [B x ...] features as stored in the feature file.
            t: [B*K] fixed timesteps (validation per quartile); drawn by the timestep sampler if None.
            noise: where training draws its randomness (per global-batch position, so that several
                processes train like one); the global torch RNG if None.
        Returns:
            dict with the scalar ``loss`` and its terms, plus ``per_sample`` [B*K] and ``t`` [B*K].
        """
        cfg = self.cfg
        core = getattr(model, "module", model)  # DDP wraps the module
        cond = core.encode_condition(features)  # (B, N, C), computed once for the K timesteps
        k = cfg.timesteps_per_caption
        if k > 1:  # the seed's SAMPLE_SIZE: several noise levels per caption in one step
            ids, cond = ids.repeat(k, 1), cond.repeat(k, 1, 1)
        batch = ids.shape[0]
        x0 = core.embedding(ids)  # (B, L, D)
        if t is None:
            t, weights = self.timesteps.sample(batch, ids.device, noise)
            learn_timesteps = True
        else:
            weights, learn_timesteps = torch.ones(batch, device=ids.device), False

        def randn_like(x):
            return noise.randn(*x.shape[1:]).to(x.dtype) if noise is not None else torch.randn_like(x)

        def rand():
            return noise.rand() if noise is not None else torch.rand(batch, device=ids.device)

        eps = randn_like(x0)
        x_t = self.q_sample(x0, t, eps)
        drop = rand() < cfg.cond_dropout
        t_net, weight, masked = t, None, None  # the time the network is told; per-position loss weights
        # Mask-predict and unrolled examples are training devices: a loss at given timesteps (validation
        # per quartile) measures plain denoising at those timesteps.
        if cfg.mask_predict_prob > 0 and learn_timesteps:
            masked = rand() < cfg.mask_predict_prob
            seq_len = ids.shape[1]
            scores = noise.randn(seq_len) if noise is not None else torch.randn(batch, seq_len, device=ids.device)
            content = ids != core.pad_id
            x_mp, t_mp, noised = self.mask_predict_state(x0, eps, content, scores, rand())
            x_t = torch.where(masked[:, None, None], x_mp, x_t)
            t_net = torch.where(masked[:, None], t_mp, t[:, None].expand_as(t_mp))
            # CMLM's loss covers the masked positions only: copying a clean word teaches nothing
            weight = torch.where(masked[:, None], noised, True).float()
            weights = torch.where(masked, 1.0, weights)  # the timestep sampler's importance weight is for t

        # The no-gradient first pass: the model's x0 estimate at t (self-conditioning), or for unrolled
        # examples at t = T-1 from x_T, as the sampler's first step makes it.
        unroll = rand() < cfg.unroll_prob if cfg.unroll_prob > 0 and learn_timesteps else None
        if unroll is not None and masked is not None:
            unroll = unroll & ~masked
        x_first, t_first, t_first_net = x_t, t, t_net
        if unroll is not None:
            t_top = torch.full_like(t, self.num_timesteps - 1)
            x_first = torch.where(unroll[:, None, None], self.q_sample(x0, t_top, eps), x_t)
            t_first = torch.where(unroll, t_top, t)
            t_first_net = t_first if masked is None else torch.where(unroll[:, None], t_top[:, None], t_net)
        # Bit Diffusion's self-conditioning feeds the first estimate back in for half of the examples;
        # unrolled examples always get it, as their sampler step always has the previous estimate.
        use = None
        if core.cfg.self_condition:
            use = rand() < 0.5
            if unroll is not None:
                use = use | unroll
        elif unroll is not None:
            use = unroll
        first = None
        if use is not None:
            # The first pass runs on the examples that read it only: for the others it would be thrown
            # away, and on the full batch it costs a third of a training step.
            rows = use.nonzero().squeeze(1)
            first = torch.zeros_like(x0)
            if len(rows):
                with torch.no_grad():
                    out_first = model(x_first[rows], t_first_net[rows], cond[rows], None, drop[rows])
                    first[rows] = self.predict_x0(out_first, x_first[rows], t_first[rows]).to(first.dtype)
        if unroll is not None:
            x_t = torch.where(
                unroll[:, None, None], self.unrolled_x_t(core.embedding.clamp(first), x_first, t_first, t), x_t
            )

        self_cond = first.detach() if core.cfg.self_condition else None  # zeros where unused

        out, logits = model(x_t, t_net, cond, self_cond, drop, return_logits=True)
        if self.vlb is not None:  # the variational bound's term at t, whatever the objective
            per_sample = self.vlb.loss(x0, x_t, self.predict_x0(out, x_t, t), t)
        else:
            per_sample = self._distance(out, self.objective.target(x0, eps, t), weight)
        if logits is None:  # the tied rounding head on the x0 estimate
            logits = core.embedding.logits(self.predict_x0(out, x_t, t))  # (B, L, A)
        # Logits cover the tokens rounding may produce; a validation caption may hold another one,
        # which is left out of the cross-entropy rather than scored infinite.
        targets = core.embedding.allowed_position(ids)
        rounding = _position_mean(
            nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none"), weight
        )
        # Diffusion-LM's prior term: E||sqrt(abar_T) x0||^2 keeps learned embedding norms from growing
        # until x_T is no longer pure noise (zero gradient for frozen or normalised tables).
        prior = (self.alpha_bar[-1] * x0.pow(2)).mean(dim=(1, 2))
        per_sample = cfg.diffusion_weight * per_sample
        if learn_timesteps:  # with the whole global batch, so that every process keeps the same history
            gather = noise.gather if noise is not None else (lambda x: x)
            t_all, losses = gather(t), gather((per_sample + cfg.rounding_weight * rounding).detach())
            if masked is not None:  # a mask-predict example's loss says nothing about its drawn t
                keep = gather(masked.long()) == 0
                t_all, losses = t_all[keep], losses[keep]
            self.timesteps.update(t_all, losses)

        terms = {
            "diffusion": (weights * per_sample).mean(),
            "rounding": (weights * rounding).mean(),
            "prior": prior.mean(),
        }
        loss = terms["diffusion"] + cfg.rounding_weight * terms["rounding"] + cfg.prior_weight * terms["prior"]
        if cfg.restore_weight > 0:
            # Diffusion-LM's t=0 term: from x_1 the model must give back the embeddings themselves.
            t0 = torch.zeros_like(t)
            x_1 = self.q_sample(x0, t0, randn_like(x0))
            restored = self.predict_x0(model(x_1, t0, cond, None, drop), x_1, t0)
            terms["restore"] = self._distance(restored, x0).mean()
            loss = loss + cfg.restore_weight * terms["restore"]
        terms["loss"] = loss
        terms["per_sample"] = (per_sample + cfg.rounding_weight * rounding).detach()
        terms["t"] = t if masked is None else torch.where(masked, self.num_timesteps - 1, t)
        return terms


def _position_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """[B x L] -> [B]: the mean over positions, or the weighted mean with ``weight`` [B x L]."""
    if weight is None:
        return values.mean(dim=1)
    return (values * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)
