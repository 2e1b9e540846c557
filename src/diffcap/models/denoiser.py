"""The transformer denoiser f(x_t, t, cond, self_cond) -> x0_hat (or eps / x_{t-k}, by objective).

It knows nothing about noise schedules. The body is a transformers BERT-family encoder, either built
from a config (random initialisation) or loaded with ``from_pretrained`` (DistilBERT in the seed), fed
through ``inputs_embeds`` so that it adds its own position embeddings. With cross-attention fusion it
is BLIP's text encoder, whose layers also attend to the condition tokens.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .prenorm_body import build_prenorm_body


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim) (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


def build_body(
    *,
    d_model: int,
    n_layers: int,
    n_heads: int,
    dropout: float,
    max_positions: int,
    backbone: str | None,
    body_config: dict | None = None,
    cross_attention: bool = False,
    kind: str = "bert",
) -> nn.Module:
    """A transformers encoder used through ``inputs_embeds``; its word-embedding table is dropped.

    ``body_config`` (a saved ``config.to_dict()``) rebuilds a pretrained body's architecture without
    reading its weights, which then come from the run's own safetensors file. ``cross_attention``
    builds a body whose layers also attend to ``encoder_hidden_states`` d_model wide. ``kind="prenorm"``
    builds the autoregressive captioner's blocks without a mask instead (models/prenorm_body.py).
    """
    if kind == "prenorm":
        return build_prenorm_body(
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            dropout=dropout,
            max_positions=max_positions,
            body_config=body_config,
        )
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel, BlipTextConfig, BlipTextModel

    shape = dict(  # a randomly initialised body of either family: no word table, the model's width
        vocab_size=1,
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=4 * d_model,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=max_positions,
    )
    if body_config is not None:
        config = dict(body_config)
        config = AutoConfig.for_model(config.pop("model_type"), **config)
        # BLIP's text encoder has no AutoModel entry
        body = (
            BlipTextModel(config, add_pooling_layer=False)
            if isinstance(config, BlipTextConfig)
            else AutoModel.from_config(config)
        )
    elif cross_attention:
        # BLIP's image-grounded text encoder (Li et al. 2022, arXiv 2201.12086): each BERT layer's
        # bidirectional self-attention is followed by cross-attention to the condition tokens.
        # transformers' BertModel cross-attends only as a causal decoder (is_decoder=True); BLIP's
        # is_decoder=True config builds the cross-attention layers, and its forward's is_decoder=False
        # (the default) keeps the self-attention bidirectional.
        config = BlipTextConfig(
            **shape,
            encoder_hidden_size=d_model,
            is_decoder=True,
            bos_token_id=None,
            eos_token_id=None,
            sep_token_id=None,
        )
        body = BlipTextModel(config, add_pooling_layer=False)
    elif backbone:
        body = AutoModel.from_pretrained(backbone, use_safetensors=True)  # never unpickle downloaded weights
    else:
        config = BertConfig(**shape, type_vocab_size=1)
        body = BertModel(config, add_pooling_layer=False)
    # The denoiser feeds vectors, never ids: a 1-row table keeps the checkpoint small, and freezing it
    # leaves no parameter without a gradient (which multi-process DDP rejects).
    body.set_input_embeddings(nn.Embedding(1, body.config.hidden_size))
    body.get_input_embeddings().weight.requires_grad_(False)
    if getattr(body, "pooler", None) is not None:
        body.pooler = None
    return body


class TransformerDenoiser(nn.Module):
    """Denoiser over the sequence [x_t tokens ; condition tokens].

    Args:
        emb_dim: width D of the diffusion space (word embeddings).
        cond_dim: width C of the condition tokens (CLIP features, CNN grid, sentence embedding).
        fusion: "add" adds the pooled condition to every token, like a time embedding; "concat"
            appends the condition tokens with a segment embedding (both from the seed); "cross" lets
            every layer cross-attend to the condition tokens, so self-attention spans the caption
            only (a ViT-L/14 grid of 256 patches would make it span 276 positions, not 20).
        self_condition: also take the previous x0 estimate as input (Bit Diffusion, arXiv 2208.04202).
        time_embedding: add a sinusoidal timestep embedding (the seed's early models had none).
        cond_segments: each condition source's token count, in order, when the condition tokens come from
            several sources (the seed's "[x_t..., image_clip, text_clip]"); with "concat" or "cross" each
            source gets its own learned segment embedding ("add" pools them all). None: one source.
        projection_bias: give ``in_proj`` and ``out_proj`` a bias (the seed found none better for a
            pretrained projection, since its input has none).
        body: "bert" (transformers' BertModel, or model.backbone's) or "prenorm" (the autoregressive
            captioner's blocks, bidirectional; models/prenorm_body.py).
    """

    def __init__(
        self,
        *,
        emb_dim: int,
        cond_dim: int,
        seq_len: int,
        max_cond_tokens: int,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        dropout: float = 0.1,
        fusion: str = "concat",
        self_condition: bool = True,
        time_embedding: bool = True,
        backbone: str | None = None,
        body_config: dict | None = None,
        out_dim: int | None = None,
        cond_segments: list[int] | None = None,
        projection_bias: bool = True,
        body: str = "bert",
    ):
        super().__init__()
        self.body = build_body(
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            dropout=dropout,
            max_positions=seq_len + (0 if fusion == "cross" else max_cond_tokens),
            backbone=backbone,
            body_config=body_config,
            cross_attention=fusion == "cross",
            kind=body,
        )
        d_model = self.body.config.hidden_size  # a pretrained backbone fixes the width
        self.d_model = d_model
        self.fusion = fusion
        self.self_condition = self_condition
        self.in_proj = nn.Linear(emb_dim * (2 if self_condition else 1), d_model, bias=projection_bias)
        # out_dim: the vocabulary size when the model outputs logits (score interpolation), else D.
        self.out_proj = nn.Linear(d_model, out_dim or emb_dim, bias=projection_bias)
        self.cond_proj = nn.Sequential(nn.Linear(cond_dim, d_model), nn.LayerNorm(d_model))
        # Learned "no condition" token for classifier-free guidance (Ho & Salimans, arXiv 2207.12598).
        self.null_cond = nn.Parameter(torch.zeros(d_model))
        self.time_mlp = (
            nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
            if time_embedding
            else None
        )
        self.segment = nn.Embedding(2, d_model) if fusion == "concat" else None
        self.source = None
        if cond_segments and len(cond_segments) > 1 and fusion != "add":
            if sum(cond_segments) != max_cond_tokens:
                raise ValueError(f"cond_segments {cond_segments} do not add up to {max_cond_tokens} condition tokens")
            self.source = nn.Embedding(len(cond_segments), d_model)
            # which source each condition token comes from; derived from the config, so not saved
            ids = torch.repeat_interleave(torch.arange(len(cond_segments)), torch.tensor(cond_segments))
            self.register_buffer("source_ids", ids, persistent=False)
        if body == "prenorm":
            # BERT's embedding LayerNorm rescales N(0, 1) segment vectors; a pre-norm body adds them to
            # its residual stream as they are, so they start at the scale of its other embeddings.
            for table in (self.segment, self.source):
                if table is not None:
                    nn.init.normal_(table.weight, std=0.02)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        self_cond: torch.Tensor | None = None,
        drop_cond: torch.Tensor | None = None,
        project: bool = True,
    ) -> torch.Tensor:
        """
        Args:
            x_t: [B x L x D] noisy embeddings.
            t: [B] integer timesteps, or [B x L] one per position.
            cond: [B x N x C] condition tokens.
            self_cond: [B x L x D] previous x0 estimate (zeros when there is none).
            drop_cond: [B] bool, True replaces the condition by the learned null condition.
            project: False returns the body's hidden states [B x L x d_model] before ``out_proj``.
        Returns:
            [B x L x D] the objective's prediction ([B x L x out_dim] logits with score interpolation).
        """
        seq_len = x_t.shape[1]
        if self.self_condition:
            x_t = torch.cat([x_t, torch.zeros_like(x_t) if self_cond is None else self_cond], dim=-1)
        h = self.in_proj(x_t)  # (B, L, d)
        c = self.cond_proj(cond)  # (B, N, d)
        if drop_cond is not None:
            c = torch.where(drop_cond[:, None, None], self.null_cond.to(c.dtype).expand_as(c), c)
        if self.source is not None:
            c = c + self.source(self.source_ids).to(c.dtype)
        if self.time_mlp is not None:
            # [B] one time per caption, or [B x L] one per position (mask-predict's partly clean states)
            temb = self.time_mlp(timestep_embedding(t.reshape(-1), self.d_model).to(h.dtype))
            h = h + (temb.view(*t.shape, -1) if t.dim() == 2 else temb[:, None])
        cross = {}
        if self.fusion == "add":
            h = h + c.mean(dim=1, keepdim=True)
        elif self.fusion == "concat":
            h = torch.cat([h + self.segment.weight[0], c + self.segment.weight[1]], dim=1)
        else:  # cross: the sequence stays the caption, and every layer attends to the condition tokens
            cross = {"encoder_hidden_states": c}
        h = self.body(inputs_embeds=h, **cross).last_hidden_state
        h = h[:, :seq_len].contiguous()  # a sliced view would make the heads broadcast their weights (bmm)
        return self.out_proj(h) if project else h
