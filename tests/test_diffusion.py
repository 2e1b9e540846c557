"""Schedules, the forward process, objectives, and samplers driven by an oracle denoiser."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffcap.config import DiffusionConfig, ModelConfig, SamplerConfig
from diffcap.diffusion.diffusion import GaussianDiffusion
from diffcap.diffusion.sampler import (
    SampleOutput,
    Sampler,
    collapse_repeats,
    expected_length_layout,
    ngram_f1,
    select_mbr,
)
from diffcap.diffusion.schedules import alpha_bar, make_betas
from diffcap.models.embedding import TokenEmbedding


@pytest.mark.parametrize("schedule", ["linear", "cosine", "sqrt"])
def test_alpha_bar_monotone_from_one_to_zero(schedule):
    ab = alpha_bar(make_betas(schedule, 2000))
    assert np.all(np.diff(ab) < 0)
    assert 0.98 < ab[0] <= 1.0
    assert ab[-1] < 1e-3


def test_schedule_endpoints_match_papers():
    betas = make_betas("linear", 1000)  # DDPM: 1e-4 .. 0.02
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    # improved DDPM cosine at s = 0.008: alpha_bar(1/T) / alpha_bar(0)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert alpha_bar(make_betas("cosine", 1000))[0] == pytest.approx(f(1 / 1000) / f(0), rel=1e-9)
    # Diffusion-LM sqrt: alpha_bar(u) = 1 - sqrt(u + 1e-4), normalised by alpha_bar(0)
    ab = alpha_bar(make_betas("sqrt", 2000))
    assert ab[999] == pytest.approx((1 - math.sqrt(1000 / 2000 + 1e-4)) / (1 - math.sqrt(1e-4)), rel=1e-9)


def test_q_sample_mean_and_variance():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(DiffusionConfig(schedule="sqrt", num_timesteps=2000))
    x0 = torch.full((20000, 1, 2), 1.5)
    t = torch.full((20000,), 700)
    x_t = diffusion.q_sample(x0, t, torch.randn_like(x0))
    ab = diffusion.alpha_bar[700].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(ab) * 1.5, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - ab, rel=0.03)


@pytest.mark.parametrize("objective", ["x0", "eps", "xtk"])
def test_objective_round_trip(objective):
    diffusion = GaussianDiffusion(DiffusionConfig(objective=objective, step_gap=30, num_timesteps=200))
    x0, noise = torch.randn(6, 5, 4), torch.randn(6, 5, 4)
    t = torch.tensor([0, 10, 29, 30, 100, 150])
    x_t = diffusion.q_sample(x0, t, noise)
    target = diffusion.objective.target(x0, noise, t)
    torch.testing.assert_close(diffusion.predict_x0(target, x_t, t), x0, atol=1e-4, rtol=1e-4)


class OracleCaptioner(nn.Module):
    """Returns the true target for known ids: the exactness test of the sampling loop."""

    def __init__(self, ids, diffusion, vocab=12, dim=8):
        super().__init__()
        torch.manual_seed(1)
        self.embedding = TokenEmbedding(vocab_size=vocab, dim=dim)
        self.cfg = ModelConfig(self_condition=False)
        self.ids, self.diffusion = ids, diffusion

    def encode_condition(self, features):
        return features[:, None].float()  # (B, 1)

    def forward(self, x_t, t, cond, self_cond=None, drop_cond=None, return_logits=False):
        x0 = self.embedding(self.ids[cond[:, 0].long()])
        # eps the oracle would predict so that to_x0 recovers x0 exactly
        if self.diffusion.cfg.objective == "eps":
            out = (x_t - self.diffusion.a[t][:, None, None] * x0) / self.diffusion.s[t][:, None, None]
        else:
            out = x0
        return (out, None) if return_logits else out


@pytest.mark.parametrize(
    "method,clamp,steps",
    [("ddim", False, 10), ("ddim", True, 3), ("ddpm", True, 50), ("ddpm", True, 2000), ("refine", True, 5)],
)
def test_oracle_sampler_recovers_ids(method, clamp, steps):
    diffusion = GaussianDiffusion(DiffusionConfig(num_timesteps=2000))
    ids = torch.randint(0, 12, (4, 7), generator=torch.Generator().manual_seed(3))
    model = OracleCaptioner(ids, diffusion)
    sampler = Sampler(model, diffusion, SamplerConfig(method=method, steps=steps, clamp=clamp), seq_len=7)
    out = sampler.sample(torch.arange(4), generator=torch.Generator().manual_seed(0), trajectory=True)
    assert torch.equal(out.ids, ids)
    assert len(out.trajectory) == steps


def test_oracle_eps_objective_with_ddim():
    diffusion = GaussianDiffusion(DiffusionConfig(num_timesteps=1000, objective="eps", schedule="cosine"))
    ids = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(4))
    model = OracleCaptioner(ids, diffusion)
    sampler = Sampler(model, diffusion, SamplerConfig(method="ddim", steps=20, clamp=True), seq_len=5)
    assert torch.equal(sampler.sample(torch.arange(3), torch.Generator().manual_seed(0)).ids, ids)


def test_time_offset_is_added_to_the_networks_time():
    diffusion = GaussianDiffusion(DiffusionConfig(num_timesteps=1000))
    ids = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(4))
    model = OracleCaptioner(ids, diffusion)
    seen = []
    oracle_forward = model.forward

    def told_time(x_t, t, *args):
        seen.append(t[0].item())
        return oracle_forward(x_t, t, *args)

    model.forward = told_time
    sampler = Sampler(model, diffusion, SamplerConfig(method="ddim", steps=4, clamp=True, time_offset=100), seq_len=5)
    assert torch.equal(sampler.sample(torch.arange(3), torch.Generator().manual_seed(0)).ids, ids)
    # trailing spacing visits 999, 749, 499, 249; the network is told 100 more, capped at T-1
    assert seen == [999, 849, 599, 349]


def test_same_seed_same_samples_ddpm():
    diffusion = GaussianDiffusion(DiffusionConfig(num_timesteps=100))
    model = OracleCaptioner(torch.randint(0, 12, (2, 4)), diffusion)
    # an oracle is deterministic; check the noise path itself through the refine-free DDPM state
    sampler = Sampler(model, diffusion, SamplerConfig(method="ddpm", steps=10, clamp=False), seq_len=4)
    a = sampler.sample(torch.arange(2), torch.Generator().manual_seed(5), trajectory=True)
    b = sampler.sample(torch.arange(2), torch.Generator().manual_seed(5), trajectory=True)
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a.trajectory, b.trajectory))


def test_mbr_picks_the_consensus_sample():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8], [9, 9, 9, 9], [1, 2, 0, 0], [1, 2, 3, 0], [1, 2, 3, 0]])
    out = select_mbr(SampleOutput(ids=ids), k=3, pad_id=0)
    assert out.ids.tolist() == [[5, 6, 7, 0], [1, 2, 3, 0]]
    assert ngram_f1([1, 2], [1, 2]) == 1.0 and ngram_f1([1], [2]) == 0.0


def test_collapse_repeats_keeps_order_and_pads():
    ids = torch.tensor([[5, 5, 5, 6, 7, 7, 0, 0], [1, 2, 1, 2, 0, 0, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3]])
    assert collapse_repeats(ids, pad_id=0).tolist() == [
        [5, 6, 7, 0, 0, 0, 0, 0],
        [1, 2, 1, 2, 0, 0, 0, 0],
        [3, 0, 0, 0, 0, 0, 0, 0],
    ]


def test_expected_length_layout_counts_the_non_pad_mass():
    # position-wise P(PAD) 0, 0.2, 0.6, 0.6, 0.7: expected words 1 + 0.8 + 0.4 + 0.4 + 0.3 = 2.9
    p_pad = torch.tensor([[0.0, 0.2, 0.6, 0.6, 0.7], [1.0, 1.0, 1.0, 1.0, 1.0]])
    probs = torch.stack([p_pad, 1 - p_pad], dim=-1)  # column 0 is PAD
    layout = expected_length_layout(probs.clamp_min(1e-9).log(), torch.tensor(0))
    # per-position argmax would keep 2 words; the expected length is 3; an all-PAD row keeps one word
    assert layout.tolist() == [[True, True, True, False, False], [True, False, False, False, False]]


def test_rounding_within_a_layout_keeps_pad_out_of_words_and_in_the_tail():
    emb = TokenEmbedding(vocab_size=6, dim=4)
    x = emb(torch.tensor([[0, 3, 0, 4]]))  # PAD where a word must go, and a word in the tail
    content = torch.tensor([[True, True, True, False]])
    ids = emb.nearest(x, content, pad_id=0)[0].tolist()
    assert ids[1] == 3 and ids[0] != 0 and ids[2] != 0 and ids[3] == 0
    assert torch.equal(emb.clamp(x, content, 0), emb.table()[emb.nearest(x, content, 0)])


@pytest.mark.parametrize("clamp", [True, False])
def test_oracle_sampler_with_expected_length_recovers_padded_ids(clamp):
    diffusion = GaussianDiffusion(DiffusionConfig(num_timesteps=1000))
    ids = torch.tensor([[3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 10, 0], [11, 0, 0, 0, 0, 0]])
    model = OracleCaptioner(ids, diffusion, dim=16)
    sampler = Sampler(
        model, diffusion, SamplerConfig(method="ddim", steps=5, clamp=clamp, length="expected"), seq_len=6
    )
    assert torch.equal(sampler.sample(torch.arange(3), torch.Generator().manual_seed(0)).ids, ids)


def test_allowed_rows_are_reused_only_while_the_weights_are_unchanged():
    emb = TokenEmbedding(vocab_size=10, dim=4)
    emb.restrict_to(torch.tensor([1, 2, 5]), always=(0,))
    with torch.no_grad():
        first = emb.allowed_rows()
        assert emb.allowed_rows()[1] is first[1]  # same weights: the cached rows
        emb.weight.add_(1.0)  # an optimizer step, an EMA update or load_state_dict: in place
        moved = emb.allowed_rows()
        assert torch.allclose(moved[1], emb._normalized(emb.weight[[0, 1, 2, 5]]))
        emb.restrict_to(torch.tensor([3]), always=(0,))
        assert emb.allowed_rows()[0].tolist() == [0, 3]
    ids, rows = emb.allowed_rows()  # with autograd on: computed afresh, with a graph to the table
    rows.sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad[3].abs().sum() > 0


def test_rounding_is_restricted_to_allowed_tokens():
    emb = TokenEmbedding(vocab_size=10, dim=4)
    x = emb(torch.arange(10))[None]  # every row exactly
    assert emb.nearest(x).tolist() == [list(range(10))]
    emb.restrict_to(torch.tensor([[2, 3], [3, 5]]), always=(0,))
    picked = emb.nearest(x)[0].tolist()
    assert set(picked) <= {0, 2, 3, 5} and [picked[i] for i in (0, 2, 3, 5)] == [0, 2, 3, 5]
    assert torch.equal(emb.clamp(x), emb.table()[emb.nearest(x)])


@pytest.mark.parametrize("head", ["separate", "tied"])
def test_score_interpolation_logits_cover_only_allowed_tokens(head):
    from diffcap.models.diffusion_captioner import DiffusionCaptioner

    cfg = ModelConfig(
        d_model=32,
        n_layers=1,
        n_heads=2,
        emb_dim=8,
        score_interpolation=True,
        cond_dim=4,
        cond_tokens=1,
        self_condition=False,
        score_head=head,
    )
    model = DiffusionCaptioner(cfg, vocab_size=12, seq_len=5).eval()
    model.embedding.restrict_to(torch.tensor([2, 3, 4]), always=(0,))
    diffusion = GaussianDiffusion(DiffusionConfig(num_timesteps=50))
    x_t, t, cond = torch.randn(2, 5, 8), torch.tensor([3, 40]), torch.randn(2, 1, 4)
    out, logits = model(x_t, t, cond, return_logits=True)
    assert logits.shape == (2, 5, 4)  # tokens 0, 2, 3, 4 only
    rows = model.embedding.table()[[0, 2, 3, 4]]
    assert torch.allclose(out, logits.softmax(-1) @ rows, atol=1e-5)
    if head == "tied":  # scored against the table like the rounding head; no vocabulary-wide layer
        assert model.denoiser.out_proj.out_features == 8
        assert torch.allclose(logits, model.denoiser(x_t, t, cond) @ rows.t(), atol=1e-5)
    assert model.embedding.allowed_position(torch.tensor([0, 1, 4, 7])).tolist() == [0, -100, 3, -100]
    assert torch.allclose(model(x_t, t, cond), out)
    # a caption with a token outside the allowed set (validation data) still has a finite loss
    losses = diffusion.training_losses(model, torch.tensor([[2, 3, 7, 0, 0], [4, 4, 2, 0, 0]]), torch.randn(2, 4))
    assert torch.isfinite(losses["loss"])
