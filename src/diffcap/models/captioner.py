"""The diffusion captioner: word embeddings + optional image encoder + transformer denoiser."""
from __future__ import annotations

import torch
from torch import nn

from ..caching import cached_while_unchanged
from ..config import ModelConfig
from .denoiser import TransformerDenoiser
from .embedding import TokenEmbedding, load_pretrained_embeddings
from .image_encoder import ConvImageEncoder


class DiffusionCaptioner(nn.Module):
    """Everything with weights. Schedules and losses live in :class:`diffcap.diffusion.GaussianDiffusion`.

    Build a fresh model with :meth:`from_config` (this may read pretrained weights); a saved model is
    rebuilt with ``pretrained=False`` and its state dict, so loading never needs the hub.
    """

    iterative = True  # generation refines all positions over sampler.steps

    def __init__(self, cfg: ModelConfig, *, vocab_size: int, seq_len: int, pretrained: bool = True,
                 backbone_config: dict | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.embedding == "learned":
            self.embedding = TokenEmbedding(vocab_size=vocab_size, dim=cfg.emb_dim, normalize=cfg.emb_normalize,
                                            scale=cfg.emb_scale)
        else:
            table = load_pretrained_embeddings(cfg.embedding) if pretrained else torch.zeros(vocab_size, cfg.emb_dim)
            if table.shape[0] != vocab_size:
                raise ValueError(
                    f"model.embedding={cfg.embedding!r} has {table.shape[0]} rows but the tokenizer has "
                    f"{vocab_size} tokens: use the same checkpoint for text.tokenizer"
                )
            cfg.emb_dim = table.shape[1]
            self.embedding = TokenEmbedding(vocab_size=vocab_size, dim=table.shape[1], normalize=cfg.emb_normalize,
                                            scale=cfg.emb_scale, trainable=False, init=table)
        self._head_cache = None  # the score head's allowed rows while sampling (cached_while_unchanged)
        self.image_encoder = ConvImageEncoder() if cfg.image_encoder == "cnn" else None
        if self.image_encoder is not None:
            cfg.cond_dim, cfg.cond_tokens = self.image_encoder.out_dim, self.image_encoder.pos.shape[1]
        if cfg.cond_dim <= 0 or cfg.cond_tokens <= 0:
            raise ValueError("model.cond_dim and model.cond_tokens must be set (they come from the feature file)")
        self.denoiser = TransformerDenoiser(
            emb_dim=cfg.emb_dim, cond_dim=cfg.cond_dim, seq_len=seq_len, max_cond_tokens=cfg.cond_tokens,
            d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, dropout=cfg.dropout,
            fusion=cfg.fusion, self_condition=cfg.self_condition, time_embedding=cfg.time_embedding,
            backbone=cfg.backbone if pretrained else None, body_config=backbone_config,
            out_dim=vocab_size if cfg.score_interpolation and cfg.score_head == "separate" else None,
        )
        cfg.d_model = self.denoiser.d_model

    def body_config(self) -> dict:
        """The transformer body's architecture, saved so a pretrained backbone rebuilds offline."""
        return self.denoiser.body.config.to_dict()

    def encode_condition(self, features: torch.Tensor) -> torch.Tensor:
        """Features as stored in the feature file -> condition tokens [B x N x C]."""
        if self.image_encoder is not None:
            return self.image_encoder(features)
        features = features.float()
        return features[:, None] if features.dim() == 2 else features

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
            weight, bias = cached_while_unchanged(self, "_head_cache", (head.weight, head.bias, self.embedding.allowed),
                                                  lambda: (head.weight[ids], head.bias[ids]))
            logits = nn.functional.linear(h, weight, bias).float()  # (B, L, A)
        out = logits.softmax(dim=-1) @ rows
        return (out, logits) if return_logits else out
