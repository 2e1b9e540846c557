"""Training for few-step refinement: step-unrolled examples (diffusion.unroll_prob) build x_t exactly as
the DDIM sampler does, and grid timesteps (diffusion.timestep_sampler=grid) are the sampler's own."""

import pytest
import torch

from diffcap.config import Config, ConfigError, DiffusionConfig, validate
from diffcap.diffusion.diffusion import GaussianDiffusion
from diffcap.diffusion.sampler import make_scheduler


@pytest.mark.parametrize("steps", [2, 3, 5])
def test_unrolled_x_t_is_the_ddim_step(steps):
    diffusion = GaussianDiffusion(DiffusionConfig(schedule="linear", num_timesteps=200))
    scheduler = make_scheduler("ddim", diffusion, steps)
    g = torch.Generator().manual_seed(0)
    x_from, x0_hat = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    t_from = int(scheduler.timesteps[0])
    t_to = t_from - 200 // steps  # DDIMScheduler.step's own previous timestep
    expected = scheduler.step(x0_hat, scheduler.timesteps[0], x_from).prev_sample
    got = diffusion.unrolled_x_t(x0_hat, x_from, torch.full((3,), t_from), torch.full((3,), t_to))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unroll_needs_x0_objective():
    cfg = Config()
    cfg.diffusion.unroll_prob, cfg.diffusion.objective = 0.5, "eps"
    with pytest.raises(ConfigError, match="unroll_prob"):
        validate(cfg)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 7])
def test_trailing_timesteps_match_the_sampler(steps):
    from diffcap.diffusion.timesteps import trailing_timesteps

    diffusion = GaussianDiffusion(DiffusionConfig(schedule="linear", num_timesteps=2000))
    assert trailing_timesteps(2000, steps) == make_scheduler("ddim", diffusion, steps).timesteps.tolist()


def test_grid_timesteps_draw_only_sampler_timesteps():
    from diffcap.diffusion.timesteps import GridTimesteps

    grid = GridTimesteps(2000, 3)
    t, w = grid.sample(4000, "cpu")
    assert sorted(set(t.tolist())) == [666, 999, 1332, 1999]
    assert torch.equal(w, torch.ones(4000))


def test_unrolled_examples_learn_from_the_ddim_step_of_the_first_estimate(feature_data, tmp_path):
    """With unroll_prob=1 the no-gradient pass runs at t = T-1 from x_T, and the pass that is trained
    sees exactly the DDIM step from that clamped estimate, with the estimate as self-conditioning."""
    from conftest import small_config

    from diffcap.data.contract import FeatureStore
    from diffcap.training import Trainer

    cfg = small_config(feature_data, steps=2)
    cfg.diffusion.unroll_prob = 1.0
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train(resume=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    calls = []

    def spy(x_t, t, cond, self_cond=None, drop_cond=None, return_logits=False):
        out = original(x_t, t, cond, self_cond, drop_cond, return_logits=return_logits)
        calls.append((x_t, t, self_cond, out[0] if return_logits else out))
        return out

    original, model.forward = model.forward, spy
    ids = trainer.tokenizer.encode(["a red cube", "a blue ball"])
    feats = FeatureStore.open(feature_data / "features.safetensors").get(["img0", "img1"])
    torch.manual_seed(0)
    model.training_losses(ids, feats)
    (x_first, t_first, sc_first, first), (x_t, t, self_cond, _) = calls
    top = cfg.diffusion.num_timesteps - 1
    assert t_first.tolist() == [top, top] and sc_first is None
    expected = model.diffusion.unrolled_x_t(model.embedding.clamp(first), x_first, t_first, t)
    torch.testing.assert_close(x_t, expected)
    torch.testing.assert_close(self_cond, first)


def test_self_conditioning_first_pass_runs_on_the_examples_that_read_it(feature_data, tmp_path):
    """Bit Diffusion feeds the first estimate back to half of the examples: the no-gradient pass runs on
    those rows only, and the trained pass sees its estimate there and zeros elsewhere."""
    from conftest import small_config

    from diffcap.data.contract import FeatureStore
    from diffcap.training import Trainer

    cfg = small_config(feature_data, steps=1)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train(resume=False)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()  # no dropout: passes are comparable
    calls = []

    def spy(x_t, t, cond, self_cond=None, drop_cond=None, return_logits=False):
        out = original(x_t, t, cond, self_cond, drop_cond, return_logits=return_logits)
        calls.append((x_t, t, cond, self_cond, out[0] if return_logits else out))
        return out

    original, model.forward = model.forward, spy
    names = [f"img{i}" for i in range(8)]
    ids = trainer.tokenizer.encode([f"caption {i}" for i in range(8)])
    feats = FeatureStore.open(feature_data / "features.safetensors").get(names)
    torch.manual_seed(3)
    model.training_losses(ids, feats)
    (x_first, t_first, _, sc_first, first), (x_t, t, _, self_cond, _) = calls
    used = self_cond.abs().sum(dim=(1, 2)) > 0
    assert 0 < len(x_first) == int(used.sum()) < 8 and sc_first is None
    torch.testing.assert_close(x_first, x_t[used])
    torch.testing.assert_close(self_cond[used], model.diffusion.predict_x0(first, x_first, t_first))
    assert torch.equal(self_cond[~used], torch.zeros_like(self_cond[~used]))


def test_training_with_unroll_and_grid_timesteps_still_overfits(feature_data, tmp_path):
    from conftest import CAPTIONS, small_config

    from diffcap.data.contract import FeatureStore
    from diffcap.pipeline import CaptionPipeline
    from diffcap.training import Trainer

    cfg = small_config(feature_data, steps=400)
    cfg.diffusion.timesteps_per_caption = 4
    cfg.diffusion.unroll_prob, cfg.diffusion.timestep_sampler, cfg.diffusion.grid_steps = 0.5, "grid", 3
    Trainer(cfg, tmp_path / "run").train(resume=False)
    pipe = CaptionPipeline.from_pretrained(tmp_path / "run")
    feats = FeatureStore.open(feature_data / "features.safetensors").get([f"img{i}" for i in range(8)])
    for steps in (1, 2, 3):
        assert pipe(feats, seed=0, steps=steps, method="ddim").texts == CAPTIONS


def test_mask_predict_state_noises_the_lowest_scored_words_and_never_the_padding():
    diffusion = GaussianDiffusion(DiffusionConfig(schedule="linear", num_timesteps=100))
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    content = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.0], [0.2, 0.8, 0.4, 0.6, 0.0]])
    # share 0.5 of 4 words: floor(2) + 1 = 3 noised; share 0.99 of 3 words: all 3
    x, t, noised = diffusion.mask_predict_state(x0, eps, content, scores, torch.tensor([0.5, 0.99]))
    assert noised.tolist() == [[True, True, False, True, False], [True, True, True, False, False]]
    assert t.tolist() == [[99, 99, 0, 99, 0], [99, 99, 99, 0, 0]]
    _, _, one = diffusion.mask_predict_state(x0, eps, content, scores, torch.tensor([0.0, 0.0]))
    assert one.sum(dim=1).tolist() == [1, 1]
    top = torch.full((2,), 99)
    torch.testing.assert_close(x, torch.where(noised[..., None], diffusion.q_sample(x0, top, eps), x0))


def test_mask_predict_needs_x0_and_time_embedding():
    cfg = Config()
    cfg.diffusion.mask_predict_prob = 0.5
    validate(cfg)
    cfg.model.time_embedding = False
    with pytest.raises(ConfigError, match="mask_predict_prob"):
        validate(cfg)


def test_mask_predict_examples_tell_each_position_its_time_and_score_only_the_noised(feature_data, tmp_path):
    """With mask_predict_prob=1 the trained pass sees clean embeddings at t=0 and noise at t=T-1, and its
    loss is the loss of the noised positions only: perturbing the prediction at a clean position changes
    nothing."""
    from conftest import small_config

    from diffcap.data.contract import FeatureStore
    from diffcap.training import Trainer

    cfg = small_config(feature_data, steps=1)
    cfg.diffusion.mask_predict_prob = 1.0
    cfg.diffusion.cond_dropout = 0.0
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train(resume=False)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    ids = trainer.tokenizer.encode(["a red cube", "a blue ball"])
    feats = FeatureStore.open(feature_data / "features.safetensors").get(["img0", "img1"])
    seen, shift = [], {"on": False}
    original = model.forward

    def spy(x_t, t, cond, self_cond=None, drop_cond=None, return_logits=False):
        out = original(x_t, t, cond, self_cond, drop_cond, return_logits=return_logits)
        seen.append((x_t, t))
        if shift["on"] and return_logits:  # move the prediction at the clean positions only
            pred, logits = out
            clean = (t == 0)[..., None]
            if logits is not None:
                logits = torch.where(clean, logits + torch.randn_like(logits), logits)
            return torch.where(clean, pred + 5, pred), logits
        return out

    model.forward = spy
    torch.manual_seed(0)
    base = model.training_losses(ids, feats)
    x_t, t = seen[-1]
    top = cfg.diffusion.num_timesteps - 1
    assert t.shape == ids.shape and set(t.unique().tolist()) <= {0, top} and (t == top).any()
    clean = t == 0
    torch.testing.assert_close(x_t[clean], model.embedding(ids)[clean])
    shift["on"] = True
    torch.manual_seed(0)
    shifted = model.training_losses(ids, feats)
    torch.testing.assert_close(shifted["diffusion"], base["diffusion"])
    torch.testing.assert_close(shifted["rounding"], base["rounding"])


class _StubCaptioner(torch.nn.Module):
    """What the sampler asks of a captioner besides its forward: the model settings (no
    self-conditioning) and the condition encoder (the features as one token)."""

    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding
        self.cfg = Config().model
        self.cfg.self_condition = False

    def encode_condition(self, features):
        return features[:, None, :]


class _OracleWithConfidence(_StubCaptioner):
    """Predicts the target caption, with a confidence it reads off the input: a position told t = 0
    keeps the word it was given; a noised one gets the target word, sure of it only at positions < sure."""

    def __init__(self, embedding, target, sure, top):
        super().__init__(embedding)
        self.target, self.sure, self.top = target, sure, top
        self.calls = []

    def forward(self, x_t, t, cond, self_cond=None, drop_cond=None, return_logits=False):
        self.calls.append(t.clone())
        ids, rows = self.embedding.allowed_rows()
        col = self.embedding.allowed_position(self.target).expand(x_t.shape[0], -1)
        positions = torch.arange(x_t.shape[1])[None].expand_as(col)
        logits = torch.full((*col.shape, len(ids)), -5.0)
        strength = torch.where(positions < self.sure, 10.0, 1.0)
        logits.scatter_(2, col[..., None], strength[..., None])
        out = logits.softmax(-1) @ rows
        return (out, logits) if return_logits else out


@pytest.mark.parametrize("clamp", [True, False])
def test_mask_predict_sampler_keeps_confident_words_and_renoises_the_rest(clamp):
    from diffcap.config import SamplerConfig
    from diffcap.diffusion.sampler import Sampler
    from diffcap.models.embedding import TokenEmbedding

    emb = TokenEmbedding(vocab_size=12, dim=4)
    target = torch.tensor([[5, 6, 7, 8, 0, 0]])
    diffusion = GaussianDiffusion(DiffusionConfig(schedule="linear", num_timesteps=50))
    model = _OracleWithConfidence(emb, target, sure=2, top=49)
    sampler = Sampler(model, diffusion, SamplerConfig(method="mask_predict", steps=3, clamp=clamp), seq_len=6)
    out = sampler.sample(torch.zeros(2, 3), torch.Generator().manual_seed(0), trajectory=True)
    assert out.ids.tolist() == target.expand(2, -1).tolist()
    first, second, third = model.calls
    assert (first == 49).all()
    # 4 words: step 2 re-noises 4 (S-1-1)/S = 2 of them, the least confident (2, 3), step 3 one of those;
    # the padding that step 1 predicted stays
    assert (second == 49).tolist() == [[False, False, True, True, False, False]] * 2
    assert (third == 49).sum(1).tolist() == [1, 1] and (third[:, [0, 1, 4, 5]] == 0).all()
    assert len(out.trajectory) == 3


def test_renoise_count_follows_the_linear_or_cosine_schedule():
    from diffcap.diffusion.sampler import renoise_count

    words = torch.tensor([[10], [4]])
    linear = [renoise_count(words, k, 4).flatten().tolist() for k in range(4)]
    assert linear == [[7, 3], [5, 2], [2, 1], [0, 0]]  # N (S-1-k) / S, rounded down
    cosine = [renoise_count(words, k, 4, "cosine").flatten().tolist() for k in range(4)]
    assert cosine == [[9, 3], [7, 2], [3, 1], [0, 0]]  # N cos(pi/2 (k+1) / S): 9.24, 7.07, 3.83; 3.70, 2.83, 1.53
    assert renoise_count(words, 0, 2, "cosine").flatten().tolist() == [7, 2]  # 2 steps: 7.07, 2.83
    assert renoise_count(words, 0, 1).flatten().tolist() == [0, 0]  # one step re-noises nothing


def test_mask_predict_sampler_follows_the_cosine_schedule():
    from diffcap.config import SamplerConfig
    from diffcap.diffusion.sampler import Sampler
    from diffcap.models.embedding import TokenEmbedding

    emb = TokenEmbedding(vocab_size=12, dim=4)
    target = torch.tensor([[5, 6, 7, 8, 0, 0]])
    diffusion = GaussianDiffusion(DiffusionConfig(schedule="linear", num_timesteps=50))
    model = _OracleWithConfidence(emb, target, sure=1, top=49)
    cfg = SamplerConfig(method="mask_predict", steps=3, mask_schedule="cosine")
    out = Sampler(model, diffusion, cfg, seq_len=6).sample(torch.zeros(1, 3), torch.Generator().manual_seed(0))
    assert out.ids.tolist() == target.tolist()
    # 4 words: step 2 re-noises floor(4 cos(pi/6)) = 3, all but the sure one; step 3 floor(4 cos(pi/3)) = 2
    second, third = model.calls[1:]
    assert (second == 49).tolist() == [[False, True, True, True, False, False]]
    assert (third == 49).sum().item() == 2 and (third[:, [0, 4, 5]] == 0).all()


def test_mask_predict_sampling_refuses_a_length_layout_and_classifier_guidance():
    cfg = Config()
    cfg.sampler.method = "mask_predict"
    validate(cfg)
    cfg.sampler.length = "expected"
    with pytest.raises(ConfigError, match="mask_predict.*length=free"):
        validate(cfg)


def test_losses_at_given_timesteps_are_plain_denoising(feature_data, tmp_path):
    """Validation scores fixed timesteps: no example of it is a mask-predict or unrolled one."""
    from conftest import small_config

    from diffcap.data.contract import FeatureStore
    from diffcap.training import Trainer

    cfg = small_config(feature_data, steps=1)
    cfg.diffusion.mask_predict_prob, cfg.diffusion.unroll_prob = 1.0, 1.0
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train(resume=False)
    model = trainer.accelerator.unwrap_model(trainer.model)
    seen = []
    original = model.forward

    def spy(x_t, t, *args, **kwargs):
        seen.append(t.clone())
        return original(x_t, t, *args, **kwargs)

    model.forward = spy
    ids = trainer.tokenizer.encode(["a red cube", "a blue ball"])
    feats = FeatureStore.open(feature_data / "features.safetensors").get(["img0", "img1"])
    model.diffusion.training_losses(model, ids, feats, t=torch.tensor([3, 7]))
    assert all(t.tolist() == [3, 7] for t in seen)


def test_length_candidates_are_the_likeliest_lengths_under_independent_pad_probabilities():
    from diffcap.diffusion.sampler import length_candidates

    p_pad = torch.tensor([[0.1, 0.2, 0.6, 0.9], [0.1, 0.9, 0.9, 0.9]])
    layouts = length_candidates(p_pad, 2).view(2, 2, 4)
    # caption 0: length 2 scores .9*.8*.6*.9, length 3 .9*.8*.4*.9, length 4 .9*.8*.4*.1, length 1 .9*.2*.6*.9
    assert layouts[0].sum(1).tolist() == [2, 3]
    assert layouts[1].sum(1).tolist() == [1, 2]
    assert (layouts[..., 0]).all() and layouts[0, 0].tolist() == [True, True, False, False]


class _TableOracle(_StubCaptioner):
    """Predicts fixed word probabilities per position ([L x A] over the allowed rows), whatever it is given."""

    def __init__(self, embedding, table):
        super().__init__(embedding)
        self.table = table
        self.batches = []

    def forward(self, x_t, t, cond, self_cond=None, drop_cond=None, return_logits=False):
        self.batches.append(x_t.shape[0])
        logits = self.table.log().expand(x_t.shape[0], -1, -1)
        out = self.table @ self.embedding.allowed_rows()[1]
        return (out.expand(x_t.shape[0], -1, -1), logits) if return_logits else out


@pytest.mark.parametrize("clamp", [True, False])
def test_length_beam_keeps_the_candidate_the_model_is_surest_of(clamp):
    """Position 2 is likelier PAD (0.55) than word 7 (0.45), so one length ends the caption there; but
    the two-word caption's mean log confidence (log .1 + log .99) / 2 = -1.16 is below the three-word
    one's (log .1 + log .99 + log .45) / 3 = -1.04, so a length beam of 2 keeps three words."""
    from diffcap.config import SamplerConfig
    from diffcap.diffusion.sampler import Sampler
    from diffcap.models.embedding import TokenEmbedding

    emb = TokenEmbedding(vocab_size=12, dim=16)
    ids = emb.allowed_rows()[0].tolist()
    table = torch.full((4, len(ids)), 1e-4)
    table[0] = 0.9 / (len(ids) - 1)  # an unsure first word (5 at 0.1, every other row just under)
    for position, word, p in [(0, 5, 0.1), (1, 6, 0.99), (2, 7, 0.45), (2, 0, 0.55), (3, 0, 0.99)]:
        table[position, ids.index(word)] = p
    table = table / table.sum(1, keepdim=True)
    if clamp:  # nearest-embedding rounding needs the expected embedding to sit at the likeliest row
        emb.weight.data = torch.eye(12, 16) * 10
    diffusion = GaussianDiffusion(DiffusionConfig(schedule="linear", num_timesteps=50))
    results = {}
    for beam in (1, 2):
        model = _TableOracle(emb, table)
        cfg = SamplerConfig(method="mask_predict", steps=2, clamp=clamp, length_beam=beam)
        sampler = Sampler(model, diffusion, cfg, seq_len=4)
        out = sampler.sample(torch.zeros(3, 2), torch.Generator().manual_seed(0), trajectory=True)
        results[beam] = out.ids.tolist()
        assert model.batches == [3, 3 * beam] and [step.shape[0] for _, step in out.trajectory] == [3, 3]
    assert results[1] == [[5, 6, 0, 0]] * 3
    assert results[2] == [[5, 6, 7, 0]] * 3


def test_length_beam_needs_mask_predict():
    cfg = Config()
    cfg.sampler.length_beam = 3
    with pytest.raises(ConfigError, match="length_beam > 1 needs sampler.method=mask_predict"):
        validate(cfg)
    cfg.sampler.method = "mask_predict"
    validate(cfg)
