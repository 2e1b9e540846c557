"""Feature stores at 1k, 10k and 100k items: open time, time to the first training batch, peak memory
of a short training run, and the loader's speed against the model's (issue 19).

    OMP_NUM_THREADS=1 python benchmarks/data_scale.py --work /tmp/diffcap_data_scale \\
        --out benchmarks/results/data_scale.json

The stores are synthetic, in the contract's sharded format (data/store.py, 4096 items per shard):
``pooled``, 512-d float32 (CLIP ViT-B/32's embedding), and ``patch``, 50 x 768 float16 (its token
grid); 100k patch items take 7.7 GB of disk. Each image has one caption of random words. Every
measurement runs in a process of its own, so its peak RSS is its own:

* ``open_s``: ``FeatureStore.open`` of the store (the OS page cache is warm: the store was just written),
  and ``id_index_mb``, the size of its id index ``ids.npy``;
* ``first_batch_s``: captions read, store opened, tokenizer built, captions tokenized, first batch out
  of the training DataLoader (``load_training_data`` + ``CaptionPairs``, as the trainer does), and
  ``load_data_s``, the part before the loader (mostly the captions: one caption per item here);
* ``loader_batches_per_s``: that DataLoader alone (batch 64, shuffled, no workers);
* ``train_steps_per_s`` and ``peak_rss_mb``: a real ``Trainer`` run of ``--steps`` steps of a small
  model (d_model 64, 2 layers, batch 64), steps/s between the 10th and the last step;
* ``eager_*`` (the reader before issue 19, where a single file is written too): safetensors
  ``load_file`` of one file of the same items plus the NaN scan, which is what ``FeatureStore.open``
  did; its time and the process's peak RSS, to compare with ``rss_after_open_mb``.

``--proxy`` instead compares, on a proxy-like run (Flickr8k-sized: 8,000 images x 5 captions, pooled
384-d, the proxy benchmark's model: d_model 256, 4 layers, batch 64), the training steps/s with the
features held in memory (as before), read from the store in the training process, and read by one
loader worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffcap.config import Config
from diffcap.data.contract import CaptionRecord, FeatureStore, write_captions
from diffcap.data.shard_file import write_features
from diffcap.data.store import shard_name, write_index

SHAPES = {"pooled": ((512,), torch.float32), "patch": ((50, 768), torch.float16)}
SHARD = 4096
WORDS = "a the dog cat man woman child runs sits jumps on in near red blue green grass snow beach park".split()


def peak_rss_mb() -> float:
    """This process's peak resident memory. Not getrusage's ru_maxrss: Linux carries that over from the
    parent through fork and exec, so a child of a process holding data would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def make_store(root: Path, kind: str, n: int, captions_per_image: int = 1, eager_file: bool = False) -> None:
    """A sharded store of ``n`` random items (and optionally the same items as one file), with captions."""
    shape, dtype = SHAPES[kind] if kind in SHAPES else ((384,), torch.float32)
    g = torch.Generator().manual_seed(0)
    folder, files, everything = root / "features", [], {}
    folder.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, n, SHARD)):
        m = min(SHARD, n - start)
        values = torch.empty(m, *shape, dtype=torch.float32).uniform_(-1, 1, generator=g).to(dtype)
        items = {f"img{start + i:06d}": values[i] for i in range(m)}
        files.append(folder / shard_name(k))
        write_features(files[-1], items, {"kind": "synthetic"})
        if eager_file:
            everything |= items
    write_index(folder, files, {"kind": "synthetic"})
    if eager_file:
        write_features(root / "features.safetensors", everything, {"kind": "synthetic"})
    rng = torch.Generator().manual_seed(1)
    records = []
    for i in range(n):
        for _ in range(captions_per_image):
            words = torch.randint(0, len(WORDS), (8,), generator=rng).tolist()
            records.append(CaptionRecord(f"img{i:06d}", " ".join(WORDS[w] for w in words), "train"))
    write_captions(records, root / "captions.jsonl")


def small_config(root: Path, steps: int, proxy: bool = False) -> Config:
    cfg = Config()
    cfg.data.captions, cfg.data.features = str(root / "captions.jsonl"), str(root / "features")
    cfg.text.max_length = 20 if proxy else 12
    m = cfg.model
    m.d_model, m.n_layers, m.n_heads, m.emb_dim = (256, 4, 4, 64) if proxy else (64, 2, 4, 16)
    t = cfg.train
    t.steps, t.batch_size, t.warmup_steps, t.log_every = steps, 64, 5, 10
    t.eval_every, t.save_every, t.progress = 0, 10**9, False
    return cfg


def logged_steps_per_s(run: Path, first: int = 10) -> float:
    rows = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "elapsed_s" in r and r["step"] >= first]
    return (rows[-1]["step"] - rows[0]["step"]) / (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"])


# ---------------------------------------------------------------- measurements, each in its own process


def measure_eager(root: Path) -> dict:
    from safetensors.torch import load_file

    from diffcap.training import Trainer  # noqa: F401  (the same modules loaded as in measure_store)

    start = time.perf_counter()
    items = load_file(str(root / "features.safetensors"))
    bad = [k for k, t in items.items() if not bool(torch.isfinite(t).all())]
    assert not bad
    return {"eager_open_s": time.perf_counter() - start, "eager_peak_rss_mb": peak_rss_mb()}


def measure_store(root: Path, steps: int) -> dict:
    from torch.utils.data import DataLoader

    from diffcap.data.datasets import CaptionPairs
    from diffcap.training import Trainer
    from diffcap.training.trainer import load_training_data

    opens = []
    for _ in range(3):
        start = time.perf_counter()
        store = FeatureStore.open(root / "features")
        opens.append(time.perf_counter() - start)
    out = {"items": len(store), "store_mb": sum(p.stat().st_size for p in (root / "features").iterdir()) / 2**20}
    out["open_s"], out["rss_after_open_mb"] = statistics.median(opens), peak_rss_mb()
    out["id_index_mb"] = (root / "features" / "ids.npy").stat().st_size / 2**20
    cfg = small_config(root, steps)
    start = time.perf_counter()
    data = load_training_data(cfg)
    out["load_data_s"] = time.perf_counter() - start
    loader = DataLoader(CaptionPairs(data.train), batch_size=64, shuffle=True)
    batches = iter(loader)
    next(batches)
    out["first_batch_s"] = time.perf_counter() - start
    start, count = time.perf_counter(), 0
    while count < 200:
        try:
            next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        count += 1
    out["loader_batches_per_s"] = count / (time.perf_counter() - start)
    Trainer(cfg, root / "run", data=data).train(resume=False)
    out["train_steps_per_s"] = logged_steps_per_s(root / "run")
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def measure_proxy(root: Path, mode: str, steps: int) -> dict:
    from diffcap.training import Trainer
    from diffcap.training.trainer import load_training_data

    cfg = small_config(root, steps, proxy=True)
    cfg.train.num_workers = 1 if mode == "store, 1 worker" else 0
    data = load_training_data(cfg)
    if mode == "in memory":
        data.train.features = data.train.features[:]  # every row read up front: the reader before issue 19
    run = root / f"run-{mode.replace(' ', '').replace(',', '-')}"
    Trainer(cfg, run, data=data).train(resume=False)
    return {"mode": mode, "train_steps_per_s": logged_steps_per_s(run), "peak_rss_mb": peak_rss_mb()}


def child(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/diffcap_data_scale"))
    p.add_argument("--out", type=Path)
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--kinds", default="pooled,patch")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--eager-max-mb", type=float, default=1000, help="skip the eager reader for larger stores")
    p.add_argument("--proxy", action="store_true", help="the loader-overhead comparison instead")
    p.add_argument("--keep", action="store_true", help="keep the stores in --work")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        what, root, *rest = args.child
        if what == "eager":
            result = measure_eager(Path(root))
        elif what == "store":
            result = measure_store(Path(root), int(rest[0]))
        else:
            result = measure_proxy(Path(root), rest[0], int(rest[1]))
        print(json.dumps(result))
        return

    rows = []
    try:
        if args.proxy:
            root = args.work / "proxy"
            make_store(root, "proxy", 8000, captions_per_image=5)
            for mode in ("in memory", "store", "store, 1 worker"):
                rows.append(child("proxy", str(root), mode, str(args.steps)))
                print(json.dumps(rows[-1]), flush=True)
        else:
            for kind in args.kinds.split(","):
                for n in map(int, args.sizes.split(",")):
                    shape, dtype = SHAPES[kind]
                    mb = n * torch.Size(shape).numel() * dtype.itemsize / 2**20
                    root = args.work / f"{kind}-{n}"
                    start = time.perf_counter()
                    make_store(root, kind, n, eager_file=mb <= args.eager_max_mb)
                    row = {"kind": kind, "n": n, "write_s": time.perf_counter() - start}
                    row |= child("store", str(root), str(args.steps))
                    if mb <= args.eager_max_mb:
                        row |= child("eager", str(root))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if not args.keep:
                        shutil.rmtree(root)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "torch": torch.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "steps": args.steps,
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
