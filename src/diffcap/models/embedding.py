"""Word embeddings that define the continuous space the diffusion runs in, with the tied rounding head.

Two settings from the seed:
- learned embeddings of a small width (16..256) that the denoiser projects up to its own width and
  back down (Diffusion-LM, arXiv 2205.14217, section 4.1);
- the frozen input embeddings of a pretrained BERT-family model (the seed's DistilBERT setting).

The rounding head is tied to the table and has no bias: logits = x @ E^T. The seed found a bias-free
projection better "since input used no bias", and tying keeps the embedding and rounding consistent.
"""

from __future__ import annotations

import torch
from torch import nn

from ..caching import cached_while_unchanged


def load_pretrained_embeddings(name_or_path: str) -> torch.Tensor:
    """The input word-embedding matrix (V, D) of a BERT-family checkpoint (path or hub id)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(name_or_path, use_safetensors=True)  # never unpickle downloaded weights
    return model.get_input_embeddings().weight.detach().clone()


def allowed_columns(allowed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each id's column among the True entries of the mask ``allowed`` [V] (in id order), or -100
    (cross-entropy's ignore index) for an id outside it."""
    position = torch.full_like(allowed, -100, dtype=torch.long)
    kept = allowed.nonzero().squeeze(1)
    position[kept] = torch.arange(len(kept), device=position.device)
    return position[ids]


class TokenEmbedding(nn.Module):
    """Maps ids to x0 in embedding space and x0 back to rounding logits and nearest ids.

    Args:
        vocab_size: V.
        dim: embedding width D (the diffusion space).
        normalize: rescale every row to an RMS of ``scale`` per coordinate (fixed norm).
        trainable: False freezes the table (pretrained embeddings).
        init: optional (V, D) initial table, e.g. pretrained embeddings.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        dim: int,
        normalize: bool = True,
        scale: float = 1.0,
        trainable: bool = True,
        init: torch.Tensor | None = None,
    ):
        super().__init__()
        table = torch.randn(vocab_size, dim) if init is None else init.clone().float()
        if table.shape != (vocab_size, dim):
            raise ValueError(f"embedding table has shape {tuple(table.shape)}, expected {(vocab_size, dim)}")
        self.weight = nn.Parameter(table, requires_grad=trainable)
        self.normalize = normalize
        self.scale = scale
        # Tokens rounding may produce. Rows of tokens that never occur in the training captions keep
        # their initial values and lie all over the space (30,522 WordPiece rows against a few thousand
        # used ones), so snapping to them turns captions into "[unused5]" (BENCHMARKS.md, Flickr8k proxy).
        self.register_buffer("allowed", torch.ones(vocab_size, dtype=torch.bool))
        self._rows_cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def restrict_to(self, ids: torch.Tensor, always: tuple[int, ...] = ()) -> None:
        """Allow rounding only to the tokens in ``ids`` (e.g. the training captions) and ``always``."""
        allowed = torch.zeros_like(self.allowed)
        allowed[ids.flatten().to(allowed.device)] = True
        allowed[list(always)] = True
        self.allowed.copy_(allowed)

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def table(self) -> torch.Tensor:
        """The effective (V, D) table: what x0 is made of and what the rounding head is tied to."""
        return self._normalized(self.weight)

    def _normalized(self, w: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            w = w / w.pow(2).mean(dim=-1, keepdim=True).add(1e-8).sqrt() * self.scale
        return w

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, D)
        # Rows are normalised one by one, so only the looked-up ones need it: the whole table is 30,522
        # rows with WordPiece, and normalising it (forward and backward) took 4% of a training step.
        return self._normalized(nn.functional.embedding(ids, self.weight))

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, L, A)
        """Rounding logits x @ e over the A allowed tokens, in the order of :meth:`allowed_rows`
        (over 30,522 WordPiece rows this matmul was 40% of a training step's compute)."""
        return x @ self.allowed_rows()[1].t()

    def allowed_position(self, ids: torch.Tensor) -> torch.Tensor:
        """Each id's column in :meth:`logits`, or -100 (cross-entropy's ignore index) for a token
        outside the allowed set, which rounding cannot produce (e.g. a word seen only in validation)."""
        return allowed_columns(self.allowed, ids)

    def allowed_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, rows) of the tokens rounding may produce. Searching these only, rather than masking a
        score over the whole table, matters with WordPiece: a few thousand caption tokens of 30,522."""
        return cached_while_unchanged(self, "_rows_cache", (self.weight, self.allowed), self._allowed_rows)

    def _allowed_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.allowed.nonzero().squeeze(1)
        return ids, self._normalized(self.weight[ids])

    def _nearest(
        self, x: torch.Tensor, content: torch.Tensor | None = None, pad_id: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, rows, best): the allowed rows and, per vector, the index of the nearest one in L2
        distance: argmin ||x - e||^2 = argmax (2 x.e - ||e||^2). With a layout ``content`` [B x L]
        (True: a word, False: padding), content positions never round to ``pad_id`` and the others
        always do."""
        ids, rows = self.allowed_rows()
        score = 2 * x @ rows.t() - rows.pow(2).sum(-1)
        if content is not None:
            pad = ids == pad_id
            score = score.masked_fill(content[..., None] == pad, float("-inf"))
        return ids, rows, score.argmax(dim=-1)

    def nearest_index(self, x: torch.Tensor, content: torch.Tensor | None = None, pad_id: int = 0) -> torch.Tensor:
        """Like :meth:`nearest`, but each vector's column in :meth:`logits` (its allowed-row index)."""
        return self._nearest(x, content, pad_id)[2]

    def nearest(self, x: torch.Tensor, content: torch.Tensor | None = None, pad_id: int = 0) -> torch.Tensor:
        """Ids of the nearest allowed rows (within a layout, see :meth:`_nearest`)."""
        ids, _, best = self._nearest(x, content, pad_id)
        return ids[best]

    def clamp(self, x: torch.Tensor, content: torch.Tensor | None = None, pad_id: int = 0) -> torch.Tensor:
        """Diffusion-LM's clamping trick: replace each vector by its nearest embedding."""
        _, rows, best = self._nearest(x, content, pad_id)
        return rows[best]
