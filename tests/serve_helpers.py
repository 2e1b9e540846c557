"""Runs and a live server for the `diffcap serve` tests: a demo-style run (its own CNN on 64x64 scene
pixels) trained for a few steps, which is all a test of the serving machinery needs."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from diffcap.cli import main
from diffcap.demo.dataset import make_demo_dataset, write_demo_dataset

TINY_MODEL = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.emb_dim=8",
    "text.max_length=12",
    "diffusion.num_timesteps=100",
    "sampler.steps=5",
    "train.steps=3",
    "train.batch_size=8",
    "train.eval_every=0",
    "train.warmup_steps=1",
    "train.progress=false",
]


def train_demo_run(root: Path, kind: str = "diffusion") -> Path:
    """Demo scenes (a few per split), then `diffcap train` of a tiny captioner with the demo's CNN."""
    paths = write_demo_dataset(root / "data", make_demo_dataset(16, 4, 6, seed=0))
    overrides = [
        f"data.captions={paths['captions']}",
        f"data.features={paths['features']}",
        "model.image_encoder=cnn",
        f"model.kind={kind}",
        *TINY_MODEL,
    ]
    if kind == "diffusion":
        overrides.append("model.self_condition=false")
    assert main(["train", "--out", str(root / "run"), *overrides]) == 0
    return root / "run"


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, *extra: str, log: Path) -> subprocess.Popen:
    """`diffcap serve` in a subprocess; returns once /api/health answers (or fails with the server's log)."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
    cmd = [sys.executable, "-m", "diffcap.cli", "serve", "--run", str(run), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"diffcap serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"diffcap serve did not answer within 120 s:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
