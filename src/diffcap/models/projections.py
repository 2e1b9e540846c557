"""Frozen input and output projections of the denoiser (``model.freeze_projections``).

The seed log: "no training embedding and projection, due to model might collapse" and "pretrained
projection layer with no bias is better, since input used no bias". With frozen embeddings, a trained
projection can still shrink the space the model reads and writes; freezing both projections too keeps
the embedding geometry fixed end to end. When the embeddings are as wide as the body (a BERT-family
table in front of its own body), the pretrained projection is the identity: the body was trained on
those very vectors, with no bias in between. Otherwise the projections stay frozen at their random
initialisation, a fixed random map (width-preserving in expectation).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def freeze_projections(in_proj: nn.Linear, out_proj: nn.Linear, emb_dim: int) -> None:
    """Stop training ``in_proj`` ([x_t ; self-condition] -> d_model) and ``out_proj`` (d_model -> D); when
    D = d_model start them as the identity: x_t (plus the previous estimate, when self-conditioning)
    goes into the body as it is, and the body's output is the prediction."""
    d_model = out_proj.in_features
    if emb_dim == d_model and out_proj.out_features == emb_dim:
        eye = torch.eye(d_model, dtype=in_proj.weight.dtype)
        in_proj.weight.copy_(eye.repeat(1, in_proj.in_features // emb_dim))
        out_proj.weight.copy_(eye)
        for bias in (in_proj.bias, out_proj.bias):
            if bias is not None:
                bias.zero_()
    for proj in (in_proj, out_proj):
        proj.requires_grad_(False)
