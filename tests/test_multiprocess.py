"""`accelerate launch` with 2 CPU processes (gloo), batch B each, trains like 1 process with batch 2B.

What makes the curves equal (see training/trainer.py and diffusion/noise.py): Accelerate deals consecutive
batches of one shuffled order to the processes, so each step sees the same 2B captions; the noise,
timesteps and dropout masks of the diffusion loss (and CapDec's noise on the conditions) come from a
generator keyed on (seed, step) for the whole global batch, each process keeping its rows; DDP averages
the gradients of equal-sized shards; logged losses are averaged over the processes; model dropout is 0
(it draws from each process's RNG).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import torch
import yaml
from conftest import make_feature_data, small_config
from safetensors.torch import load_file
from test_resume import cli_env

from diffcap.diffusion.noise import StepNoise
from diffcap.training import Trainer
from diffcap.training.trainer import add_feature_noise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run) -> list[float]:
    lines = (run / "logs" / "train.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]


def test_two_processes_match_one_with_double_batch(tmp_path):
    data = make_feature_data(tmp_path / "data", n_train=16)
    steps, per_process = 8, 4
    cfg = small_config(data, steps=steps)
    cfg.train.log_every, cfg.train.batch_size, cfg.train.warmup_steps = 1, per_process, 2
    cfg.data.feature_noise_std = 0.1  # CapDec's noise on the conditions: keyed per example too
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))

    # On a machine without GPUs, --multi_gpu starts the processes with torchrun and
    # ACCELERATE_USE_CPU makes each one join a gloo process group on the CPU.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    out = subprocess.run(
        [*launch, "-m", "diffcap.cli", "train", "--config", str(config), "--out", str(tmp_path / "two")],
        env=dict(cli_env(), ACCELERATE_USE_CPU="true"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert len([line for line in out.stdout.splitlines() if line.startswith("{")]) == 2  # both processes ran

    cfg.train.batch_size = 2 * per_process
    Trainer(cfg, tmp_path / "one").train(resume=False)

    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert len(two) == len(one) == steps  # one log line per step: only the main process writes
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-5, atol=1e-5)
    assert len(set(one)) > 1  # the curve moves, so equality is not trivial
    a, b = (
        load_file(str(tmp_path / "two" / "model.safetensors")),
        load_file(str(tmp_path / "one" / "model.safetensors")),
    )
    for name in b:
        # atol: Adam turns rounding differences (batch 4 vs 8 matmuls) in near-zero gradients into
        # ~1e-5 steps on a few weights near 0; the per-step losses above agree to 1e-5
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5)


def test_feature_noise_depends_on_the_global_position_only():
    feats = torch.zeros(8, 3)
    one = add_feature_noise(feats, 0.5, lambda: StepNoise(7, 3, k=2, batch=8))
    shards = [
        add_feature_noise(feats[r * 4 : (r + 1) * 4], 0.5, lambda r=r: StepNoise(7, 3, k=2, batch=4, rank=r, world=2))
        for r in range(2)
    ]
    assert torch.equal(torch.cat(shards), one) and one.std() > 0.1
    assert not torch.equal(one, add_feature_noise(feats, 0.5, lambda: StepNoise(7, 4, k=2, batch=8)))  # per step
    # drawn from its own stream: the step's diffusion draws are the same with or without it
    noise = StepNoise(7, 3, k=2, batch=8)
    noise.example_randn(3)
    assert torch.equal(noise.randn(5), StepNoise(7, 3, k=2, batch=8).randn(5))


def test_no_feature_noise_draws_nothing():
    state = torch.get_rng_state()
    feats = torch.ones(4, 3)

    def never():
        raise AssertionError("no StepNoise is needed when std is 0")

    assert add_feature_noise(feats, 0.0, never) is feats
    add_feature_noise(feats, 0.3, lambda: StepNoise(0, 0, k=1, batch=4))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never used
