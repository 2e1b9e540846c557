"""`accelerate launch` with 2 CPU processes (gloo), batch B each, trains like 1 process with batch 2B.

What makes the curves equal (see training/trainer.py and diffusion/noise.py): Accelerate deals consecutive
batches of one shuffled order to the processes, so each step sees the same 2B captions; the noise,
timesteps and condition-dropout masks of the diffusion loss (and CapDec's noise on the conditions) come
from a generator keyed on (seed, step) for the whole global batch, each process keeping its rows; DDP
averages the gradients of equal-sized shards; logged losses are averaged over the processes.

The one setting the promise leaves out, as the README says, is the network's own dropout
(model.dropout): torch's dropout layers draw their masks from each process's generator, so with it the
processes train on another random draw than one process would. The tests use the default settings
otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from conftest import make_feature_data, small_config
from safetensors.torch import load_file
from test_resume import cli_env, tensors_equal

from diffcap.config import Config
from diffcap.diffusion.noise import StepNoise
from diffcap.training import Trainer
from diffcap.training.rundir import RunDir
from diffcap.training.trainer import add_feature_noise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run) -> list[float]:
    lines = (run / "logs" / "train.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines if "train/loss" in line]


def launch(config: Path, out: Path) -> list[str]:
    """`accelerate launch` of `diffcap train` on 2 CPU processes. On a machine without GPUs,
    --multi_gpu starts the processes with torchrun and ACCELERATE_USE_CPU (in :func:`env`) makes each
    one join a gloo process group on the CPU."""
    return [
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
        "-m",
        "diffcap.cli",
        "train",
        "--config",
        str(config),
        "--out",
        str(out),
    ]


def env() -> dict[str, str]:
    return dict(cli_env(), ACCELERATE_USE_CPU="true")


def default_config(data: Path, steps: int, per_process: int):
    """The tests' small model with the default randomness, except the network's dropout (see above)."""
    cfg = small_config(data, steps=steps)
    cfg.diffusion.cond_dropout = Config().diffusion.cond_dropout
    cfg.model.dropout = 0.0
    cfg.data.feature_noise_std = 0.1  # CapDec's noise on the conditions: keyed per example too
    cfg.train.log_every, cfg.train.batch_size, cfg.train.warmup_steps = 1, per_process, 2
    return cfg


def test_two_processes_match_one_with_double_batch_and_resume_exactly(tmp_path):
    """2 processes of batch 2 against 1 of batch 4; then the same 2-process run killed (every process,
    SIGKILL) once a checkpoint exists and rerun ends bit-identical. 14 captions in global batches of 4
    make passes of 3 steps (drop_last), which accumulations of 2 do not divide."""
    steps, per_process = 24, 2
    cfg = default_config(make_feature_data(tmp_path / "data", n_train=14), steps, per_process)
    cfg.train.grad_accum, cfg.train.save_every, cfg.train.keep_checkpoints = 2, 4, 2
    assert cfg.diffusion.cond_dropout > 0
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    out = subprocess.run(launch(config, tmp_path / "two"), env=env(), capture_output=True, text=True, timeout=180)
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
        # atol: Adam turns rounding differences (batch 2 vs 4 matmuls) in near-zero gradients into
        # ~1e-5 steps on a few weights near 0, which 24 steps add up; the per-step losses agree to 1e-5
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4)

    run = tmp_path / "killed"
    # its own session, so that one signal reaches the launcher and both training processes
    proc = subprocess.Popen(
        launch(config, run), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 120
    while not RunDir(run).checkpoints() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert RunDir(run).checkpoints()[-1][0] < steps
    resumed = subprocess.run(launch(config, run), env=env(), capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("model.safetensors", "ema.safetensors"):
        tensors_equal(run / name, tmp_path / "two" / name)
    assert losses(run) == two


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
