"""Experiment configs load; a tiny two-point sweep runs, survives a stop, resumes and writes its table."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import make_feature_data

import diffcap.experiments.sweep as sweep_mod
from diffcap.config import Config, ConfigError
from diffcap.experiments.sweep import load_sweep, run_sweep
from diffcap.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_exist_for_the_seed_experiments():
    names = {p.stem for p in CONFIGS}
    for needed in (
        "objective_x0",
        "objective_xtk30",
        "objective_eps",
        "rounding_weight_0.05",
        "guidance_off",
        "guidance_free",
        "frozen_embeddings",
        "emb_dim_16",
        "time_embedding_off",
        "loss_mse",
        "schedule_cosine",
        "schedule_linear",
        "timesteps_per_caption_3",
        "fusion_add",
        "seed_best",
        "diffcap_best",
        "rounding_weight_0",  # from here: settings the seed log names but never measured
        "rounding_weight_1e5",
        "objective_xtk30_rounding_0.1",
        "pretrained_body_trainable",
        "loss_vlb",
        "frozen_projections",
    ):
        assert needed in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_and_validates(path):
    cfg = Config.load(path)
    assert not cfg.data.captions and not cfg.data.features  # the sweep names the data set


def test_seed_best_is_the_seed_setting():
    cfg = Config.load(ROOT / "configs" / "seed_best.yaml")
    assert (cfg.text.max_length, cfg.diffusion.objective, cfg.diffusion.rounding_weight) == (16, "x0", 0.3)
    assert (cfg.train.lr, cfg.train.final_lr, cfg.train.lr_schedule) == (1e-4, 5e-5, "linear")
    assert (cfg.model.fusion, cfg.sampler.guidance_scale, cfg.diffusion.cond_dropout) == ("concat", 1.0, 0.0)
    assert cfg.model.embedding == "distilbert-base-uncased"


def test_seed_experiments_sweep_file_validates(tmp_path):
    sweep = load_sweep(ROOT / "sweeps" / "seed_experiments.yaml", data=tmp_path)
    names = [v.name for v in sweep.variants]
    assert "seed_best" in names and "diffcap_best" in names and len(names) == len(set(names))
    used = {v.config.stem for v in sweep.variants if v.config}
    # every experiment config except the debug / duplicate-of-baseline ones (and diffcap_best_distilled,
    # which needs a distilled captions file) is in the sweep
    assert {p.stem for p in CONFIGS} - used <= {
        "overfit_single_samples",
        "schedule_sqrt",
        "fusion_concat",
        "fusion_cross",  # for patch grids; the proxy's features are one pooled vector
        "sampling_steps_200",
        "diffcap_best_distilled",
    }


def test_issue18_sweep_trains_fixed_steps_on_the_seed_sweeps_setup(tmp_path):
    """The issue-18 rows ran on a shared machine, so they train a fixed number of steps (what 120 s gave
    on the idle one) with the seed sweep's data, base settings and evaluation, so the rows compare."""
    from diffcap.experiments.sweep import variant_config

    new = load_sweep(ROOT / "sweeps" / "seed_experiments_issue18.yaml", data=tmp_path)
    old = load_sweep(ROOT / "sweeps" / "seed_experiments.yaml", data=tmp_path)
    assert (new.budget_s, old.budget_s) == (0.0, 120.0)
    assert (new.base, new.overrides[:3], new.eval, new.sampling_steps) == (
        old.base,
        old.overrides,
        old.eval,
        old.sampling_steps,
    )
    train = {v.name: variant_config(new, v).train for v in new.variants}
    body = {n for n in train if "body" in n or n == "frozen_projections"}
    assert {train[n].steps for n in train.keys() - body} == {627}  # objective_x0's steps in 120 s
    assert all(0 < train[n].steps < 627 for n in body)  # the MiniLM body costs more per step
    assert all(t.warmup_steps == t.steps // 10 and t.time_budget_s == 0 for t in train.values())


def test_issue4_sweep_file_validates(tmp_path):
    sweep = load_sweep(ROOT / "sweeps" / "issue4_techniques.yaml", data=tmp_path)
    names = [v.name for v in sweep.variants]
    assert names[0] == "base" and "score_interpolation" in names and len(names) == len(set(names))
    assert all(set(v.samplers) == {"raw", "collapsed"} for v in sweep.variants)


def test_distillation_sweep_file_validates(tmp_path):
    from diffcap.experiments.sweep import variant_config

    sweep = load_sweep(ROOT / "sweeps" / "distillation.yaml", data=tmp_path)
    captions = {v.name: Path(variant_config(sweep, v).data.captions).name for v in sweep.variants}
    assert captions == {
        "references": "captions.jsonl",
        "distilled": "captions_distilled.jsonl",
        "distilled_and_references": "captions_distilled_and_references.jsonl",
    }


SWEEP = """
name: tiny
data: data
out: out
overrides: [text.max_length=10, model.d_model=32, model.n_layers=1, model.n_heads=2, model.emb_dim=8,
            model.dropout=0.0, diffusion.num_timesteps=50, train.steps=4, train.batch_size=8,
            train.warmup_steps=1, train.eval_every=0, train.progress=false]
eval: {max_images: 4, seed: 0, metrics: cider}
sampling_steps: [2, 3]
speed: {batch: 4, batch1_captions: 1}
grid:
  diffusion.loss: [l1, mse]
"""


def test_two_point_sweep_stops_resumes_and_writes_its_table(tmp_path, monkeypatch):
    make_feature_data(tmp_path / "data")
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP)
    trained = []
    real_train = Trainer.train
    monkeypatch.setattr(
        Trainer, "train", lambda self, resume=True: trained.append(self.out_dir.name) or real_train(self, resume=resume)
    )
    real_eval = sweep_mod._evaluate

    def stop_at_second(sweep, variant, run_dir, record):
        if variant.name == "diffusion.loss=mse":
            raise KeyboardInterrupt  # the sweep is stopped while evaluating the second point
        return real_eval(sweep, variant, run_dir, record)

    monkeypatch.setattr(sweep_mod, "_evaluate", stop_at_second)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path)
    out = tmp_path / "out"
    assert (out / "diffusion.loss=l1" / "result.json").exists()
    assert not (out / "diffusion.loss=mse" / "result.json").exists()
    assert "Not finished yet: diffusion.loss=mse" in (out / "results.md").read_text()
    first = (out / "diffusion.loss=l1" / "result.json").read_text()
    assert trained == ["diffusion.loss=l1", "diffusion.loss=mse"]
    assert json.loads((out / "diffusion.loss=l1" / "trained.json").read_text())["resumed"] is False

    monkeypatch.setattr(sweep_mod, "_evaluate", real_eval)
    rows = run_sweep(path)
    assert trained == ["diffusion.loss=l1", "diffusion.loss=mse"]  # nothing trained again
    assert (out / "diffusion.loss=l1" / "result.json").read_text() == first  # finished run skipped
    assert [(r["name"], r["steps"]) for r in rows] == [
        ("diffusion.loss=l1", 2),
        ("diffusion.loss=l1", 3),
        ("diffusion.loss=mse", 2),
        ("diffusion.loss=mse", 3),
    ]
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and all(float(r["captions_per_s"]) > 0 and r["CIDEr"] != "" for r in table)
    md = (out / "results.md").read_text()
    assert "| diffusion.loss=mse | default | 3 |" in md and "Not finished" not in md
    config = json.loads((out / "diffusion.loss=mse" / "config.json").read_text())
    assert config["diffusion"]["loss"] == "mse" and config["model"]["d_model"] == 32


def test_sweep_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: d\nvariants: [{name: a, overrides: [model.fusion=sum]}]\n")
    with pytest.raises(ConfigError, match="'model.fusion' is 'sum'"):
        load_sweep(path)
    path.write_text("data: d\nvariantz: []\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown keys \['variantz'\]"):
        load_sweep(path)


def test_a_variant_resumed_mid_training_is_marked_resumed(tmp_path, monkeypatch):
    make_feature_data(tmp_path / "data")
    path = tmp_path / "sweep.yaml"
    path.write_text(
        SWEEP.replace("grid:\n  diffusion.loss: [l1, mse]\n", "variants: [{name: a}]\n").replace(
            "sampling_steps: [2, 3]", "sampling_steps: [2]"
        )
    )
    real_save = Trainer.save

    def stopped_after_step_2(self):
        real_save(self)
        if self.step == 2:
            raise KeyboardInterrupt  # the sweep is stopped mid-training, a checkpoint written

    monkeypatch.setattr(Trainer, "save", stopped_after_step_2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(path)
    monkeypatch.setattr(Trainer, "save", real_save)
    rows = run_sweep(path)
    trained = json.loads((tmp_path / "out" / "a" / "trained.json").read_text())
    assert trained["resumed"] is True and trained["resumed_at_step"] == 2 and trained["train_steps"] == 4
    assert [r["resumed"] for r in rows] == [True]
    with open(tmp_path / "out" / "results.csv") as f:
        assert [r["resumed"] for r in csv.DictReader(f)] == ["True"]
