"""Classifier guidance: gradient direction with an oracle, guided sampling, save/load, training."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from conftest import CAPTIONS, small_config

from diffcap.config import Config
from diffcap.data.contract import FeatureStore
from diffcap.diffusion.diffusion import GaussianDiffusion
from diffcap.diffusion.guidance import GuidanceClassifier, classifier_shift
from diffcap.diffusion.sampler import Sampler
from diffcap.experiments.timing import throughput
from diffcap.models.factory import build_model
from diffcap.pipeline import CaptionPipeline
from diffcap.text.tokenizer import CaptionTokenizer
from diffcap.training import Trainer
from diffcap.training.guidance import load_guidance, train_guidance

COND_DIM = 8


def oracle(emb_table: torch.Tensor, target: torch.Tensor, seq_len: int) -> GuidanceClassifier:
    """A linear guidance model whose score is sum_l <x[l], E[target_l]> (c . c_unit) / (L D), bias 0
    (scaled down so that log-sigmoid does not saturate and the gradient stays informative)."""
    clf = GuidanceClassifier(kind="linear", emb_dim=emb_table.shape[1], cond_dim=COND_DIM, seq_len=seq_len)
    with torch.no_grad():
        c_unit = torch.zeros(COND_DIM)
        c_unit[0] = 1.0
        clf.weight.copy_(torch.einsum("ld,c->ldc", emb_table[target], c_unit) / target.numel() / emb_table.shape[1])
        last = clf.time_mlp[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.5413, 0.0]))  # softplus(0.5413) = 1
    return clf.eval()


def tiny_model(seq_len: int = 8):
    tok = CaptionTokenizer.build_word_level(CAPTIONS, max_length=seq_len)
    cfg = Config()
    cfg.text.max_length = seq_len
    m = cfg.model
    m.d_model, m.n_layers, m.n_heads, m.emb_dim, m.dropout = 32, 1, 2, 8, 0.0
    m.cond_dim, m.cond_tokens = COND_DIM, 1
    cfg.diffusion.num_timesteps = 100
    torch.manual_seed(0)
    return cfg, build_model(cfg, tok).eval(), tok


def oracle_setup():
    """A tiny untrained captioner, the oracle guidance model for one target caption, and its diffusion."""
    cfg, model, tok = tiny_model()
    table = model.embedding.table().detach()
    target = tok.encode(["a dog runs on the grass"])[0]
    return cfg, model, tok, table, target, oracle(table, target, cfg.text.max_length), GaussianDiffusion(cfg.diffusion)


def test_oracle_gradient_points_towards_the_matching_embeddings():
    cfg, _, _, table, target, clf, diffusion = oracle_setup()
    # one x_t for all three times: the oracle ignores t, so only the schedule factor may differ
    x_t = torch.randn(1, cfg.text.max_length, table.shape[1]).expand(3, -1, -1)
    t = torch.tensor([5, 50, 99])
    cond = torch.zeros(3, 1, COND_DIM)
    cond[:, 0, 0] = 1.0
    shift = classifier_shift(clf, diffusion.alpha_bar, x_t, t, cond)
    direction = table[target][None].expand_as(shift)
    ab = diffusion.alpha_bar[t]
    # the oracle's log-sigmoid gradient is (1 - sigmoid(f)) E[target]: positive multiple of the target
    cos = torch.nn.functional.cosine_similarity(shift.flatten(1), direction.flatten(1))
    assert torch.allclose(cos, torch.ones(3), atol=1e-5)
    # scaled by the schedule, (1 - abar) / sqrt(abar): divided by it, the same gradient remains
    norms = shift.flatten(1).norm(dim=1) / ((1 - ab) / ab.sqrt())
    assert norms[0] > 0 and torch.allclose(norms, norms[0].expand(3), rtol=1e-4)
    # the opposite condition flips the sign
    assert (classifier_shift(clf, diffusion.alpha_bar, x_t, t, -cond).flatten(1) * shift.flatten(1)).sum(1).lt(0).all()


def test_guided_sampling_raises_the_guidance_score():
    cfg, model, tok, _, target, clf, diffusion = oracle_setup()
    feats = torch.zeros(6, COND_DIM)
    feats[:, 0] = 1.0

    def run(scale: float) -> tuple[float, float]:
        sampler_cfg = dataclasses.replace(cfg.sampler, steps=10, classifier_scale=scale)
        ids = (
            Sampler(model, diffusion, sampler_cfg, cfg.text.max_length, tok.pad_id, classifier=clf)
            .sample(feats, torch.Generator().manual_seed(0))
            .ids
        )
        x0 = model.embedding(ids)
        with torch.no_grad():
            score = clf(x0, torch.zeros(len(ids), dtype=torch.long), feats[:, None]).mean()
        return float(score), float((ids == target).float().mean())

    # the oracle's gradient is small by construction (E / (2 L D)) and the untrained denoiser ignores
    # x_t, so a large scale is needed for the last, low-noise steps to move the result
    (plain_score, plain_match), (guided_score, guided_match) = run(0.0), run(200.0)
    assert guided_score > plain_score
    assert guided_match > plain_match
    with pytest.raises(ValueError, match="needs a guidance classifier"):
        Sampler(model, diffusion, dataclasses.replace(cfg.sampler, classifier_scale=1.0), 8)


@pytest.mark.parametrize("kind", ["linear", "transformer"])
def test_train_save_load_round_trip_and_guided_pipeline(feature_data, tmp_path, kind):
    cfg = small_config(feature_data, steps=5)
    Trainer(cfg, tmp_path / "run").train(resume=False)
    record = train_guidance(
        tmp_path / "run", kind=kind, steps=5, batch_size=8, d_model=32, n_layers=1, out="guidance-x"
    )
    assert record["steps"] == 5 and 0 <= record["val_accuracy"] <= 1
    clf = load_guidance(tmp_path / "run" / "guidance-x")
    again = load_guidance(tmp_path / "run" / "guidance-x")
    x, t, c = torch.randn(4, 10, 16), torch.tensor([0, 10, 100, 199]), torch.randn(4, 1, 16)
    assert torch.equal(clf(x, t, c), again(x, t, c))
    pipe = CaptionPipeline.from_pretrained(tmp_path / "run")
    feats = FeatureStore.open(feature_data / "features.safetensors").get(["val0", "val1"])
    out = pipe(feats, seed=0, steps=5, classifier_scale=0.5, classifier_path="guidance-x")
    assert len(out.texts) == 2
    # the sweep times guided samplers: the FLOP counter's hooks must stay out of the guidance gradient
    speed = throughput(pipe, feats, 4, steps=2, classifier_scale=0.5, classifier_path="guidance-x")
    assert speed["captions_per_s"] > 0 and speed["gflops"] is None
    assert throughput(pipe, feats, 4, steps=2)["gflop_per_caption"] > 0
    with pytest.raises(FileNotFoundError, match="train-guidance"):
        pipe(feats, seed=0, steps=5, classifier_scale=0.5, classifier_path="nothing-here")


def test_load_guidance_errors_name_the_file(tmp_path):
    from diffcap.training.guidance import CONFIG, WEIGHTS, save_guidance
    from diffcap.training.rundir import RunDirError

    folder = tmp_path / "guidance"
    save_guidance(folder, GuidanceClassifier(kind="linear", emb_dim=4, cond_dim=3, seq_len=5, d_model=8))
    good_weights, good_config = (folder / WEIGHTS).read_bytes(), (folder / CONFIG).read_text()
    load_guidance(folder)

    (folder / WEIGHTS).write_bytes(good_weights[:-20])  # truncated
    with pytest.raises(RunDirError, match=re.escape(str(folder / WEIGHTS))):
        load_guidance(folder)
    (folder / WEIGHTS).write_bytes(good_weights)

    (folder / CONFIG).write_text('{"training": {}}')  # no "architecture"
    with pytest.raises(RunDirError, match=re.escape(str(folder / CONFIG))):
        load_guidance(folder)
    (folder / CONFIG).write_text(good_config.replace('"seq_len": 5', '"seq_len": 6'))  # shape mismatch
    with pytest.raises(RunDirError, match=re.escape(str(folder / WEIGHTS)) + ".*does not fit"):
        load_guidance(folder)
    assert issubclass(RunDirError, FileNotFoundError)  # cli.main reports these as errors, without a traceback
