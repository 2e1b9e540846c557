"""Feature stores larger than a process's memory: training reads batches on demand, with loader
workers, and two training processes on one sharded store each hold far less than the store."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import yaml
from conftest import CAPTIONS, make_feature_data, small_config
from test_multiprocess import free_port, losses
from test_resume import cli_env

from diffcap.data.contract import CaptionRecord, write_captions
from diffcap.data.store import write_store
from diffcap.training import Trainer

# VmHWM, not getrusage's ru_maxrss, which Linux carries over from the parent through fork and exec.
TRAIN_AND_REPORT_RSS = """
import sys
from pathlib import Path
from diffcap.config import Config
from diffcap.training import Trainer

Trainer(Config.load(sys.argv[1], []), sys.argv[2]).train(resume=False)
hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
print("peak_rss_bytes", int(hwm.split()[1]) * 1024)
"""


def test_loader_workers_give_the_same_training(tmp_path):
    """The sampler stays in the training process, so workers read exactly the batches it would."""
    data = make_feature_data(tmp_path / "data", n_train=16)
    curves = []
    for workers in (0, 2):
        cfg = small_config(data, steps=6)
        cfg.train.log_every, cfg.train.num_workers = 1, workers
        Trainer(cfg, tmp_path / f"w{workers}").train(resume=False)
        curves.append(losses(tmp_path / f"w{workers}"))
    assert len(curves[0]) == 6 and curves[0] == curves[1]


def test_two_processes_on_a_sharded_store_hold_less_than_it(tmp_path):
    n, grid = 10_000, (50, 768)  # CLIP ViT-B/32 patch tokens in float16: 768 MB
    items = torch.empty(n, *grid, dtype=torch.float16).uniform_(-1, 1)
    write_store(tmp_path / "store", {f"img{i:05d}": items[i] for i in range(n)}, {"kind": "clip-image"})
    del items
    store_bytes = sum(p.stat().st_size for p in (tmp_path / "store").glob("shard-*.safetensors"))
    records = [CaptionRecord(f"img{i:05d}", CAPTIONS[i % len(CAPTIONS)], "train") for i in range(n)]
    write_captions(records, tmp_path / "captions.jsonl")
    cfg = small_config(tmp_path, steps=4)
    cfg.data.features = str(tmp_path / "store")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (tmp_path / "train.py").write_text(TRAIN_AND_REPORT_RSS)

    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    out = subprocess.run(
        [*launch, "--main_process_port", str(free_port()), str(tmp_path / "train.py"), str(tmp_path / "config.yaml")]
        + [str(tmp_path / "run")],
        env=dict(cli_env(), ACCELERATE_USE_CPU="true"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    peaks = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("peak_rss_bytes")]
    assert len(peaks) == 2, out.stdout
    # Measured: 0.48 GB each on the 0.77 GB store; 1.24 GB each when the split was read up front.
    assert max(peaks) < store_bytes, (peaks, store_bytes)
    assert json.loads((tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()[-1])["step"] == 4
