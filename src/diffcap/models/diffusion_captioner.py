"""The diffusion captioner: word embeddings + optional image encoder + transformer denoiser, trained and
sampled through Gaussian diffusion over the word embeddings (Diffusion-LM, arXiv 2205.14217)."""

from __future__ import annotations

import torch
from torch import nn

from ..caching import cached_while_unchanged
from ..config import ConfigError, DiffusionConfig, ModelConfig, SamplerConfig, condition_segments
from ..diffusion.diffusion import GaussianDiffusion
from ..diffusion.sampler import Sampler
from .base import SAMPLER_FIELDS, Captioner, Generation
from .conditioning import condition_shape, make_image_encoder
from .denoiser import TransformerDenoiser
from .embedding import TokenEmbedding, load_pretrained_embeddings
from .projections import freeze_projections


class DiffusionCaptioner(Captioner):
    """The weights (embedding table, image encoder, denoiser) and the forward process that trains and
    samples them (:class:`~diffcap.diffusion.diffusion.GaussianDiffusion`, whose schedule is buffers
    outside the state dict).

    ``cfg`` must be resolved (:func:`diffcap.config.resolve`): it is read, never written. A fresh model
    may read pretrained weights; a saved one is rebuilt with ``pretrained=False`` and its
    ``backbone_config``, so loading never needs the hub.
    """

    iterative = True  # generation refines all positions over sampler.steps
    sampler_fields = SAMPLER_FIELDS - {"beam_size"}

    def __init__(
        self,
        cfg: ModelConfig,
        diffusion_cfg: DiffusionConfig | None = None,
        *,
        vocab_size: int,
        seq_len: int,
        pad_id: int = 0,
        pretrained: bool = True,
        backbone_config: dict | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.seq_len, self.pad_id = seq_len, pad_id
        if cfg.embedding == "learned":
            self.embedding = TokenEmbedding(
                vocab_size=vocab_size, dim=cfg.emb_dim, normalize=cfg.emb_normalize, scale=cfg.emb_scale
            )
        else:
            table = load_pretrained_embeddings(cfg.embedding) if pretrained else torch.zeros(vocab_size, cfg.emb_dim)
            if table.shape[0] != vocab_size:
                raise ValueError(
                    f"model.embedding={cfg.embedding!r} has {table.shape[0]} rows but the tokenizer has "
                    f"{vocab_size} tokens: use the same checkpoint for text.tokenizer"
                )
            if table.shape[1] != cfg.emb_dim:
                raise ConfigError(
                    f"model.embedding={cfg.embedding!r} is {table.shape[1]} wide, not "
                    f"model.emb_dim={cfg.emb_dim}: resolve the config (diffcap.config.resolve)"
                )
            self.embedding = TokenEmbedding(
                vocab_size=vocab_size,
                dim=table.shape[1],
                normalize=cfg.emb_normalize,
                scale=cfg.emb_scale,
                trainable=False,
                init=table,
            )
        self._head_cache = None  # the score head's allowed rows while sampling (cached_while_unchanged)
        self.image_encoder = make_image_encoder(cfg)
        cond_tokens, cond_dim = condition_shape(cfg)
        self.denoiser = TransformerDenoiser(
            emb_dim=cfg.emb_dim,
            cond_dim=cond_dim,
            seq_len=seq_len,
            max_cond_tokens=cond_tokens,
            d_model=cfg.d_model,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            dropout=cfg.dropout,
            fusion=cfg.fusion,
            self_condition=cfg.self_condition,
            time_embedding=cfg.time_embedding,
            backbone=cfg.backbone if pretrained else None,
            body_config=backbone_config,
            out_dim=vocab_size if cfg.score_interpolation and cfg.score_head == "separate" else None,
            cond_segments=condition_segments(cfg) if cfg.cond_segments else None,
            projection_bias=cfg.projection_bias,
            body=cfg.body,
        )
        if cfg.freeze_projections:
            freeze_projections(self.denoiser.in_proj, self.denoiser.out_proj, cfg.emb_dim)
        if self.denoiser.d_model != cfg.d_model:
            raise ConfigError(
                f"the transformer body is {self.denoiser.d_model} wide, not model.d_model={cfg.d_model}: "
                "resolve the config (diffcap.config.resolve)"
            )
        self.diffusion = GaussianDiffusion(diffusion_cfg or DiffusionConfig())

    def body_config(self) -> dict:
        """The transformer body's architecture, saved so a pretrained backbone rebuilds offline."""
        return self.denoiser.body.config.to_dict()

    def forward(self, x_t, t, cond, self_cond=None, drop_cond=None, return_logits: bool = False):
        """The objective's prediction [B x L x D]; with ``return_logits`` also the rounding logits over
        the allowed tokens [B x L x A] (None unless the model does score interpolation; see
        :meth:`TokenEmbedding.logits` for the order of the A columns)."""
        if not self.cfg.score_interpolation:
            out = self.denoiser(x_t, t, cond, self_cond=self_cond, drop_cond=drop_cond)
            return (out, None) if return_logits else out
        # CDCD: x0_hat is the expected embedding under the predicted token distribution. Only the
        # tokens rounding may produce get a logit: with WordPiece that is a few thousand of 30,522
        # rows, and the head is the largest matmul of the step.
        ids, rows = self.embedding.allowed_rows()
        if self.cfg.score_head == "tied":
            out = self.denoiser(x_t, t, cond, self_cond=self_cond, drop_cond=drop_cond)  # (B, L, D)
            logits = (out @ rows.to(out.dtype).t()).float()
        else:
            h = self.denoiser(x_t, t, cond, self_cond=self_cond, drop_cond=drop_cond, project=False)
            head = self.denoiser.out_proj
            weight, bias = cached_while_unchanged(
                self,
                "_head_cache",
                (head.weight, head.bias, self.embedding.allowed),
                lambda: (head.weight[ids], head.bias[ids]),
            )
            logits = nn.functional.linear(h, weight, bias).float()  # (B, L, A)
        out = logits.softmax(dim=-1) @ rows
        return (out, logits) if return_logits else out

    def restrict_vocabulary(self, caption_ids: torch.Tensor) -> None:
        """Rounding may produce only the tokens of the training captions (and PAD)."""
        self.embedding.restrict_to(caption_ids, always=(self.pad_id,))

    def training_losses(self, ids, features, *, noise=None, net=None) -> dict[str, torch.Tensor]:
        """The diffusion losses of :meth:`GaussianDiffusion.training_losses`, plus ``t`` [B*K]."""
        return self.diffusion.training_losses(self if net is None else net, ids, features, noise=noise)

    def validation_losses(self, ids, features) -> dict[str, float]:
        """The loss per quarter of the timesteps (``loss_q0`` .. ``loss_q3``, low noise first), as
        improved-diffusion reports it: one mean hides which noise levels the model has learned."""
        T = self.diffusion.num_timesteps
        n = ids.shape[0] * self.diffusion.cfg.timesteps_per_caption
        losses = {}
        for q in range(4):
            t = torch.randint(q * T // 4, (q + 1) * T // 4, (n,), device=ids.device)
            losses[f"loss_q{q}"] = float(self.diffusion.training_losses(self, ids, features, t=t)["loss"])
        return losses

    @torch.no_grad()
    def generate(
        self, features, sampler_cfg: SamplerConfig, *, generator=None, trajectory=False, classifier=None
    ) -> Generation:
        sampler = Sampler(self, self.diffusion, sampler_cfg, self.seq_len, self.pad_id, classifier=classifier)
        out = sampler.sample(features, generator, trajectory)
        return Generation(out.ids, out.trajectory)

    def training_state(self) -> dict[str, torch.Tensor]:
        """The loss-aware timestep sampler's loss history (empty for uniform timesteps)."""
        return getattr(self.diffusion.timesteps, "state_dict", dict)()

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            self.diffusion.timesteps.load_state_dict(state)
