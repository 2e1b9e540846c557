"""Training end to end on tiny data: overfitting, run-directory round trips, resume, pretrained parts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CAPTIONS, small_config
from safetensors.torch import load_file

from diffcap.data.contract import FeatureStore
from diffcap.pipeline import CaptionPipeline
from diffcap.training import Trainer
from diffcap.training.trainer import ema_multi_avg_fn, lr_lambda


def _features(data_dir, ids):
    return FeatureStore.open(data_dir / "features.safetensors").get(ids)


def test_overfit_eight_captions_from_noise(feature_data, tmp_path):
    """The seed's single-sample trials: 8 captions on 8 random vectors, regenerated exactly from noise."""
    cfg = small_config(feature_data, steps=400)
    cfg.diffusion.timesteps_per_caption = 4
    Trainer(cfg, tmp_path / "run").train(resume=False)
    pipe = CaptionPipeline.from_pretrained(tmp_path / "run")
    out = pipe(_features(feature_data, [f"img{i}" for i in range(8)]), seed=0)
    assert out.texts == CAPTIONS


def test_score_interpolation_overfits_with_cross_entropy_only(feature_data, tmp_path):
    """CDCD's score interpolation: logits -> x0_hat = softmax @ E, trained by the rounding loss alone."""
    cfg = small_config(feature_data, steps=400)
    cfg.diffusion.timesteps_per_caption = 4
    cfg.model.score_interpolation = True
    cfg.diffusion.diffusion_weight, cfg.diffusion.rounding_weight = 0.0, 1.0
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train(resume=False)
    model = trainer.ema.module
    x_t, t = torch.randn(2, cfg.text.max_length, cfg.model.emb_dim), torch.tensor([5, 150])
    cond = model.encode_condition(_features(feature_data, ["img0", "img1"]))
    out, logits = model(x_t, t, cond, return_logits=True)
    ids, rows = model.embedding.allowed_rows()
    assert logits.shape[-1] == len(ids) < model.embedding.weight.shape[0]  # no [UNK], [BOS], ...
    assert torch.allclose(out, logits.softmax(-1) @ rows, atol=1e-5)  # x0_hat is a mix of allowed rows
    pipe = CaptionPipeline.from_pretrained(tmp_path / "run")
    feats = _features(feature_data, [f"img{i}" for i in range(8)])
    assert pipe(feats, seed=0).texts == CAPTIONS
    assert pipe(feats, seed=0, precision="bf16").texts == CAPTIONS  # the matmuls in bfloat16 (autocast)


def test_saved_run_rebuilds_identical_samples(feature_data, tmp_path):
    cfg = small_config(feature_data, steps=30)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train(resume=False)
    live = CaptionPipeline(trainer.cfg, trainer.ema.module, trainer.tokenizer)
    loaded = CaptionPipeline.from_pretrained(tmp_path / "run")
    feats = _features(feature_data, ["val0", "val1", "val2"])
    a = live(feats, seed=7, trajectory=True)
    b = loaded(feats, seed=7, trajectory=True)
    assert a.texts == b.texts and a.trajectories == b.trajectories
    for name, tensor in load_file(str(tmp_path / "run" / "ema.safetensors")).items():
        assert torch.equal(tensor, trainer.ema.module.state_dict()[name])
    # a different seed draws different noise, hence (almost surely) a different trajectory
    assert loaded(feats, seed=8, trajectory=True).trajectories != b.trajectories


def test_bf16_captioning_uses_a_copy_that_follows_the_weights(feature_data, tmp_path):
    Trainer(small_config(feature_data, steps=5), tmp_path / "run").train(resume=False)
    pipe = CaptionPipeline.from_pretrained(tmp_path / "run")
    assert pipe._model_for("fp32") is pipe.model
    with torch.no_grad():
        fast = pipe._model_for("bf16")
        assert fast is not pipe.model and pipe._model_for("bf16") is fast  # made once, then reused
        linears = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
        assert fast.embedding.weight.dtype == torch.float32  # rounding stays in fp32
        next(pipe.model.parameters()).add_(1.0)  # a training or EMA update, in place
        again = pipe._model_for("bf16")
        assert again is not fast
        pipe.model.embedding.restrict_to(torch.tensor([1, 2]), always=(0,))  # a buffer changes
        assert pipe._model_for("bf16") is not again
    assert len(pipe(_features(feature_data, ["val0", "val1"]), precision="bf16").texts) == 2


def test_resume_continues_to_the_same_weights(feature_data, tmp_path):
    cfg = small_config(feature_data, steps=20)
    cfg.train.save_every = 10
    Trainer(cfg, tmp_path / "full").train(resume=False)
    cfg_half = small_config(feature_data, steps=10)
    Trainer(cfg_half, tmp_path / "split").train(resume=False)
    cfg_rest = small_config(feature_data, steps=20)
    cfg_rest.train.save_every = 10
    resumed = Trainer(cfg_rest, tmp_path / "split")
    assert resumed.resume() and resumed.step == 10
    resumed.train(resume=False)
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "model.safetensors"))
    for name in full:
        torch.testing.assert_close(split[name], full[name], rtol=0, atol=0)


def test_validation_logs_quartile_losses_and_cider(feature_data, tmp_path):
    cfg = small_config(feature_data, steps=10)
    cfg.train.eval_every, cfg.train.log_every = 10, 5
    Trainer(cfg, tmp_path / "run").train(resume=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()]
    val = [r for r in records if "val/CIDEr" in r][-1]
    assert {f"val/loss_q{q}" for q in range(4)} <= set(val) and len(val["val/samples"]) == 3
    assert [r["step"] for r in records if "train/loss" in r] == [5, 10]
    assert any((tmp_path / "run" / "logs" / "tensorboard").iterdir())


def test_keep_best_keeps_the_ema_weights_of_the_best_validation(feature_data, tmp_path, monkeypatch):
    """train.keep_best: RUN/best holds the EMA weights of the validation with the highest val/CIDEr (here the
    second of four, scripted), not the last ones; a resumed run does not replace it by a worse score, and
    a run that starts over sets it aside."""
    from diffcap.training import validation

    scores = iter([0.2, 0.9, 0.5, 0.1, 0.3, 0.95, 0.05])
    kept_ema = {}

    def scripted(self, model):
        kept_ema[len(kept_ema)] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"val/CIDEr": next(scores)}

    monkeypatch.setattr(validation.Validator, "__call__", scripted)
    cfg = small_config(feature_data, steps=8)
    cfg.model.dropout = 0.1  # the EMA and raw weights differ, so the test tells them apart
    cfg.train.eval_every, cfg.train.save_every, cfg.train.keep_best = 2, 2, True
    run = tmp_path / "run"
    Trainer(cfg, run).train(resume=False)
    assert json.loads((run / "best" / "best.json").read_text()) == {"step": 4, "val/CIDEr": 0.9}
    best = load_file(run / "best" / "ema.safetensors")
    for name, value in kept_ema[1].items():
        torch.testing.assert_close(best[name], value, rtol=0, atol=0)
    assert any(not torch.equal(best[k], v) for k, v in load_file(run / "ema.safetensors").items())
    assert CaptionPipeline.from_pretrained(run / "best")(torch.randn(2, 16)).texts  # a loadable run folder
    # Resumed to 12 steps: 0.3 at step 10 loses to the 0.9 kept, 0.95 at step 12 wins.
    cfg.train.steps = 10
    Trainer(cfg, run).train(resume=True)
    assert json.loads((run / "best" / "best.json").read_text())["step"] == 4
    cfg.train.steps = 12
    Trainer(cfg, run).train(resume=True)
    assert json.loads((run / "best" / "best.json").read_text()) == {"step": 12, "val/CIDEr": 0.95}
    # A run that starts over sets the earlier run's best aside instead of competing with it.
    cfg.train.steps = 2
    Trainer(cfg, run).train(resume=False)
    assert json.loads((run / "best" / "best.json").read_text()) == {"step": 2, "val/CIDEr": 0.05}
    assert len(list(run.glob("best.replaced-*"))) == 1


def test_keep_best_needs_validation(feature_data):
    from diffcap.config import ConfigError, validate

    cfg = small_config(feature_data)
    cfg.train.keep_best = True
    with pytest.raises(ConfigError, match="train.keep_best.*eval_every"):
        validate(cfg)
    cfg.train.eval_every, cfg.data.val_split = 5, "none"
    with pytest.raises(ConfigError, match="val_split"):
        validate(cfg)


def test_lr_warmup_then_linear_decay_to_final():
    from diffcap.config import TrainConfig

    f = lr_lambda(TrainConfig(steps=110, warmup_steps=10, lr=1e-4, final_lr=5e-5, lr_schedule="linear"))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.75) and f(110) == pytest.approx(0.5)
    g = lr_lambda(TrainConfig(steps=110, warmup_steps=10, lr=1e-4, final_lr=5e-5, lr_schedule="cosine"))
    assert g(60) == pytest.approx(0.75) and g(110) == pytest.approx(0.5)


def test_ema_is_the_warmed_up_moving_average_and_copies_masks():
    """The in-place EMA against the formula it replaced: e_n = e + (w - e)(1 - min(decay, (1+n)/(10+n)))."""
    from torch.optim.swa_utils import AveragedModel

    model = torch.nn.Linear(3, 2)
    model.register_buffer("allowed", torch.tensor([True, False, True]))
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(0.9), use_buffers=True)
    g = torch.Generator().manual_seed(0)
    expected = None
    for n in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        model.allowed.copy_(torch.rand(3, generator=g) > 0.5)
        ema.update_parameters(model)
        weights = [p.detach().double() for p in model.parameters()]
        if expected is None:  # the first update copies
            expected = weights
        else:
            keep = min(0.9, (1 + n) / (10 + n))  # n updates averaged before this one
            expected = [e + (w - e) * (1 - keep) for e, w in zip(expected, weights)]
        for e, p in zip(expected, ema.module.parameters()):
            torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-6)
        assert torch.equal(ema.module.allowed, model.allowed)


@pytest.mark.parametrize(
    "overrides",
    [
        {"diffusion.objective": "eps", "diffusion.loss": "mse", "model.fusion": "add", "diffusion.schedule": "linear"},
        {
            "diffusion.objective": "xtk",
            "model.time_embedding": False,
            "model.self_condition": False,
            "diffusion.timestep_sampler": "loss_aware",
            "diffusion.restore_weight": 1.0,
            "diffusion.schedule": "cosine",
            "diffusion.cond_dropout": 0.5,
            "sampler.guidance_scale": 2.0,
            "sampler.method": "ddpm",
            "sampler.mbr": 3,
        },
    ],
)
def test_every_setting_trains_and_samples(feature_data, tmp_path, overrides):
    from diffcap.config import apply_override

    cfg = small_config(feature_data, steps=5)
    for key, value in overrides.items():
        apply_override(cfg, f"{key}={json.dumps(value)}")
    stats = Trainer(cfg, tmp_path / "run").train(resume=False)
    assert torch.isfinite(torch.tensor(stats["loss"]))
    out = CaptionPipeline.from_pretrained(tmp_path / "run")(_features(feature_data, ["val0", "val1"]), seed=0)
    assert len(out.texts) == 2


def test_pretrained_backbone_and_frozen_embeddings_rebuild_offline(feature_data, tmp_path, minilm_dir):
    """A tiny random DistilBERT saved to disk stands in for the hub model; the MiniLM tokenizer gives
    the vocabulary. The run directory alone must rebuild it, and the frozen table must not move."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    tiny = tmp_path / "tiny-distilbert"
    DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(
        tiny
    )
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(tiny)
    cfg = small_config(feature_data, steps=3)
    cfg.text.tokenizer = cfg.model.backbone = cfg.model.embedding = str(tiny)
    trainer = Trainer(cfg, tmp_path / "run")
    before = trainer.model.embedding.weight.detach().clone()
    trainer.train(resume=False)
    assert torch.equal(trainer.model.embedding.weight, before)
    # the widths come from the checkpoint (config.resolve), in the trainer's config, not the one passed in
    assert trainer.cfg.model.d_model == 32 and trainer.cfg.model.emb_dim == 32
    assert cfg.model.d_model == 64 and cfg.model.emb_dim == 16
    live = CaptionPipeline(trainer.cfg, trainer.ema.module, trainer.tokenizer)
    tiny.rename(tmp_path / "gone")  # the run directory must not need the original checkpoint
    loaded = CaptionPipeline.from_pretrained(tmp_path / "run")
    feats = _features(feature_data, ["val0", "val1"])
    assert loaded(feats, seed=1).texts == live(feats, seed=1).texts


def test_starting_over_sets_the_earlier_checkpoints_aside(feature_data, tmp_path):
    cfg = small_config(feature_data, steps=4)
    cfg.train.save_every = 2
    Trainer(cfg, tmp_path / "run").train(resume=False)
    Trainer(cfg, tmp_path / "run").train(resume=False)
    aside = list(tmp_path.glob("run/checkpoints.replaced-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == ["step-000002", "step-000004"]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_loading_weights_of_another_shape_names_the_file(feature_data, tmp_path):
    from safetensors.torch import load_file, save_file

    from diffcap.config import ConfigError
    from diffcap.training.rundir import RunDir

    cfg = small_config(feature_data, steps=2)
    Trainer(cfg, tmp_path / "run").train(resume=False)
    path = tmp_path / "run" / "ema.safetensors"
    weights = load_file(str(path))
    name = next(k for k in weights if k.endswith("in_proj.weight"))
    weights[name] = torch.zeros(3, 3)
    path.unlink()
    save_file(weights, str(path))
    (tmp_path / "run" / "checkpoint.json").unlink()  # as assembled by hand: no checksum says it is damaged
    with pytest.raises(ConfigError, match="ema.safetensors.*in_proj.weight"):
        RunDir(tmp_path / "run").load_model()


def test_body_lr_scale_gives_the_pretrained_body_its_own_learning_rate(feature_data, tmp_path, minilm_dir):
    """train.body_lr_scale: the pretrained body's parameters, and only they, step at lr x scale, through
    warm-up, decay and a resume; a model without a pretrained body refuses the setting."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    from diffcap.config import ConfigError, validate

    tiny = tmp_path / "tiny-distilbert"
    DistilBertModel(DistilBertConfig(vocab_size=30522, dim=32, n_layers=1, n_heads=2, hidden_dim=64)).save_pretrained(
        tiny
    )
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(tiny)
    cfg = small_config(feature_data, steps=4)
    cfg.text.tokenizer = cfg.model.backbone = str(tiny)
    cfg.train.body_lr_scale, cfg.train.save_every, cfg.train.warmup_steps = 0.1, 2, 2
    cfg.train.steps = 2
    first = Trainer(cfg, tmp_path / "run")
    first.train(resume=False)
    cfg.train.steps = 4
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train(resume=True)
    assert trainer.resumed_at == 2
    body = {id(p) for p in trainer.state.model.denoiser.body.parameters() if p.requires_grad}
    rest, body_group = trainer.optimizer.param_groups
    assert {id(p) for p in body_group["params"]} == body and not body & {id(p) for p in rest["params"]}
    factor = lr_lambda(trainer.cfg.train)(trainer.scheduler.last_epoch)
    assert rest["lr"] == pytest.approx(3e-3 * factor) and body_group["lr"] == pytest.approx(3e-4 * factor)

    plain = small_config(feature_data)
    plain.train.body_lr_scale = 0.1
    with pytest.raises(ConfigError, match="body_lr_scale.*model.backbone"):
        validate(plain)
