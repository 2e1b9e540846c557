"""The autoregressive baseline captioner: shapes, KV cache, loss masking, greedy and beam search."""

from __future__ import annotations

import pytest
import torch
from conftest import CAPTIONS
from safetensors.torch import load_file, save_file

from diffcap.config import ModelConfig
from diffcap.models.autoregressive import IGNORE_INDEX, AutoregressiveCaptioner, attention, prefix_lm_mask
from diffcap.text.tokenizer import CaptionTokenizer

SEQ_LEN = 10


def small_model(cond_tokens: int = 1, vocab_size: int = 40, seed: int = 0) -> AutoregressiveCaptioner:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, dropout=0.0, cond_dim=16, cond_tokens=cond_tokens)
    return AutoregressiveCaptioner(cfg, vocab_size=vocab_size, seq_len=SEQ_LEN, bos_id=2, eos_id=3, pad_id=0)


def sharpen(model: AutoregressiveCaptioner, scale: float = 0.5) -> AutoregressiveCaptioner:
    """Large random weights, so that argmax decisions are far from ties and any cache bug shows."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=scale)
    return model.eval()


def test_shapes_and_rebuild(tmp_path):
    model = small_model(cond_tokens=3).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0], [5, 9, 9, 9, 9, 9, 9, 9, 9, 9]])
    for feats in (torch.randn(2, 16), torch.randn(2, 3, 16)):
        terms = model.loss(ids, feats)
        assert terms["loss"].dim() == 0 and torch.isfinite(terms["loss"])
        assert terms["per_sample"].shape == (2,) and not terms["per_sample"].requires_grad
        assert torch.equal(model(ids, feats)["loss"], terms["loss"])  # forward is the loss, for DDP
        for beam in (1, 3):
            out = model.search(feats, max_length=7, beam_size=beam)
            assert out.shape == (2, 7) and out.dtype == torch.long
            assert not ((out == 2) | (out == 3)).any()  # no BOS/EOS in the output

    # A saved state dict has no shared tensors (safetensors refuses them) and body_config rebuilds
    # the same model, special ids included, with no extra arguments.
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    cfg = ModelConfig(d_model=8, n_layers=1, n_heads=1, cond_dim=16, cond_tokens=3)
    rebuilt = AutoregressiveCaptioner(cfg, vocab_size=40, seq_len=SEQ_LEN, backbone_config=model.body_config())
    rebuilt.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    rebuilt.eval()
    feats = torch.randn(2, 3, 16)
    assert torch.equal(rebuilt.loss(ids, feats)["loss"], model.loss(ids, feats)["loss"])
    assert (rebuilt.bos_id, rebuilt.eos_id, rebuilt.pad_id) == (2, 3, 0)

    with pytest.raises(ValueError, match="bos_id"):
        AutoregressiveCaptioner(ModelConfig(cond_dim=16, cond_tokens=1), vocab_size=40, seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match="max_length"):
        model.search(feats, max_length=SEQ_LEN + 1)


def test_image_encoder_condition():
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, dropout=0.0, image_encoder="cnn")
    model = AutoregressiveCaptioner(cfg, vocab_size=40, seq_len=SEQ_LEN, bos_id=2, eos_id=3, pad_id=0).eval()
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert model.encode_condition(pixels).shape == (2, 16, 128)
    assert model.search(pixels, max_length=4).shape == (2, 4)


@pytest.mark.parametrize("cond_tokens", [1, 3])
def test_cache_matches_no_cache(cond_tokens):
    model = sharpen(small_model(cond_tokens=cond_tokens))
    feats = torch.randn(6, cond_tokens, 16)
    widths: list[int] = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _m, args: widths.append(args[0].shape[1]))
    cached = model.search(feats, max_length=SEQ_LEN)
    nfe_cached = model.last_nfe
    hook.remove()
    uncached = model.search(feats, max_length=SEQ_LEN, use_cache=False)
    assert torch.equal(cached, uncached)
    assert model.last_nfe == nfe_cached == len(widths)
    # prefill over [prefix; BOS], then exactly one new position per forward
    assert widths == [cond_tokens + 1] + [1] * (len(widths) - 1)

    beam_cached = model.search(feats, max_length=SEQ_LEN, beam_size=3)
    assert torch.equal(beam_cached, model.search(feats, max_length=SEQ_LEN, beam_size=3, use_cache=False))


def test_teacher_forcing_targets():
    model = small_model()
    inputs, targets = model.teacher_forcing(torch.tensor([[5, 6, 0, 0], [5, 6, 7, 8]]))
    assert inputs.tolist() == [[2, 5, 6, 0, 0], [2, 5, 6, 7, 8]]
    assert targets.tolist() == [[5, 6, 3, IGNORE_INDEX, IGNORE_INDEX], [5, 6, 7, 8, 3]]


def test_loss_ignores_positions_after_eos():
    model = sharpen(small_model())
    feats = torch.randn(3, 16)
    ids = torch.tensor(
        [[5, 6, 7, 0, 0, 0, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11, 12, 0, 0]]
    )
    garbage = ids.clone()
    garbage[0, 4:] = torch.arange(20, 26)  # everything after the first PAD (= where EOS goes)
    garbage[1, 2:] = 9
    garbage[2, 9] = 30
    base, changed = model.loss(ids, feats), model.loss(garbage, feats)
    assert torch.equal(base["loss"], changed["loss"])
    assert torch.equal(base["per_sample"], changed["per_sample"])
    # ...while a word before EOS does count
    ids[0, 2] = 20
    assert not torch.equal(model.loss(ids, feats)["per_sample"][0], base["per_sample"][0])


def test_loss_is_the_mean_token_nll_of_next_token_prediction():
    """The loss scores only positions with a target; check it against log-softmax of all positions."""
    model = sharpen(small_model())
    feats = torch.randn(2, 16)
    ids = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])
    inputs, targets = model.teacher_forcing(ids)

    def next_token_logp(b: int, i: int) -> torch.Tensor:  # log p(. | condition, inputs[b, :i+1]), alone
        x = torch.cat(
            [
                model.embed_prefix(model.encode_condition(feats[b : b + 1])),
                model.embed_tokens(inputs[b : b + 1, : i + 1], 0),
            ],
            dim=1,
        )
        return model.logits(model.decode(x, prefix_lm_mask(1, 0, i + 2, i + 2, x.device)))[0, -1].log_softmax(-1)

    with torch.no_grad():
        logp = torch.stack(
            [torch.stack([next_token_logp(b, i)[t] for i, t in enumerate(targets[b].clamp(min=0))]) for b in range(2)]
        )
        out = model.loss(ids, feats)
    nll = -logp * (targets != IGNORE_INDEX)
    assert out["per_sample"].tolist() == pytest.approx((nll.sum(1) / torch.tensor([4.0, 11.0])).tolist(), rel=1e-5)
    assert float(out["loss"]) == pytest.approx(float(nll.sum() / 15), rel=1e-5)


def test_beam_one_is_greedy():
    model = sharpen(small_model(cond_tokens=3))
    feats = torch.randn(5, 3, 16)
    assert torch.equal(model.search(feats, max_length=SEQ_LEN, beam_size=1), model.search(feats, max_length=SEQ_LEN))


def test_overfits_eight_captions():
    tokenizer = CaptionTokenizer.build_word_level(CAPTIONS, max_length=SEQ_LEN)
    ids = tokenizer.encode(CAPTIONS)
    torch.manual_seed(0)
    feats = torch.randn(len(CAPTIONS), 16)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, dropout=0.0, cond_dim=16, cond_tokens=1)
    model = AutoregressiveCaptioner(
        cfg,
        vocab_size=tokenizer.vocab_size,
        seq_len=SEQ_LEN,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model.loss(ids, feats)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.05
    model.eval()
    kw = {"max_length": SEQ_LEN}
    greedy = model.search(feats, **kw)
    assert torch.equal(greedy, ids)
    assert tokenizer.decode(greedy) == tokenizer.decode(ids)
    # greedy stops once every caption has ended: the longest has 8 words, so 1 prefill + 8 steps
    assert model.last_nfe == int((ids != tokenizer.pad_id).sum(dim=1).max()) + 1
    assert torch.equal(model.search(feats, beam_size=3, **kw), ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what sampler.precision = "bf16" runs it under
        assert torch.equal(model.search(feats, **kw), ids)


def test_pipeline_refuses_settings_left_to_right_decoding_cannot_honour():
    from diffcap.config import Config, ConfigError
    from diffcap.pipeline import CaptionPipeline

    cfg = Config()
    cfg.model = ModelConfig(kind="autoregressive", d_model=32, n_layers=1, n_heads=4, cond_dim=16, cond_tokens=1)
    cfg.text.max_length = SEQ_LEN
    tokenizer = CaptionTokenizer.build_word_level(CAPTIONS, max_length=SEQ_LEN)
    model = AutoregressiveCaptioner(
        cfg.model,
        vocab_size=tokenizer.vocab_size,
        seq_len=SEQ_LEN,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
    )
    pipe = CaptionPipeline(cfg, model, tokenizer)
    feats = torch.randn(2, 16)
    assert len(pipe(feats, beam_size=2).texts) == 2
    for overrides, message in [
        ({"steps": 5}, "sampler.steps does not apply"),
        ({"seed": 3}, "sampler.seed"),
        ({"guidance_scale": 2.0}, "sampler.guidance_scale"),
    ]:
        with pytest.raises(ConfigError, match=message):
            pipe(feats, **overrides)
    with pytest.raises(ValueError, match="no trajectory"):
        pipe(feats, trajectory=True)


def test_shortlisted_head_is_the_softmax_over_the_training_tokens(tmp_path):
    """restrict_vocabulary: the loss is the cross-entropy over the training captions' tokens and EOS
    only, search never writes another token, a token outside the list is not scored, and weights saved
    before the list existed load with every token allowed."""
    model = sharpen(small_model())
    full = small_model()
    full.load_state_dict(model.state_dict())
    full.eval()
    feats = torch.randn(8, 16)
    assert not set(full.search(feats, max_length=SEQ_LEN).unique().tolist()) <= {0, 5, 6, 7, 9}  # can fail

    train_ids = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0], [9, 9, 5, 6, 0, 0, 0, 0, 0, 0]])
    model.restrict_vocabulary(train_ids)
    shortlist = [3, 5, 6, 7, 9]  # EOS and the caption tokens; PAD and BOS are never targets
    assert model.allowed.nonzero().squeeze(1).tolist() == shortlist

    inputs, targets = full.teacher_forcing(train_ids)
    prefix = full.embed_prefix(full.encode_condition(feats[:2]))
    x = torch.cat([prefix, full.embed_tokens(inputs, 0)], dim=1)
    h = full.decode(x, prefix_lm_mask(1, 0, x.shape[1], x.shape[1]))[:, 1:]
    logp = torch.log_softmax(full.logits(h)[..., shortlist], dim=-1)
    column = {tok: i for i, tok in enumerate(shortlist)}
    scored = (targets != IGNORE_INDEX).nonzero().tolist()
    nll = [-logp[b, i, column[int(targets[b, i])]] for b, i in scored]
    torch.testing.assert_close(model.loss(train_ids, feats[:2])["loss"], torch.stack(nll).mean())

    for beam in (1, 3):
        assert set(model.search(feats, max_length=SEQ_LEN, beam_size=beam).unique().tolist()) <= {0, *shortlist}

    # token 8 (a word seen only in validation) is not scored: the loss is that of the caption without it
    unseen = torch.tensor([[5, 8, 0, 0, 0, 0, 0, 0, 0, 0]])
    _, t = model.teacher_forcing(unseen)
    assert (model.head_columns(t) != IGNORE_INDEX).sum() == 2  # w1 and EOS
    assert torch.isfinite(model.loss(unseen, feats[:1])["loss"])

    old = {k: v for k, v in full.state_dict().items() if k != "allowed"}
    rebuilt = small_model()
    rebuilt.load_state_dict(rebuilt.upgrade_state_dict(old))
    assert bool(rebuilt.allowed.all())
    rebuilt.eval()
    assert torch.equal(rebuilt.search(feats, max_length=SEQ_LEN), full.search(feats, max_length=SEQ_LEN))


@pytest.mark.parametrize("causal", [False, True])
def test_training_attention_in_bf16_on_the_cpu_is_computed_in_fp32(causal):
    """The CPU flash-attention backward is slow in bf16, so training attends in fp32 and returns bf16;
    with dropout (PyTorch's math path) and when sampling it stays in bf16."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 7, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    mask = prefix_lm_mask(n_prefix=2, q_start=0, q_len=7, k_len=7) if causal else None
    sdpa = torch.nn.functional.scaled_dot_product_attention
    y = attention(q, k, v, mask, dropout_p=0.0, training=True)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, sdpa(q.float(), k.float(), v.float(), attn_mask=mask).bfloat16())
    y.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and bool(q.grad.abs().sum() > 0)
    assert torch.equal(attention(q, k, v, mask, dropout_p=0.0, training=False), sdpa(q, k, v, attn_mask=mask))
