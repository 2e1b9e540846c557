"""The command line end to end: train a few steps, sample, eval; and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys

from diffcap.cli import main


def test_train_sample_eval_smoke(feature_data, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"data:\n  captions: {feature_data / 'captions.jsonl'}\n  features: {feature_data / 'features.safetensors'}\n"
        "model:\n  d_model: 32\n  n_layers: 1\n  n_heads: 2\n  emb_dim: 8\n"
        "diffusion:\n  num_timesteps: 100\ntrain:\n  batch_size: 4\n  progress: false\n"
    )
    assert main(["train", "--config", str(cfg), "--out", str(run), "train.steps=4", "train.eval_every=4"]) == 0
    assert {"config.json", "model.safetensors", "ema.safetensors", "tokenizer", "checkpoints", "README.md"} <= {
        p.name for p in run.iterdir()
    }
    capsys.readouterr()

    assert (
        main(
            [
                "sample",
                "--run",
                str(run),
                "--features",
                str(feature_data / "features.safetensors"),
                "--ids",
                "val0",
                "val1",
                "--steps",
                "5",
                "--out",
                str(tmp_path / "res.json"),
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["val0", "val1"]
    assert [r["image_id"] for r in json.loads((tmp_path / "res.json").read_text())] == ["val0", "val1"]

    assert main(["eval", "--run", str(run), "--data", str(feature_data), "--split", "val", "--steps", "5"]) == 0
    metrics = json.loads((run / "eval-val" / "metrics.json").read_text())
    assert {"BLEU-4", "METEOR", "ROUGE_L", "CIDEr"} <= set(metrics) and metrics["n_images"] == 4
    assert len(json.loads((run / "eval-val" / "results.json").read_text())) == 4
    assert f"| eval-val | 4 | 4 | {metrics['BLEU-4']:.4f} |" in (run / "README.md").read_text()  # the model card


def test_clear_errors(feature_data, tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "train.epochs=3"]) == 2
    assert "unknown config key 'train.epochs'" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), f"data.captions={tmp_path / 'nope.jsonl'}"]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert main(["sample", "--run", str(tmp_path / "norun"), "--features", "x.safetensors"]) == 2
    assert "norun" in capsys.readouterr().err


def test_feature_width_mismatch_is_reported(feature_data, tmp_path, capsys):
    from conftest import make_feature_data, small_config

    from diffcap.training import Trainer

    Trainer(small_config(feature_data, steps=2), tmp_path / "run").train(resume=False)
    wide = make_feature_data(tmp_path / "wide", dim=24)
    assert main(["sample", "--run", str(tmp_path / "run"), "--features", str(wide / "features.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "(24,)" in err and "(16,)" in err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "diffcap.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "train" in out.stdout


def test_every_sampler_setting_has_a_flag():
    import dataclasses

    from diffcap.cli import _sampler_overrides, build_parser
    from diffcap.config import SamplerConfig

    args = build_parser().parse_args(
        [
            "sample",
            "--run",
            "r",
            "--features",
            "f",
            "--steps",
            "7",
            "--no-clamp",
            "--guidance",
            "2",
            "--beam",
            "3",
            "--length",
            "expected",
            "--seed",
            "5",
        ]
    )
    assert _sampler_overrides(args) == {
        "steps": 7,
        "clamp": False,
        "guidance_scale": 2.0,
        "beam_size": 3,
        "length": "expected",
        "seed": 5,
    }
    names = {a.dest for a in build_parser()._subparsers._group_actions[0].choices["eval"]._actions}
    assert {f.name for f in dataclasses.fields(SamplerConfig)} <= names
