"""What a user with a trained run reaches for: eval/distill on the run's own feature file, reports,
the model card, save_pretrained / from_pretrained, and the token-recovery diagnosis."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CAPTIONS, small_config

from diffcap.cli import main
from diffcap.data.contract import CaptionRecord, write_captions, write_features
from diffcap.training import Trainer


@pytest.fixture(scope="module")
def patch_run(tmp_path_factory):
    """A tiny run trained on patch_features.safetensors (3 tokens x 8), next to a pooled
    features.safetensors of another width, as `diffcap prepare --patch-tokens` writes them."""
    root = tmp_path_factory.mktemp("patch")
    data = root / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    records = [CaptionRecord(f"{i}", CAPTIONS[i % 8], "train") for i in range(8)]
    records += [CaptionRecord(f"{100 + i}", CAPTIONS[i], "val") for i in range(3)]
    write_captions(records, data / "captions.jsonl")
    write_features(data / "features.safetensors", {r.image_id: torch.randn(16, generator=g) for r in records})
    write_features(data / "patch_features.safetensors", {r.image_id: torch.randn(3, 8, generator=g) for r in records})
    cfg = small_config(data, steps=6)
    cfg.data.features = str(data / "patch_features.safetensors")
    cfg.model.d_model, cfg.model.n_layers, cfg.sampler.steps = 32, 1, 4
    Trainer(cfg, root / "run").train(resume=False)
    return root / "run", data


def test_eval_and_distill_read_the_feature_file_the_run_was_trained_on(patch_run, tmp_path, capsys):
    run, data = patch_run
    out = tmp_path / "eval"
    assert main(["eval", "--run", str(run), "--data", str(data), "--split", "val", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["n_images"] == 3
    distilled = tmp_path / "distilled.jsonl"
    assert main(["distill", "--teacher", str(run), "--data", str(data), "--out", str(distilled)]) == 0
    assert f"data.features={data / 'patch_features.safetensors'}" in capsys.readouterr().out

    pooled = str(data / "features.safetensors")
    args = ["eval", "--run", str(run), "--data", str(data), "--split", "val", "--features", pooled]
    assert main([*args, "--out", str(tmp_path / "e2")]) == 2
    assert "(16,)" in capsys.readouterr().err  # --features is read, and its shape is reported


def test_a_missing_feature_file_names_the_one_the_run_was_trained_on(patch_run, tmp_path, capsys):
    run, data = patch_run
    other = tmp_path / "other"
    other.mkdir()
    (other / "captions.jsonl").write_text((data / "captions.jsonl").read_text())
    assert main(["eval", "--run", str(run), "--data", str(other), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "patch_features.safetensors: feature file not found" in err and "--features" in err


def test_classifier_free_guidance_without_condition_dropout_is_refused(patch_run, capsys):
    from diffcap.config import Config, ConfigError

    run, data = patch_run
    features = str(data / "patch_features.safetensors")
    assert main(["sample", "--run", str(run), "--features", features, "--ids", "100", "--guidance", "2"]) == 2
    assert "diffusion.cond_dropout=0" in capsys.readouterr().err
    assert main(["sample", "--run", str(run), "--features", features, "--ids", "100", "--guidance", "1"]) == 0
    with pytest.raises(ConfigError, match="diffusion.cond_dropout=0"):  # and before training, too
        Config.load(None, ["diffusion.cond_dropout=0", "sampler.guidance_scale=2"])
    Config.load(None, ["diffusion.cond_dropout=0.1", "sampler.guidance_scale=2"])


def test_save_pretrained_then_from_pretrained_by_hub_id_offline(patch_run, tmp_path, monkeypatch):
    import huggingface_hub

    from diffcap.data.contract import FeatureStore
    from diffcap.pipeline import CaptionPipeline
    from diffcap.training.rundir import RunDirError

    run, data = patch_run
    pipe = CaptionPipeline.from_pretrained(run)
    features = FeatureStore.open(data / "patch_features.safetensors").get(["100", "101"])
    expected = pipe(features, steps=3).texts

    # a hub cache as snapshot_download leaves it: refs/main names the snapshot folder of that commit
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-captioner"
    pipe.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    hub = CaptionPipeline.from_pretrained("someone/tiny-captioner", cache_dir=cache)
    assert hub(features, steps=3).texts == expected
    card = (hub.run_dir / "README.md").read_text()
    assert "library_name: diffcap" in card
    assert str(data / "patch_features.safetensors") in card and '"d_model": 32' in card
    with pytest.raises(RunDirError, match="someone/not-cached"):
        CaptionPipeline.from_pretrained("someone/not-cached", cache_dir=cache)


def test_a_run_directory_gets_a_model_card_with_its_evaluations(patch_run, capsys):
    run, data = patch_run
    assert main(["eval", "--run", str(run), "--data", str(data), "--split", "val"]) == 0
    card = (run / "README.md").read_text()
    metrics = json.loads((run / "eval-val" / "metrics.json").read_text())
    assert "pipeline_tag: image-to-text" in card and f"| eval-val | 6 | 3 | {metrics['BLEU-4']:.4f} |" in card
    assert f"| features | `{data / 'patch_features.safetensors'}` |" in card and "## Config" in card


def test_eval_and_sample_write_the_trajectory_report(patch_run, tmp_path):
    run, data = patch_run
    out = tmp_path / "eval"
    args = ["--run", str(run), "--steps", "3", "--report-images", "2"]
    assert main(["eval", *args, "--data", str(data), "--split", "val", "--out", str(out), "--report"]) == 0
    page = (out / "report.html").read_text()
    assert page.count('class="item"') == 2 and page.count("sampling trajectory (3 steps)") == 2
    assert CAPTIONS[0] in page and "CIDEr" in page  # references and metrics

    features = str(data / "patch_features.safetensors")
    assert main(["sample", *args, "--features", features, "--ids", "100", "--report", str(tmp_path / "s.html")]) == 0
    page = (tmp_path / "s.html").read_text()
    assert page.count("sampling trajectory (3 steps)") == 1 and "sampler.steps" in page
    assert main(["eval", *args, "--data", str(data), "--split", "val", "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "report.html").exists()


def test_reports_of_an_autoregressive_run_show_captions_without_a_trajectory(feature_data, tmp_path):
    """Left-to-right decoding has no intermediate estimates: the report lists the captions and no steps."""
    cfg = small_config(feature_data, steps=2)
    cfg.model.kind, cfg.model.d_model, cfg.model.n_layers = "autoregressive", 32, 1
    run = tmp_path / "run"
    Trainer(cfg, run).train(resume=False)
    args = ["--run", str(run), "--report-images", "2"]
    out = tmp_path / "eval"
    assert main(["eval", *args, "--data", str(feature_data), "--split", "val", "--out", str(out), "--report"]) == 0
    page = (out / "report.html").read_text()
    assert page.count('class="item"') == 2 and "sampling trajectory" not in page and "CIDEr" in page

    features = str(feature_data / "features.safetensors")
    assert main(["sample", *args, "--features", features, "--ids", "val0", "--report", str(tmp_path / "s.html")]) == 0
    page = (tmp_path / "s.html").read_text()
    assert page.count('class="item"') == 1 and "sampling trajectory" not in page


def test_token_recovery_counts_what_comes_back_from_x_t(patch_run):
    from diffcap.evaluation.diagnose import token_recovery
    from diffcap.pipeline import CaptionPipeline

    run, _ = patch_run
    pipe = CaptionPipeline.from_pretrained(run)
    ids = pipe.tokenizer.encode(CAPTIONS)
    features = torch.zeros(len(CAPTIONS), 3, 8)
    T = pipe.cfg.diffusion.num_timesteps
    # an oracle denoiser restores everything at any noise level
    oracle = lambda x_t, t, cond, self_cond: pipe.model.embedding(ids[: len(x_t)])  # noqa: E731
    pipe.model.forward = oracle
    assert {(r.tokens, r.words, r.captions) for r in token_recovery(pipe, ids, features, [0, T - 1])} == {(1, 1, 1)}
    # one that returns x_t as its x0 estimate restores the nearly clean x_0 and not the pure noise x_{T-1}
    pipe.model.forward = lambda x_t, t, cond, self_cond: x_t
    low, high = token_recovery(pipe, ids, features, [0, T - 1])
    assert low.words > 0.9 and high.words < 0.3 and high.captions == 0


def test_diagnose_writes_table_and_plot(patch_run, tmp_path, capsys):
    from PIL import Image

    run, data = patch_run
    out = tmp_path / "diag"
    assert main(["diagnose", "--run", str(run), "--data", str(data), "--points", "5", "--out", str(out)]) == 0
    result = json.loads((out / "recovery.json").read_text())
    assert [r["t"] for r in result["rows"]] == [0, 50, 100, 149, 199] and result["captions"] == 3
    assert "| 199 |" in (out / "recovery.md").read_text() and "| 199 |" in capsys.readouterr().out
    assert Image.open(out / "recovery.png").size == (640, 400)
