"""Training throughput (captions/s) of one fixed small config at 1 and at N CPU processes.

Both runs use the same global batch (N processes x batch/N each), so they do the same work per step;
each is a real `diffcap train` (N > 1 under `accelerate launch`, gloo on the CPU). Throughput is
measured from the run's own log, between two logged steps after a warm-up, so process start-up and
the first steps are not counted:

    python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json

Prints one JSON object; writes it to --out as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from diffcap.config import Config
from diffcap.data.contract import CaptionRecord, write_captions, write_features
from diffcap.experiments.budget import logged_elapsed

SRC = Path(__file__).resolve().parents[1] / "src"  # the training processes import diffcap from this checkout

WORDS = "a the dog cat man woman child runs sits jumps on in near red blue green grass snow beach park".split()


def make_data(root: Path, n_images: int = 512, dim: int = 512, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n_images):
        for _ in range(2):
            words = torch.randint(0, len(WORDS), (int(torch.randint(5, 12, (1,), generator=g)),), generator=g)
            records.append(CaptionRecord(f"img{i}", " ".join(WORDS[w] for w in words.tolist()), "train"))
    write_captions(records, root / "captions.jsonl")
    write_features(root / "features.safetensors", {f"img{i}": torch.randn(dim, generator=g) for i in range(n_images)})


def config(root: Path, steps: int, batch: int) -> dict:
    cfg = Config()
    cfg.data.captions, cfg.data.features = str(root / "captions.jsonl"), str(root / "features.safetensors")
    cfg.text.max_length = 16
    cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.emb_dim = 128, 3, 4, 32
    cfg.diffusion.num_timesteps = 1000
    t = cfg.train
    t.steps, t.batch_size, t.warmup_steps, t.log_every = steps, batch, 10, 5
    t.eval_every, t.save_every, t.progress = 0, 10**9, False
    return cfg.to_dict()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(root: Path, processes: int, global_batch: int, steps: int, warmup: int) -> dict:
    out = root / f"run-{processes}"
    shutil.rmtree(out, ignore_errors=True)
    cfg_path = root / f"config-{processes}.yaml"
    cfg_path.write_text(yaml.safe_dump(config(root, steps, global_batch // processes)))
    train = ["-m", "diffcap.cli", "train", "--config", str(cfg_path), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p))
    env.setdefault("OMP_NUM_THREADS", "1")
    if processes == 1:
        cmd = [sys.executable, *train]
    else:
        env["ACCELERATE_USE_CPU"] = "true"  # --multi_gpu starts torchrun; this puts it on gloo/CPU
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            *train,
        ]
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    elapsed = logged_elapsed(out)
    seconds = elapsed[steps] - elapsed[warmup]
    return {
        "processes": processes,
        "per_process_batch": global_batch // processes,
        "global_batch": global_batch,
        "timed_steps": steps - warmup,
        "timed_s": round(seconds, 3),
        "captions_per_s": round((steps - warmup) * global_batch / seconds, 1),
        "wall_s_with_startup": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="logged step from which timing starts")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="diffcap-throughput-"))
    try:
        make_data(root)
        rows = [run(root, n, args.global_batch, args.steps, args.warmup) for n in args.processes]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "runs": rows,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "config": "d_model 128, 3 layers, 4 heads, emb_dim 32, max_length 16, 512-d features, 1,024 captions",
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
