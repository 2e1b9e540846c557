"""An autoregressive captioner: the matched left-to-right baseline for the diffusion captioners.

The condition tokens (CLIP features, a CNN grid, a sentence embedding) are projected to the decoder
width and placed before the caption as a prefix, as in ClipCap (Mokady et al. 2021, arXiv 2111.09734),
and a small pre-norm causal transformer (GPT-2 style, Radford et al. 2019) predicts the caption
[BOS] w1 .. wn [EOS] one token at a time.

Attention mask: prefix-LM (Raffel et al. 2020, arXiv 1910.10683, sec. 3.2.1). The prefix tokens see
each other bidirectionally but never the caption; each caption position sees the whole prefix and the
caption positions up to itself. With a single pooled vector (N = 1) this is exactly a causal mask over
[prefix; caption]; with a grid it lets the grid cells mix before the caption reads them, which a
causal mask over the grid (arbitrary raster order) would forbid for no reason. Because the prefix
never attends to the caption, its keys and values are computed once and cached with the rest.

The decoder is plain torch (``nn.Linear`` projections and ``scaled_dot_product_attention``) rather
than a transformers model so that the key/value cache is a preallocated tensor per layer: every
generated token costs one forward over one position.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..caching import cached_while_unchanged
from ..config import ModelConfig, SamplerConfig
from .base import Captioner, Generation
from .conditioning import condition_shape, make_image_encoder
from .embedding import allowed_columns

MODEL_TYPE = "diffcap_autoregressive"
IGNORE_INDEX = -100
HEAD_ROWS = 64  # the training loss's vocabulary head runs on a multiple of this many rows (see loss)


class KVCache:
    """Keys and values of every layer, preallocated as [B x H x T_max x Dh] and filled left to right.

    The buffers are allocated on the first :meth:`update` so that they take the dtype the
    attention actually runs in (bf16 under autocast).
    """

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0  # positions already stored (the same for every layer between forwards)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store [B x H x T x Dh] new keys/values at positions length..length+T; return all so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} positions > {self.max_len}")
        if self.k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = k.new_empty(shape)
            self.v[layer] = v.new_empty(shape)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Rows [B'] of the batch to keep (with repeats): beam expansion and beam reordering."""
        for buffers in (self.k, self.v):
            for i, buf in enumerate(buffers):
                if buf is not None:
                    buffers[i] = buf.index_select(0, index)


def prefix_lm_mask(
    n_prefix: int, q_start: int, q_len: int, k_len: int, device: torch.device | None = None
) -> torch.Tensor | None:
    """Boolean [q_len x k_len] mask, True = may attend, for queries at absolute positions q_start...

    Key j is visible to query i when j is in the prefix (j < n_prefix) or j <= i. A prefix query
    therefore sees the prefix only, and a caption query the prefix plus the caption so far.
    Returns None when nothing is masked (one query at the newest position), so sdpa can skip the mask.
    """
    if q_len == 1 and q_start == k_len - 1:
        return None
    i = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    mask = (j < n_prefix) | (j <= i)
    return None if bool(mask.all()) else mask


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float, training: bool
) -> torch.Tensor:
    """sdpa, in fp32 when training in bf16 on a CPU without attention dropout.

    There PyTorch takes its CPU flash-attention kernel, whose backward is about 3x slower in bf16 than in
    fp32 at the captioners' shapes (batch 64, 4 heads, ~22 positions: 11 ms against 4 ms forward and
    backward; causal 15.5 ms against 4.9 ms; BENCHMARKS.md, "Session 16"). The casts cost far less, and
    the fp32 softmax is the more exact one. With dropout it takes the math path, which is faster in bf16.
    Sampling keeps its dtype: there attention is a small part of a step (0.025 ms per block of a ~4 ms step
    at batch 1)."""
    if training and dropout_p == 0 and q.device.type == "cpu" and q.dtype == torch.bfloat16:
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


class SelfAttention(nn.Module):
    """Multi-head self-attention through sdpa, with an optional KV cache."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        """x: [B x T x D]; mask: [T x T_keys] bool or None -> [B x T x D]."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0, self.training)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block (GPT-2): x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None, layer: int = 0
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask, cache, layer))
        return x + self.drop(self.mlp(self.ln2(x)))


def init_blocks(blocks: nn.ModuleList) -> None:
    """GPT-2 initialisation of DecoderBlocks: N(0, 0.02), zero biases, residual output projections scaled
    by 1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth."""
    for module in blocks.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
    for block in blocks:
        for linear in (block.attn.out, block.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02 / math.sqrt(2 * len(blocks)))


class _Stepper:
    """Incremental decoding state shared by greedy and beam search, with or without the KV cache.

    Without the cache every step re-runs the whole [prefix; BOS w1 .. wt] sequence (the reference the
    cached path is tested against); with it, one position per step. ``nfe`` counts decoder forwards.
    """

    def __init__(
        self, model: AutoregressiveCaptioner, prefix: torch.Tensor, bos_id: int, max_length: int, use_cache: bool
    ):
        self.model = model
        self.prefix = prefix  # [B x N x D], already projected and position-embedded
        self.n_prefix = prefix.shape[1]
        self.tokens = torch.full((prefix.shape[0], 1), bos_id, dtype=torch.long, device=prefix.device)
        self.cache = KVCache(len(model.blocks), self.n_prefix + max_length + 1) if use_cache else None
        self.nfe = 0

    def start(self) -> torch.Tensor:
        """Run [prefix; BOS]; logits for w1 [B x V]."""
        return self._forward_all() if self.cache is None else self._forward_cached(prefill=True)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append tokens [B]; logits for the next position [B x V]."""
        self.tokens = torch.cat([self.tokens, tokens[:, None]], dim=1)
        return self._forward_all() if self.cache is None else self._forward_cached(prefill=False)

    def reorder(self, index: torch.Tensor) -> None:
        self.prefix = self.prefix.index_select(0, index)
        self.tokens = self.tokens.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)

    def _forward_all(self) -> torch.Tensor:
        self.nfe += 1
        x = torch.cat([self.prefix, self.model.embed_tokens(self.tokens, 0)], dim=1)
        total = x.shape[1]
        mask = prefix_lm_mask(self.n_prefix, 0, total, total, x.device)
        return self.model.logits(self.model.decode(x, mask)[:, -1])

    def _forward_cached(self, prefill: bool) -> torch.Tensor:
        self.nfe += 1
        if prefill:
            x = torch.cat([self.prefix, self.model.embed_tokens(self.tokens, 0)], dim=1)
        else:
            x = self.model.embed_tokens(self.tokens[:, -1:], self.tokens.shape[1] - 1)
        start, n_new = self.cache.length, x.shape[1]
        mask = prefix_lm_mask(self.n_prefix, start, n_new, start + n_new, x.device)
        h = self.model.decode(x, mask, self.cache)
        return self.model.logits(h[:, -1])


class AutoregressiveCaptioner(Captioner):
    """ClipCap-style prefix + causal transformer decoder with tied input/output embeddings.

    Args:
        cfg: model config; d_model, n_layers, n_heads, dropout size the decoder, image_encoder,
            cond_dim and cond_tokens describe the condition exactly as for the diffusion captioner.
            The diffusion-only fields (emb_dim, fusion, self_condition, time_embedding, ...) are ignored.
        vocab_size: rows of the token table (tokenizer.vocab_size).
        seq_len: the most words a caption has (text.max_length); the decoder has seq_len + 1
            caption positions, [BOS] w1 .. w_seq_len.
        backbone_config: a saved :meth:`body_config`; rebuilds the same architecture and special ids.
        bos_id, eos_id, pad_id: the tokenizer's special ids. The loss builds [BOS] w [EOS] itself,
            so the model must know them; they are saved in :meth:`body_config`, so a model rebuilt
            from a run directory gets them from ``backbone_config`` and needs no extra argument.
    """

    iterative = False  # generation decodes left to right, one token per forward
    # Greedy and beam search draw nothing at random, so no seed; the rest of SamplerConfig is diffusion's.
    sampler_fields = frozenset({"beam_size", "precision"})

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        vocab_size: int,
        seq_len: int,
        backbone_config: dict | None = None,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
    ):
        super().__init__()
        if cfg.backbone:
            raise ValueError("the autoregressive captioner has no pretrained backbone: set model.backbone to null")
        if cfg.embedding != "learned":
            raise ValueError("the autoregressive captioner learns its own token table: set model.embedding=learned")
        saved = dict(backbone_config or {})
        if saved and saved.get("model_type") != MODEL_TYPE:
            raise ValueError(f"backbone_config is for {saved.get('model_type')!r}, not {MODEL_TYPE!r}")
        self.cfg = cfg
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.bos_id = bos_id if bos_id is not None else saved.get("bos_id")
        self.eos_id = eos_id if eos_id is not None else saved.get("eos_id")
        self.pad_id = pad_id if pad_id is not None else saved.get("pad_id")
        if None in (self.bos_id, self.eos_id, self.pad_id):
            raise ValueError(
                "AutoregressiveCaptioner needs bos_id, eos_id and pad_id (from the tokenizer) "
                "or a backbone_config saved by body_config()"
            )
        # The saved architecture wins, as a saved transformers config does for the diffusion body.
        d, n_layers, n_heads = (saved.get(k, getattr(cfg, k)) for k in ("d_model", "n_layers", "n_heads"))
        self.d_model = d
        self.ffn_dim = saved.get("ffn_dim", 4 * d)
        if d % n_heads:
            raise ValueError(f"d_model={d} is not divisible by n_heads={n_heads}")

        self.image_encoder = make_image_encoder(cfg)
        self.cond_tokens, self.cond_dim = condition_shape(cfg)

        # The same Linear + LayerNorm projection as the diffusion denoiser's cond_proj, so the two
        # captioners read the condition identically and differ only in how they generate.
        self.cond_proj = nn.Sequential(nn.Linear(self.cond_dim, d), nn.LayerNorm(d))
        self.prefix_pos = nn.Parameter(torch.zeros(self.cond_tokens, d))
        # Separate caption positions: caption position i means the same thing whatever the prefix length.
        self.token_pos = nn.Parameter(torch.zeros(seq_len + 1, d))
        # The output head is tied to this table and has no bias (Press & Wolf 2017, arXiv 1608.05859);
        # logits use its weight directly instead of a second module sharing the tensor, because
        # safetensors refuses to save a state dict with two names for one storage.
        self.token_embedding = nn.Embedding(vocab_size, d)
        # Tokens the head scores (restrict_vocabulary): the training captions' tokens and EOS. The
        # softmax over all 30,522 WordPiece rows was most of a training step (BENCHMARKS.md, "Faster AR
        # training"), while a caption set uses a few thousand of them (Flickr8k: 6,177); a token never
        # seen as a target only learns to be unlikely. A shortlisted output vocabulary is the standard
        # remedy (Jean et al. 2015, arXiv 1412.2007; L'Hostis et al. 2016, arXiv 1610.00072); the
        # diffusion captioner rounds to the same set.
        self.register_buffer("allowed", torch.ones(vocab_size, dtype=torch.bool))
        self._head_cache = None  # (ids, rows) of the allowed tokens while sampling
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(DecoderBlock(d, n_heads, self.ffn_dim, cfg.dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.last_nfe = 0
        self._init_weights()

    def _init_weights(self) -> None:
        # The condition projection and the image encoder keep PyTorch's defaults, as in the diffusion captioner.
        init_blocks(self.blocks)
        for p in (self.token_embedding.weight, self.prefix_pos, self.token_pos):
            nn.init.normal_(p, std=0.02)

    # ---- pieces ----------------------------------------------------------------------------------
    def body_config(self) -> dict:
        """The decoder's architecture and special ids, saved so :meth:`__init__` can rebuild it offline."""
        return {
            "model_type": MODEL_TYPE,
            "d_model": self.d_model,
            "n_layers": len(self.blocks),
            "n_heads": self.blocks[0].attn.n_heads,
            "ffn_dim": self.ffn_dim,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "cond_dim": self.cond_dim,
            "cond_tokens": self.cond_tokens,
            "attention_mask": "prefix_lm",
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }

    def embed_prefix(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition tokens [B x N x C] -> prefix [B x N x D]."""
        n = cond.shape[1]
        if n > self.prefix_pos.shape[0]:
            raise ValueError(f"{n} condition tokens but the model was built for at most {self.prefix_pos.shape[0]}")
        return self.cond_proj(cond) + self.prefix_pos[:n]

    def embed_tokens(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Token ids [B x T] at caption positions start..start+T-1 -> [B x T x D]."""
        return self.token_embedding(tokens) + self.token_pos[start : start + tokens.shape[1]]

    def decode(self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None) -> torch.Tensor:
        """Run the blocks over [B x T x D] inputs (new positions only when cached) -> [B x T x D]."""
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, mask, cache, layer)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.ln_f(x)

    def restrict_vocabulary(self, caption_ids: torch.Tensor) -> None:
        """Score only the tokens of the training captions [N x L] and EOS (PAD and BOS are never
        targets)."""
        allowed = torch.zeros_like(self.allowed)
        allowed[caption_ids.flatten().to(allowed.device)] = True
        allowed[[self.pad_id, self.bos_id]] = False
        allowed[self.eos_id] = True
        self.allowed.copy_(allowed)

    def upgrade_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights saved before the head had a shortlist scored every token; they keep doing so."""
        if "allowed" not in state:
            state = {**state, "allowed": torch.ones(self.vocab_size, dtype=torch.bool)}
        return state

    def head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [A], rows [A x D]) of the tokens the tied head scores, A <= V."""

        def compute():
            ids = self.allowed.nonzero().squeeze(1)
            return ids, self.token_embedding.weight[ids]

        return cached_while_unchanged(self, "_head_cache", (self.token_embedding.weight, self.allowed), compute)

    def head_columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Each token id's column in the head's logits, or IGNORE_INDEX for a token it does not score
        (a word seen only in validation captions)."""
        return torch.where(ids == IGNORE_INDEX, ids, allowed_columns(self.allowed, ids.clamp(min=0)))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [... x D] -> logits [... x V] through the tied, bias-free head; tokens outside
        the shortlist get -inf."""
        ids, rows = self.head()
        scored = F.linear(h, rows)
        if len(ids) == self.vocab_size:
            return scored
        out = scored.new_full((*scored.shape[:-1], self.vocab_size), float("-inf"))
        out[..., ids] = scored
        return out

    # ---- training --------------------------------------------------------------------------------
    def teacher_forcing(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption ids [B x L] (words, then PAD) -> decoder inputs and targets, both [B x L+1].

        inputs  = [BOS] w1 .. wn PAD ..   (PAD inputs only feed positions whose targets are ignored)
        targets = w1 .. wn [EOS] -100 ..  (IGNORE_INDEX after EOS)
        A caption of exactly L words (possibly truncated by the tokenizer) ends with EOS at position L.
        """
        b, length = ids.shape
        is_pad = ids == self.pad_id
        # n = the first PAD, so a stray PAD inside a caption cannot shift where EOS goes
        n = torch.where(is_pad.any(dim=1), is_pad.int().argmax(dim=1), torch.full_like(ids[:, 0], length))
        pos = torch.arange(length + 1, device=ids.device)[None]
        bos = torch.full((b, 1), self.bos_id, dtype=ids.dtype, device=ids.device)
        pad = torch.full((b, 1), self.pad_id, dtype=ids.dtype, device=ids.device)
        inputs = torch.cat([bos, ids], dim=1)
        targets = torch.cat([ids, pad], dim=1)
        targets = torch.where(pos == n[:, None], torch.full_like(targets, self.eos_id), targets)
        targets = torch.where(pos > n[:, None], torch.full_like(targets, IGNORE_INDEX), targets)
        inputs = torch.where(pos > n[:, None], torch.full_like(inputs, self.pad_id), inputs)
        return inputs, targets

    def loss(self, ids: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Teacher-forced cross-entropy.

        Args:
            ids: [B x L] caption ids as from ``CaptionTokenizer.encode`` (no specials, right-padded).
            features: [B x ...] features as stored in the feature file.
        Returns:
            ``loss``: scalar mean over all target tokens (EOS included, positions after it ignored);
            ``per_sample``: [B] mean token NLL per caption, detached.
        """
        if ids.shape[1] > self.seq_len:
            raise ValueError(f"captions of {ids.shape[1]} tokens but the model was built for {self.seq_len}")
        inputs, targets = self.teacher_forcing(ids)
        prefix = self.embed_prefix(self.encode_condition(features))
        x = torch.cat([prefix, self.embed_tokens(inputs, 0)], dim=1)
        n_prefix, total = prefix.shape[1], x.shape[1]
        h = self.decode(x, prefix_lm_mask(n_prefix, 0, total, total, x.device))[:, n_prefix:]
        # The vocabulary head is most of a step's work, so it runs only where a target exists (about
        # half the positions of padded captions), on a contiguous [N x V] block. N is rounded up to a
        # multiple of HEAD_ROWS (repeating the first row, whose copies are then dropped): on the CPU a new
        # N per step means new oneDNN kernels and a fragmented heap (peak memory 1.4 -> 2.7 GB on the
        # Flickr8k proxy), while a few sizes are reused.
        # Targets are columns of the shortlisted head; a token outside it is not scored.
        targets = self.head_columns(targets)
        scored = (targets != IGNORE_INDEX).flatten()
        rows = scored.nonzero().squeeze(1)
        n = rows.numel()
        padded = torch.cat([rows, rows[:1].expand((-n) % HEAD_ROWS)])
        # [N' x A]; fp32 loss under bf16/fp16 autocast
        logits = F.linear(h.flatten(0, 1)[padded], self.head()[1]).float()
        nll = torch.zeros(targets.numel(), dtype=logits.dtype, device=logits.device)
        nll[rows] = F.cross_entropy(logits, targets.flatten()[padded], reduction="none")[:n]
        nll = nll.view(targets.shape)
        counts = scored.view(targets.shape).sum(dim=1)
        return {"loss": nll.sum() / counts.sum(), "per_sample": (nll.sum(dim=1) / counts).detach()}

    def forward(self, ids: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Same as :meth:`loss`: DDP only synchronises gradients for work done inside ``forward``."""
        return self.loss(ids, features)

    def training_losses(self, ids, features, *, noise=None, net=None) -> dict[str, torch.Tensor]:
        """Teacher-forced cross-entropy (:meth:`loss`); ``noise`` is not needed, nothing is drawn."""
        return (self if net is None else net)(ids, features)

    def validation_losses(self, ids, features) -> dict[str, float]:
        return {"loss": float(self.loss(ids, features)["loss"])}

    # ---- generation ------------------------------------------------------------------------------
    def generate(
        self, features, sampler_cfg: SamplerConfig, *, generator=None, trajectory=False, classifier=None
    ) -> Generation:
        """Greedy decoding (``sampler_cfg.beam_size`` 1) or beam search up to ``seq_len`` words. Both
        are deterministic, so ``generator`` is never drawn from."""
        if trajectory:
            raise ValueError(
                "the autoregressive captioner writes left to right: it has no trajectory of "
                "refined estimates (trajectory=True needs a diffusion run)"
            )
        if classifier is not None:
            raise ValueError("classifier guidance steers a diffusion sampler, not the autoregressive captioner")
        return Generation(self.search(features, max_length=self.seq_len, beam_size=sampler_cfg.beam_size))

    @torch.no_grad()
    def search(
        self,
        features: torch.Tensor,
        *,
        max_length: int,
        beam_size: int = 1,
        use_cache: bool = True,
        length_penalty: float = 1.0,
        num_return: int = 1,
    ) -> torch.Tensor:
        """Decode captions: greedy for beam_size 1, beam search otherwise.

        Args:
            features: [B x ...] features as stored in the feature file.
            max_length: most words per caption (<= seq_len); a caption not ended by EOS is cut there.
            beam_size: 1 for greedy decoding.
            use_cache: reuse keys/values of earlier positions (one position per forward) or re-run
                the whole sequence each step (the reference the cache is tested against).
            length_penalty: beam hypotheses are ranked by sum log p / len ** length_penalty, len
                counting EOS (Wu et al. 2016, arXiv 1609.08144, use a softer form; 1.0 = per-token mean).
            num_return: the best this many finished hypotheses of each item (at most beam_size).
        Returns:
            [B x max_length] word ids, right-padded with PAD, without BOS/EOS; [B x num_return x
            max_length], best first, when num_return > 1. Sets ``last_nfe``.
        """
        bos_id, eos_id, pad_id = self.bos_id, self.eos_id, self.pad_id
        if not 1 <= max_length <= self.seq_len:
            raise ValueError(f"max_length must be in 1..{self.seq_len}, got {max_length}")
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        if not 1 <= num_return <= beam_size:
            raise ValueError(f"num_return must be in 1..beam_size={beam_size}, got {num_return}")
        prefix = self.embed_prefix(self.encode_condition(features))
        stepper = _Stepper(self, prefix, bos_id, max_length, use_cache)
        # PAD and BOS are never targets; banning them keeps an undertrained model from emitting them.
        banned = sorted({pad_id, bos_id} - {eos_id})
        if beam_size == 1:
            out = greedy_search(stepper, max_length, eos_id, pad_id, banned)
        else:
            out = beam_search(stepper, max_length, eos_id, pad_id, banned, beam_size, length_penalty)
        self.last_nfe = stepper.nfe
        return out[:, :num_return] if num_return > 1 else (out if beam_size == 1 else out[:, 0])


def _ban(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """Logits in fp32 with the ``banned`` ids made impossible."""
    logits = logits.float()
    logits[..., banned] = float("-inf")
    return logits


def greedy_search(stepper: _Stepper, max_length: int, eos_id: int, pad_id: int, banned: list[int]) -> torch.Tensor:
    logits = _ban(stepper.start(), banned)  # [B x V]
    batch = logits.shape[0]
    out = torch.full((batch, max_length), pad_id, dtype=torch.long, device=logits.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=logits.device)
    for t in range(max_length):
        tok = logits.argmax(dim=-1)
        finished = finished | (tok == eos_id)
        out[:, t] = torch.where(finished, torch.full_like(tok, pad_id), tok)
        if bool(finished.all()) or t == max_length - 1:
            break
        logits = _ban(stepper.step(tok), banned)
    return out


def beam_search(
    stepper: _Stepper, max_length: int, eos_id: int, pad_id: int, banned: list[int], k: int, length_penalty: float
) -> torch.Tensor:
    """Standard beam search with length-normalised finished hypotheses (as in HF transformers).

    Live beams are ranked by their summed log-probability; a candidate ending in EOS among the
    top-k ranks becomes a finished hypothesis scored sum log p / (words + 1) ** length_penalty.
    An item stops once it has k finished hypotheses and its best live beam's normalised score is
    no better than the worst of them (HF's ``early_stopping=False`` rule); at max_length words
    every live beam is forced to end with EOS. Returns the k finished hypotheses [B x k x L], best first.
    """
    logp = torch.log_softmax(_ban(stepper.start(), banned), dim=-1)  # [B x V]
    batch, vocab = logp.shape
    device = logp.device
    if 2 * k > vocab - len(banned):
        raise ValueError(f"beam_size={k} is too large for a vocabulary of {vocab} tokens")
    # Expand after the prefill: the prefix and BOS are computed once per item, not once per beam.
    stepper.reorder(torch.arange(batch, device=device).repeat_interleave(k))
    logp = logp[:, None].expand(batch, k, vocab)
    # All k beams start identical; -inf on all but one keeps the first expansion from picking duplicates.
    beam_scores = torch.full((batch, k), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0
    beam_tokens = torch.full((batch, k, max_length), pad_id, dtype=torch.long, device=device)
    fin_scores = torch.full((batch, k), float("-inf"), device=device)
    fin_tokens = beam_tokens.clone()
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    rank_ok = torch.arange(2 * k, device=device) < k
    offsets = torch.arange(batch, device=device)[:, None] * k
    for t in range(max_length + 1):  # t = words already in the live beams
        cand = beam_scores[..., None] + logp  # [B x K x V]
        if t == max_length:
            eos_only = torch.full_like(cand, float("-inf"))
            eos_only[..., eos_id] = cand[..., eos_id]
            cand = eos_only
        top_scores, top_idx = cand.reshape(batch, k * vocab).topk(2 * k, dim=1)  # [B x 2K], sorted
        src, tok = top_idx // vocab, top_idx % vocab
        is_eos = tok == eos_id

        new_fin = is_eos & rank_ok & torch.isfinite(top_scores) & ~done[:, None]
        norm = torch.where(new_fin, top_scores / (t + 1) ** length_penalty, torch.full_like(top_scores, -math.inf))
        cand_tokens = beam_tokens.gather(1, src[..., None].expand(-1, -1, max_length))  # [B x 2K x L]
        all_scores = torch.cat([fin_scores, norm], dim=1)
        all_tokens = torch.cat([fin_tokens, cand_tokens], dim=1)
        fin_scores, sel = all_scores.topk(k, dim=1)
        fin_tokens = all_tokens.gather(1, sel[..., None].expand(-1, -1, max_length))
        if t == max_length:
            break

        # The k best candidates that do not end: a stable sort on is_eos keeps the score order.
        keep = torch.sort(is_eos.int(), dim=1, stable=True).indices[:, :k]
        beam_scores = top_scores.gather(1, keep)
        src, tok = src.gather(1, keep), tok.gather(1, keep)
        beam_tokens = beam_tokens.gather(1, src[..., None].expand(-1, -1, max_length))
        beam_tokens[:, :, t] = tok
        worst_fin = fin_scores[:, -1]
        best_live = beam_scores[:, 0] / (t + 1) ** length_penalty
        done = done | (torch.isfinite(worst_fin) & (best_live <= worst_fin))
        if bool(done.all()):
            break
        stepper.reorder((offsets + src).reshape(-1))
        logp = torch.log_softmax(_ban(stepper.step(tok.reshape(-1)), banned), dim=-1).view(batch, k, vocab)
    return fin_tokens
