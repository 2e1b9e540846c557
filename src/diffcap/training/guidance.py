"""Training a classifier-guidance model (diffcap.diffusion.guidance) against a trained diffusion run, and its files.

The run is frozen: its embeddings give x_0 and its forward process the noisy x_t the classifier learns
to score, so the classifier sees exactly what the sampler will feed it. A guidance model lives in its
own folder of the run directory (``RUN/guidance/`` by default): ``guidance.safetensors`` (weights) and
``guidance.json`` (architecture and training record).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ..data.contract import FeatureStore, read_captions
from ..data.datasets import load_split
from ..diffusion.diffusion import GaussianDiffusion
from ..diffusion.guidance import GuidanceClassifier, contrastive_loss
from ..io import save_tensors, write_json
from .rundir import RunDir, RunDirError, load_weights

log = logging.getLogger(__name__)

WEIGHTS, CONFIG = "guidance.safetensors", "guidance.json"


def save_guidance(folder: str | Path, classifier: GuidanceClassifier, record: dict | None = None) -> None:
    folder = Path(folder)
    save_tensors(folder / WEIGHTS, classifier.state_dict(), {"format": "pt"})
    write_json(folder / CONFIG, {"architecture": classifier.config, "training": record or {}})


def load_guidance(folder: str | Path, device: str | torch.device = "cpu") -> GuidanceClassifier:
    """Load ``folder``'s guidance classifier; a missing, truncated or mismatched file raises
    :class:`~diffcap.training.rundir.RunDirError` (a FileNotFoundError) naming it."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise RunDirError(
            f"{folder}: no guidance classifier ({CONFIG} and {WEIGHTS}); train one with "
            f"`diffcap train-guidance --run RUN_DIR`"
        )
    try:
        arch = json.loads((folder / CONFIG).read_text())["architecture"]
        classifier = GuidanceClassifier(**arch)
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise RunDirError(
            f"{folder / CONFIG}: not a readable guidance config "
            f"(expected {{'architecture': {{kind, emb_dim, cond_dim, seq_len, ...}}}}): {exc!r}"
        ) from exc
    weights = load_weights(folder / WEIGHTS)  # names the file if it is not readable safetensors
    try:
        classifier.load_state_dict(weights)
    except RuntimeError as exc:  # missing/unexpected keys, shape mismatch
        raise RunDirError(
            f"{folder / WEIGHTS}: does not fit the classifier described by {folder / CONFIG}: {exc}"
        ) from exc
    return classifier.to(device).eval()


def train_guidance(
    run_dir: str | Path,
    *,
    kind: str = "linear",
    steps: int = 500,
    batch_size: int = 64,
    lr: float = 1e-3,
    out: str = "guidance",
    seed: int = 0,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    time_budget_s: float = 0.0,
) -> dict:
    """Train a guidance classifier against a trained run's frozen embeddings and forward process.

    Reads the run's data files (``data.captions``/``data.features`` of its config.json) and writes
    ``RUN/<out>/``. Returns the training record (also saved in guidance.json).
    """
    run_dir = Path(run_dir)
    cfg, model, tokenizer = RunDir(run_dir).load_model()
    if not model.iterative:
        raise ValueError(
            f"{run_dir}: classifier guidance steers an iterative (diffusion) sampler; "
            f"this run decodes left to right ({cfg.model.kind!r})"
        )
    model.requires_grad_(False)
    records = read_captions(cfg.data.captions)
    store = FeatureStore.open(cfg.data.features)
    train = load_split(records, store, tokenizer, cfg.data.train_split, cfg.data.captions)
    val = (
        load_split(records, store, tokenizer, cfg.data.val_split, cfg.data.captions)
        if any(r.split == cfg.data.val_split for r in records)
        else None
    )
    diffusion = GaussianDiffusion(cfg.diffusion)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    classifier = GuidanceClassifier(
        kind=kind,
        emb_dim=model.embedding.dim,
        cond_dim=cfg.model.cond_dim,
        seq_len=cfg.text.max_length,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
    )
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr)

    def batch_of(split, idx):
        ids = split.caption_ids[idx]
        image = split.caption_image[idx]
        with torch.no_grad():
            x0 = model.embedding(ids)
            cond = model.encode_condition(split.features[image])
        t = torch.randint(0, diffusion.num_timesteps, (len(idx),), generator=generator)
        x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=generator))
        return x_t, t, cond, image

    start, losses, accs = time.time(), [], []
    n = len(train.caption_ids)
    step = 0
    for step in range(1, steps + 1):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        loss, acc = contrastive_loss(classifier, *batch_of(train, idx), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        accs.append(acc)
        if time_budget_s and time.time() - start >= time_budget_s:
            break
    tail = max(1, len(losses) // 10)
    record = {
        "kind": kind,
        "steps": step,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_s": time.time() - start,
        "train_loss": sum(losses[-tail:]) / tail,
        "train_accuracy": sum(accs[-tail:]) / tail,
    }
    if val is not None:
        classifier.eval()
        g = torch.Generator().manual_seed(1234)
        idx = torch.randperm(len(val.caption_ids), generator=g)[:256]
        with torch.no_grad():
            loss, acc = contrastive_loss(classifier, *batch_of(val, idx), generator=g)
        record |= {"val_loss": float(loss), "val_accuracy": acc}
    save_guidance(run_dir / out, classifier.eval(), record)
    log.info("guidance %s: %s", run_dir / out, record)
    return record
