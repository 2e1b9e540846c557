"""Load test of `diffcap serve`: requests/s and latency from 1, 8 and 32 concurrent clients, with the
batching queue on (--max-batch 32) and off (--max-batch 1).

Bounded and local: it starts its own server on 127.0.0.1 (API only, --no-page), sends a fixed number of
requests per setting and stops the server; nothing else is contacted.

    python benchmarks/serve_load.py --run demo_out/run --out benchmarks/results/serve_load.json

Without --run it trains a throwaway run with the demo's network (`diffcap demo`'s config: its CNN, a
3-layer 128-wide denoiser, 10 DDIM steps) for a few steps on a few scenes: serving cost depends on the
network's shape and the sampling steps, not on how well it was trained. Every request sends a demo test
scene with the run's default settings, so all requests can share a batch. Prints a Markdown table and
writes the raw numbers to --out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from PIL import Image
from safetensors import safe_open

from diffcap.data.contract import read_captions

HOST = "127.0.0.1"  # the load test never leaves this machine


def demo_architecture_run(root: Path) -> Path:
    from diffcap.cli import main
    from diffcap.demo.dataset import make_demo_dataset, write_demo_dataset
    from diffcap.demo.run import DemoSize, demo_config

    paths = write_demo_dataset(root / "data", make_demo_dataset(64, 8, 16, seed=0))
    cfg = demo_config(root / "data", DemoSize(n_train=64, n_val=8, n_test=16, steps=5))
    cfg.train.eval_every, cfg.train.warmup_steps, cfg.train.progress = 0, 1, False
    cfg.save(root / "config.yaml")  # JSON is YAML: the demo's whole config as the run's settings
    assert (
        main(
            [
                "train",
                "--config",
                str(root / "config.yaml"),
                "--out",
                str(root / "run"),
                f"data.captions={paths['captions']}",
                f"data.features={paths['features']}",
            ]
        )
        == 0
    )
    return root / "run"


def test_scenes(run: Path, n: int = 8) -> list[bytes]:
    cfg = json.loads((run / "config.json").read_text())
    records = read_captions(cfg["data"]["captions"])
    ids = list(dict.fromkeys(r.image_id for r in records if r.split == "test"))[:n]
    scenes = []
    with safe_open(cfg["data"]["features"], framework="pt") as f:
        for image_id in ids:
            buf = io.BytesIO()
            Image.fromarray(f.get_tensor(image_id).permute(1, 2, 0).numpy()).save(buf, "PNG")
            scenes.append(buf.getvalue())
    return scenes


def start(run: Path, port: int, max_batch: int, max_queue: int, log: Path) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "diffcap.cli",
        "serve",
        "--run",
        str(run),
        "--host",
        HOST,
        "--port",
        str(port),
        "--no-page",
        "--max-batch",
        str(max_batch),
        "--max-queue",
        str(max_queue),
    ]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"diffcap serve exited:\n{log.read_text()}")
        try:
            httpx.get(f"http://{HOST}:{port}/api/health", timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"diffcap serve did not answer:\n{log.read_text()}")


def load(port: int, scenes: list[bytes], n_requests: int, clients: int) -> dict:
    """n_requests spread over `clients` threads, each sending its next request when the last returns."""
    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors: list[str] = []
    counter = iter(range(n_requests))
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                started = time.perf_counter()
                try:
                    r = http.post(
                        f"http://{HOST}:{port}/api/caption",
                        files={"image": ("scene.png", scenes[i % len(scenes)], "image/png")},
                    )
                    ok = r.status_code == 200
                    message = "" if ok else f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    ok, message = False, f"{type(exc).__name__}: {exc}"
                elapsed = time.perf_counter() - started
                with lock:
                    if ok:
                        latencies.append(elapsed)
                        batch_sizes.append(r.json()["batch_size"])
                    else:
                        errors.append(message)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else [0.0] * 99
    return {
        "clients": clients,
        "requests": n_requests,
        "ok": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(q[49] * 1000, 1),
        "p95_ms": round(q[94] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
        "mean_batch": round(statistics.fmean(batch_sizes), 2) if batch_sizes else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="run to serve (default: a throwaway run with the demo's network)")
    parser.add_argument("--requests", type=int, default=400, help="requests per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-batch", type=int, default=32, help="the batching queue's size when batching is on")
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--out", help="JSON file for the raw numbers")
    args = parser.parse_args()
    if args.requests < 1 or args.requests > 5000 or max(args.clients) > 256:
        raise SystemExit("keep it bounded: 1..5000 requests and at most 256 clients")

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else demo_architecture_run(Path(tmp))
        scenes = test_scenes(run)
        max_queue = max(args.clients) * 2  # above the most requests in flight: none may be refused
        rows = []
        for label, max_batch in (("on", args.max_batch), ("off", 1)):
            proc = start(run, args.port, max_batch, max_queue, Path(tmp) / f"serve_{label}.log")
            try:
                load(args.port, scenes, 20, 4)  # warm-up: first calls allocate and pick kernels
                for clients in args.clients:
                    row = {"batching": label, "max_batch": max_batch, **load(args.port, scenes, args.requests, clients)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)

    env = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "run": str(args.run or "demo network, throwaway weights"),
    }
    print("\n| batching | clients | requests/s | p50 ms | p95 ms | p99 ms | mean batch | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['batching']} | {r['clients']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
            f"{r['p99_ms']} | {r['mean_batch']} | {r['errors']} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
