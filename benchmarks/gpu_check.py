"""What only a GPU can show: mixed-precision training, resume on the GPU, batched sampling speed, and the
proxy benchmark with training at full speed.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json [--flickr8k ~/data/flickr8k]

1. bf16 and fp16 training (Accelerate's mixed precision): captions/s between two logged steps after a
   warm-up, and whether every logged loss is finite (fp16 needs the gradient scaler to stay finite);
2. resume: a run stopped half-way and resumed in a new process (two processes under `accelerate launch`
   when two GPUs are visible) against the same run trained straight through: the largest weight
   difference (0 on the CPU; cuDNN/cuBLAS kernels that are not deterministic can leave ~1e-6);
3. sampling: captions/s of one batch of 64 through CaptionPipeline, fp32 and bf16, at 10 and 20 steps;
4. with --flickr8k: benchmarks/flickr8k_proxy.py on the dev split, whose training then runs on the GPU.

Without a GPU it exits at once with a message saying so. ``--smoke`` runs tiny sizes on whatever device
there is (the CPU included), to check the script itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import SRC, free_port, make_data  # noqa: E402

from diffcap.config import Config  # noqa: E402
from diffcap.experiments.budget import logged_elapsed  # noqa: E402

NO_GPU = (
    "gpu_check: no CUDA GPU is visible here (torch {torch}, torch.cuda.is_available() is False), so nothing "
    "was measured. Run it on a machine with an NVIDIA GPU and a CUDA build of torch (or pass --smoke to "
    "check the script itself on this device)."
)


def write_config(root: Path, name: str, steps: int, batch: int, smoke: bool, **train) -> Path:
    cfg = Config()
    cfg.data.captions, cfg.data.features = str(root / "captions.jsonl"), str(root / "features.safetensors")
    cfg.text.max_length = 16
    m = cfg.model
    m.d_model, m.n_layers, m.n_heads, m.emb_dim = (32, 1, 2, 8) if smoke else (256, 4, 4, 64)
    cfg.diffusion.num_timesteps = 1000
    t = cfg.train
    t.steps, t.batch_size, t.warmup_steps, t.log_every = steps, batch, 2, max(steps // 10, 1)
    t.eval_every, t.save_every, t.progress = 0, 10**9, False
    for key, value in train.items():
        setattr(t, key, value)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def train(config: Path, out: Path, *overrides: str, processes: int = 1) -> float:
    """`diffcap train` in a new process (under `accelerate launch` for several); returns the wall time."""
    cmd = ["-m", "diffcap.cli", "train", "--config", str(config), "--out", str(out), *overrides]
    if processes > 1:
        launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
        cmd = [*launch, "--num_machines", "1", "--main_process_port", str(free_port()), *cmd]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p))
    start = time.time()
    done = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return time.time() - start


def check_precision(root: Path, precision: str, steps: int, batch: int, smoke: bool) -> dict:
    run = root / f"run-{precision}"
    wall = train(write_config(root, precision, steps, batch, smoke, mixed_precision=precision), run)
    records = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    elapsed = logged_elapsed(run)
    first, last = sorted(elapsed)[1], max(elapsed)  # from the second logged step: no start-up, no compile
    return {
        "precision": precision,
        "captions_per_s": round((last - first) * batch / (elapsed[last] - elapsed[first]), 1),
        "losses_finite": all(map(math.isfinite, losses)),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "wall_s": round(wall, 1),
    }


def check_resume(root: Path, steps: int, batch: int, smoke: bool, processes: int) -> dict:
    """Straight through vs stopped at steps/2 and resumed in a new process; a constant learning rate after
    warm-up, so that the stopped run's shorter train.steps leaves its schedule the same."""
    half = steps // 2
    config = write_config(root, "resume", steps, batch // processes, smoke, lr_schedule="constant", save_every=half)
    train(config, root / "straight", processes=processes)
    train(config, root / "resumed", f"train.steps={half}", processes=processes)
    train(config, root / "resumed", processes=processes)
    a, b = (
        load_file(str(root / "straight" / "model.safetensors")),
        load_file(str(root / "resumed" / "model.safetensors")),
    )
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    return {"processes": processes, "steps": steps, "resumed_at": half, "max_abs_weight_diff": diff}


def check_sampling(run: Path, device: str, batch: int = 64) -> list[dict]:
    from diffcap.experiments.timing import throughput
    from diffcap.pipeline import CaptionPipeline

    pipe = CaptionPipeline.from_pretrained(run, device=device)
    features = torch.randn(batch, *pipe.feature_shape)
    rows = []
    for precision in ("fp32", "bf16"):
        for steps in (10, 20):
            speed = throughput(pipe, features, batch, steps=steps, precision=precision)
            rows.append({"precision": precision, "steps": steps, "batch": batch, **speed})
    return rows


def check_proxy(flickr8k: Path, out_dir: Path, budget_min: float) -> dict:
    script = Path(__file__).resolve().parent / "flickr8k_proxy.py"
    out = out_dir / "gpu_proxy.json"
    cmd = [sys.executable, str(script), "--data", str(flickr8k), "--split", "dev", "--out", str(out)]
    start = time.time()
    done = subprocess.run([*cmd, "--budget-min", str(budget_min)], capture_output=True, text=True)
    return {"returncode": done.returncode, "wall_s": round(time.time() - start, 1), "results": str(out)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the results JSON here")
    p.add_argument("--flickr8k", type=Path, help="Flickr8k folder: also run the proxy benchmark")
    p.add_argument("--proxy-budget-min", type=float, default=12.0, help="training minutes per proxy model")
    p.add_argument("--steps", type=int, default=300, help="training steps of each check")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device, to test this script")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and not args.smoke:
        print(NO_GPU.format(torch=torch.__version__), file=sys.stderr)
        return 2
    steps, batch = (6, 8) if args.smoke else (args.steps, args.batch)
    precisions = ["bf16"]  # the CPU has no fp16 autocast for training
    if gpu:
        precisions = ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    result: dict = {
        "device": torch.cuda.get_device_name(0) if gpu else platform.processor() or platform.machine(),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "smoke": args.smoke,
    }
    with tempfile.TemporaryDirectory(prefix="diffcap-gpu-check-") as tmp:
        root = Path(tmp)
        make_data(root, n_images=64 if args.smoke else 2048, dim=16 if args.smoke else 512)
        result["training"] = [check_precision(root, mp, steps, batch, args.smoke) for mp in precisions]
        result["resume"] = check_resume(root, steps, batch, args.smoke, processes=min(2, max(1, result["gpus"])))
        device = "cuda" if gpu else "cpu"
        result["sampling"] = check_sampling(root / "straight", device, batch=8 if args.smoke else 64)
    if args.flickr8k:
        result["proxy"] = check_proxy(args.flickr8k, (args.out or Path("gpu_check.json")).parent, args.proxy_budget_min)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
