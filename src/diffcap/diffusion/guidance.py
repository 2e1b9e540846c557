"""Classifier guidance: a small learned model of log p(c | x_t) whose gradient steers sampling.

Following Dhariwal & Nichol (2021, arXiv 2105.05233) and Diffusion-LM's plug-and-play control for
text (arXiv 2205.14217), a classifier is trained on noisy embeddings x_t drawn from the frozen
diffusion model's own forward process (diffcap.training.guidance), and at sampling time the gradient
of its log-probability is added to the score of the diffusion model. Two forms: a function linear in
x_t at each position, and a small transformer over [x_t; condition].

Training is contrastive: each caption's x_t is scored against its own condition (label 1) and
against the condition of another caption of the batch (label 0, or 1 when that caption happens to
describe the same image), with binary cross-entropy. So ``sigmoid(f(x_t, t, c))`` estimates
p(match | x_t, c) and ``log sigmoid f`` plays the role of log p(c | x_t).

A trained guidance model lives in its own folder of the run directory (diffcap.training.guidance
trains, saves and loads it).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..models.denoiser import timestep_embedding

KINDS = ("linear", "transformer")


class GuidanceClassifier(nn.Module):
    """f(x_t, t, cond) -> match logit [B].

    Args:
        kind: "linear": a linear function of x_t at each position, whose coefficients are a linear map
            of the (pooled) condition, times a learned gain of t: f = g(t) sum_l <x_t[l], W_l c> + b(t).
            Its gradient in x_t is the same at every x_t (a fixed direction per condition and step).
            "transformer": a small transformer over [CLS; condition tokens; x_t tokens + time].
        emb_dim: D, width of the diffusion space.  cond_dim: C.  seq_len: L.
    """

    def __init__(
        self,
        *,
        kind: str,
        emb_dim: int,
        cond_dim: int,
        seq_len: int,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"guidance kind {kind!r}: choose one of {list(KINDS)}")
        self.config = dict(
            kind=kind,
            emb_dim=emb_dim,
            cond_dim=cond_dim,
            seq_len=seq_len,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
        )
        self.kind, self.d_model = kind, d_model
        self.time_mlp = nn.Sequential(
            nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, 2 if kind == "linear" else d_model)
        )
        if kind == "linear":
            # one (D x C) map per position: the coefficients of x_t[l] are W_l c
            self.weight = nn.Parameter(torch.randn(seq_len, emb_dim, cond_dim) / (emb_dim * cond_dim * seq_len) ** 0.5)
        else:
            self.in_proj = nn.Linear(emb_dim, d_model)
            self.cond_proj = nn.Linear(cond_dim, d_model)
            self.pos = nn.Parameter(torch.zeros(1, seq_len, d_model))
            self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
            layer = nn.TransformerEncoderLayer(
                d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
            )
            self.body = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
            self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 1))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t [B x L x D], t [B], cond [B x N x C] (as from ``encode_condition``) -> logits [B]."""
        temb = self.time_mlp(timestep_embedding(t, self.d_model))  # (B, 2) or (B, d)
        cond = cond.float()
        if self.kind == "linear":
            coef = torch.einsum("ldc,bc->bld", self.weight, cond.mean(dim=1))  # (B, L, D)
            gain, bias = F.softplus(temb[:, 0]), temb[:, 1]
            return gain * (x_t * coef).sum(dim=(1, 2)) + bias
        h = self.in_proj(x_t) + self.pos[:, : x_t.shape[1]] + temb[:, None]
        tokens = torch.cat([self.cls.expand(x_t.shape[0], -1, -1), self.cond_proj(cond), h], dim=1)
        return self.head(self.body(tokens)[:, 0]).squeeze(-1)

    def log_prob(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """log p(c | x_t) estimate [B]."""
        return F.logsigmoid(self(x_t, t, cond))


def classifier_shift(
    classifier: nn.Module, alpha_bar: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
) -> torch.Tensor:
    """How far classifier guidance moves the x0 estimate: (1 - abar_t) / sqrt(abar_t) grad log p(c|x_t).

    Dhariwal & Nichol (Algorithm 2 / eq. 14) replace eps_hat by eps_hat - sqrt(1 - abar_t) grad; since
    x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t), that is this shift of x0_hat (Tweedie:
    the guided score adds grad log p(c|x_t) to grad log p(x_t)). [B x L x D].
    """
    with torch.enable_grad():
        x = x_t.detach().float().requires_grad_(True)
        logp = classifier.log_prob(x, t, cond).sum()
        (grad,) = torch.autograd.grad(logp, x)
    ab = alpha_bar[t][:, None, None]
    return ((1 - ab) / ab.sqrt()) * grad


# ---- the training loss (training/guidance.py trains a classifier for a run) ---------------------


def contrastive_loss(
    classifier: nn.Module,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    image: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, float]:
    """BCE on matched pairs and on pairs with the condition of a shuffled batch; (loss, accuracy).

    ``image`` [B] identifies each caption's image: a shuffled pair of two captions of the same image is
    still a match and is labelled 1.
    """
    batch = x_t.shape[0]
    perm = torch.randperm(batch, generator=generator).to(x_t.device)
    logits = classifier(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, cond[perm]]))
    labels = torch.cat([torch.ones(batch, device=x_t.device), (image[perm] == image).float()])
    loss = F.binary_cross_entropy_with_logits(logits, labels)
    accuracy = float(((logits > 0).float() == labels).float().mean())
    return loss, accuracy
