"""`diffcap demo`: synthetic scenes -> jointly trained CNN + diffusion captioner -> metrics and report.

Everything runs offline on a CPU: no pretrained image encoder can be installed here, so the demo brings
its own images (diffcap.demo.dataset) and learns its own encoder.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, apply_override, validate
from ..data.contract import FeatureStore
from ..evaluation.metrics import coco_metrics, write_coco_results
from ..evaluation.report import write_report
from ..io import write_json
from ..pipeline import CaptionPipeline
from ..training import Trainer
from .dataset import make_demo_dataset, write_demo_dataset
from .scenes import load_scenes
from .scoring import attribute_accuracy

log = logging.getLogger(__name__)


@dataclass
class DemoSize:
    # Many training scenes: with few, the encoder memorises them and names held-out colour-shape pairs
    # by a seen partner (BENCHMARKS.md, demo ablations). Generating them takes seconds.
    n_train: int = 20000
    n_val: int = 200
    n_test: int = 300
    steps: int = 2400
    report_images: int = 40


QUICK = DemoSize(n_train=200, n_val=20, n_test=24, steps=30, report_images=6)


def demo_config(data_dir: Path, size: DemoSize) -> Config:
    cfg = Config()
    cfg.data.captions = str(data_dir / "captions.jsonl")
    cfg.data.features = str(data_dir / "features.safetensors")
    cfg.text.max_length = 16
    m = cfg.model
    m.image_encoder, m.fusion = "cnn", "concat"
    m.d_model, m.n_layers, m.n_heads, m.emb_dim, m.dropout = 128, 3, 4, 16, 0.0
    # Settings measured on this demo (BENCHMARKS.md, "demo ablations"): the image encoder learns only
    # from high-noise timesteps, so three noise levels per image (one CNN pass) and warped timestep
    # sampling feed it more signal per step; self-conditioning gave nothing measurable here and costs
    # a forward pass.
    m.self_condition = False
    d = cfg.diffusion
    d.num_timesteps, d.schedule, d.objective = 1000, "sqrt", "x0"
    d.timesteps_per_caption, d.timestep_sampler, d.rounding_weight = 3, "warped", 1.0
    t = cfg.train
    t.steps, t.batch_size, t.lr, t.final_lr, t.warmup_steps = size.steps, 64, 1e-3, 1e-4, 200
    t.eval_every, t.save_every, t.eval_images, t.ema_decay = max(size.steps // 4, 1), size.steps, 50, 0.995
    cfg.sampler.steps = 10
    validate(cfg)
    return cfg


def run_demo(
    out_dir: str | Path = "demo_out", size: DemoSize = DemoSize(), seed: int = 0, overrides: list[str] = ()
) -> dict:
    """Generate data, train, evaluate on the test split, write metrics.json and report.html."""

    out = Path(out_dir)
    started = time.time()
    data = make_demo_dataset(size.n_train, size.n_val, size.n_test, seed)
    paths = write_demo_dataset(out / "data", data)
    cfg = demo_config(out / "data", size)
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    # The demo owns its output folder: a rerun replaces the earlier run instead of keeping its checkpoints.
    shutil.rmtree(out / "run", ignore_errors=True)
    train_stats = Trainer(cfg, out / "run").train(resume=False)

    pipe = CaptionPipeline.from_pretrained(out / "run")
    store = FeatureStore.open(paths["features"])
    scenes = load_scenes(paths["scenes"])
    test_ids = [i for i, s in scenes.items() if s.split == "test"]
    result = pipe(store.get(test_ids), trajectory=True)
    predictions = dict(zip(test_ids, result.texts))
    references = data.references()
    metrics = coco_metrics(predictions, {i: references[i] for i in test_ids})
    metrics.update(attribute_accuracy(predictions, {i: scenes[i] for i in test_ids}))
    metrics.update(
        train_steps=train_stats["steps"],
        train_s=round(train_stats["train_s"], 1),
        total_s=round(time.time() - started, 1),
        sampler=f"{cfg.sampler.method}-{cfg.sampler.steps}",
    )
    write_json(out / "metrics.json", metrics)
    write_coco_results(out / "test_results.json", predictions)
    items = [
        {
            "image_id": i,
            "image": data.images[i],
            "caption": predictions[i],
            "references": references[i],
            "trajectory": [(f"t={t}", text) for t, text in traj],
        }
        for i, traj in list(zip(test_ids, result.trajectories or [[]] * len(test_ids)))[: size.report_images]
    ]
    write_report(out / "report.html", items, metrics, title="diffcap demo: synthetic scenes, test split")
    log.info("demo metrics: %s", json.dumps(metrics))
    return metrics
