"""A bidirectional pre-norm transformer body for the denoiser, built from the autoregressive captioner's
own blocks (``model.body=prenorm``).

Why a second body next to transformers' BERT: with the same blocks as the AR captioner, a diffusion
student can start from its autoregressive teacher's weights (``model.init_from``, :func:`copy_teacher`),
as non-autoregressive students start from their AR teachers in NAT (Guo et al. 2020, "Fine-Tuning by
Curriculum Learning for Non-Autoregressive Neural Machine Translation", arXiv 1911.08717). The
teacher's condition projection, position embeddings, blocks and output head carry over; the attention
mask changes from prefix-LM to bidirectional. Its fused query/key/value projection also makes one pass
four matmuls per layer instead of BERT's six, which is what a batch-1 pass costs on a CPU
(BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from .autoregressive import AutoregressiveCaptioner, DecoderBlock, init_blocks

MODEL_TYPE = "diffcap_prenorm_encoder"


@dataclass
class PrenormConfig:
    """The body's architecture, saved in ``body_config.json`` so a run rebuilds it offline."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    dropout: float = 0.1
    model_type: str = MODEL_TYPE

    def to_dict(self) -> dict:
        return asdict(self)


class PrenormEncoder(nn.Module):
    """Learned positions, dropout, the AR captioner's pre-norm blocks without a mask, a final LayerNorm.

    Called like a transformers encoder (``inputs_embeds`` -> ``last_hidden_state``), so the denoiser
    treats both bodies alike.
    """

    def __init__(self, config: PrenormConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.position = nn.Parameter(torch.zeros(config.max_position_embeddings, d))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock(d, config.num_attention_heads, config.intermediate_size, config.dropout)
            for _ in range(config.num_hidden_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        init_blocks(self.blocks)  # as the AR captioner's
        nn.init.normal_(self.position, std=0.02)

    def forward(self, inputs_embeds: torch.Tensor) -> BaseModelOutput:
        """[B x T x d] -> ``BaseModelOutput(last_hidden_state=[B x T x d])``."""
        n = inputs_embeds.shape[1]
        if n > self.position.shape[0]:
            raise ValueError(f"{n} positions but the body was built for at most {self.position.shape[0]}")
        x = self.drop(inputs_embeds + self.position[:n].to(inputs_embeds.dtype))
        for block in self.blocks:
            x = block(x, None)  # no mask: every position sees every other (the student is bidirectional)
        return BaseModelOutput(last_hidden_state=self.ln_f(x))


def build_prenorm_body(
    *, d_model: int, n_layers: int, n_heads: int, dropout: float, max_positions: int, body_config: dict | None
) -> PrenormEncoder:
    """A fresh body of the given shape, or the saved ``body_config``'s."""
    if body_config is not None:
        return PrenormEncoder(PrenormConfig(**body_config))
    return PrenormEncoder(PrenormConfig(d_model, n_layers, n_heads, 4 * d_model, max_positions, dropout))


def copy_teacher(student: nn.Module, teacher: AutoregressiveCaptioner, *, source: str) -> None:
    """Start a prenorm diffusion captioner from an autoregressive one of the same shape and vocabulary
    (``model.init_from``).

    Copies the blocks, the final LayerNorm and the condition projection; the position embeddings where
    the two sequences mean the same thing (caption position i is the AR position whose output predicts
    word i, and with concatenation fusion condition token j the AR prefix position j); and, when the
    student scores words with its own head (score interpolation, ``score_head=separate``), the AR
    model's tied output head, with its EOS row for the student's PAD, which marks the same place: the
    caption has ended. The input projection, the time embedding and the segment embedding stay new: the
    student reads noisy embeddings, not tokens. ``source`` names the teacher in errors.
    """
    denoiser, seq_len = student.denoiser, student.seq_len
    body = denoiser.body
    mine = (body.config.hidden_size, len(body.blocks), body.blocks[0].attn.n_heads, body.config.intermediate_size)
    theirs = (teacher.d_model, len(teacher.blocks), teacher.blocks[0].attn.n_heads, teacher.ffn_dim)
    if mine != theirs:
        raise ValueError(
            f"{source}: the teacher is (width, layers, heads, ffn) {theirs}, this denoiser {mine}: "
            "model.init_from needs the same shape"
        )
    cond_in = denoiser.cond_proj[0].in_features
    if teacher.cond_dim != cond_in:
        raise ValueError(f"{source}: the teacher reads {teacher.cond_dim}-wide condition tokens, this model {cond_in}")
    if seq_len > teacher.token_pos.shape[0]:
        raise ValueError(f"{source}: the teacher has {teacher.token_pos.shape[0]} positions, this model {seq_len}")
    concat = student.cfg.fusion == "concat"
    n_cond = body.position.shape[0] - seq_len
    if concat and n_cond != teacher.prefix_pos.shape[0]:
        theirs = teacher.prefix_pos.shape[0]
        raise ValueError(f"{source}: the teacher reads {theirs} condition tokens, this model {n_cond}")
    head = denoiser.out_proj
    own_head = student.cfg.score_interpolation and student.cfg.score_head == "separate"
    if own_head and head.out_features != teacher.vocab_size:
        raise ValueError(f"{source}: the teacher has {teacher.vocab_size} tokens, this model {head.out_features}")
    with torch.no_grad():
        body.blocks.load_state_dict(teacher.blocks.state_dict())
        body.ln_f.load_state_dict(teacher.ln_f.state_dict())
        denoiser.cond_proj.load_state_dict(teacher.cond_proj.state_dict())
        body.position[:seq_len].copy_(teacher.token_pos[:seq_len])
        if concat:
            body.position[seq_len:].copy_(teacher.prefix_pos)
        if own_head:
            head.weight.copy_(teacher.token_embedding.weight)
            head.weight[student.pad_id] = teacher.token_embedding.weight[teacher.eos_id]
            if head.bias is not None:
                head.bias.zero_()
