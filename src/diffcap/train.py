"""Training: data and model assembly from a Config, and an Accelerate-based Trainer.

The Trainer does optimisation only (device placement, mixed precision, gradient accumulation,
AdamW, warm-up + decay, EMA, clipping, checkpoint/resume, periodic validation); the losses come from
GaussianDiffusion and the captions from CaptionPipeline.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import save_model_files
from .config import Config, ConfigError, TrainConfig
from .data.contract import FeatureStore, check_ids, read_captions
from .data.datasets import CaptionPairs, SplitData, load_split
from .diffusion.diffusion import GaussianDiffusion
from .evaluate import cider
from .io import save_tensors, write_json
from .models.factory import build_model
from .pipeline import CaptionPipeline
from .text.tokenizer import CaptionTokenizer
from .trainer_state import load_optimizer, rng_state, save_optimizer, set_rng_state

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    tokenizer: CaptionTokenizer
    train: SplitData
    val: SplitData | None
    metadata: dict[str, str]


def load_training_data(cfg: Config) -> TrainingData:
    """Read the captions and feature files of ``cfg.data``, build the tokenizer on the training split,
    and fill in the condition shape of ``cfg.model`` from the feature file."""
    records = read_captions(cfg.data.captions)
    store = FeatureStore.open(cfg.data.features)
    check_ids(records, store, cfg.data.captions)
    train_captions = [r.caption for r in records if r.split == cfg.data.train_split]
    if cfg.text.tokenizer == "word_level":
        tokenizer = CaptionTokenizer.build_word_level(train_captions, min_count=cfg.text.min_count,
                                                      max_length=cfg.text.max_length)
    else:
        tokenizer = CaptionTokenizer.from_pretrained(cfg.text.tokenizer, max_length=cfg.text.max_length)
    train = load_split(records, store, tokenizer, cfg.data.train_split, cfg.data.captions)
    has_val = any(r.split == cfg.data.val_split for r in records)
    val = load_split(records, store, tokenizer, cfg.data.val_split, cfg.data.captions) if has_val else None
    if cfg.data.overfit_n:
        # Debug setting: fit N fixed examples and report on those same examples.
        train = train.subset(cfg.data.overfit_n)
        val = train
    set_condition_shape(cfg, store)
    set_encoder(cfg, store)
    return TrainingData(tokenizer, train, val, store.metadata)


def set_condition_shape(cfg: Config, store: FeatureStore) -> None:
    shape = tuple(store.item_shape)
    is_pixels = store.metadata.get("kind") == "pixels" or store.dtype == torch.uint8
    if cfg.model.image_encoder:
        if not is_pixels:
            raise ConfigError(f"model.image_encoder={cfg.model.image_encoder!r} needs raw pixel items; "
                              f"{store.path} holds {shape} {store.dtype} features")
        return
    if is_pixels:
        raise ConfigError(f"{store.path} holds raw images {shape}: set model.image_encoder=cnn")
    if len(shape) == 1:
        cfg.model.cond_tokens, cfg.model.cond_dim = 1, shape[0]
    elif len(shape) == 2:
        cfg.model.cond_tokens, cfg.model.cond_dim = shape
    else:
        raise ConfigError(f"{store.path}: feature items must be vectors (D,) or token grids (N, D), got {shape}")


def set_encoder(cfg: Config, store: FeatureStore) -> None:
    """Record in the run config which encoder made the features (unless the config names one)."""
    if not cfg.data.encoder:
        cfg.data.encoder = store.metadata.get("encoder", "")
        kind = store.metadata.get("kind", "")
        cfg.data.encoder_kind = kind if kind in ("clip-image", "clip-text", "sentence-transformers") else ""


def add_feature_noise(feats: torch.Tensor, std: float) -> torch.Tensor:
    """CapDec's noise injection (arXiv 2211.00575): training conditions only, never at sampling."""
    if std <= 0 or not feats.is_floating_point():
        return feats
    return feats + std * torch.randn_like(feats)


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then linear or cosine decay from lr to final_lr (the seed: 1e-4 -> 5e-5)."""
    floor = cfg.final_lr / cfg.lr if cfg.lr else 1.0

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        if cfg.lr_schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - floor) * progress

    return factor


def ema_avg_fn(decay: float):
    """EMA with warm-up, decay_n = min(decay, (1 + n) / (10 + n)), so short runs are not dominated by
    the random initialisation (as in diffusers' EMAModel with use_ema_warmup)."""

    def update(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():  # masks and counters are copied, not averaged
            return current.clone()
        n = float(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        return averaged + (current - averaged) * (1 - d)

    return update


class Trainer:
    def __init__(self, cfg: Config, out_dir: str | Path, data: TrainingData | None = None):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision,
                                       gradient_accumulation_steps=cfg.train.grad_accum)
        set_seed(cfg.train.seed)
        self.data = data or load_training_data(cfg)
        self.tokenizer = self.data.tokenizer
        self.model = build_model(cfg, self.tokenizer)
        self.is_diffusion = cfg.model.kind == "diffusion"
        if self.is_diffusion:
            self.model.embedding.restrict_to(self.data.train.caption_ids, always=(self.tokenizer.pad_id,))
        self.diffusion = GaussianDiffusion(cfg.diffusion).to(self.accelerator.device)
        self.ema = AveragedModel(self.model, avg_fn=ema_avg_fn(cfg.train.ema_decay), use_buffers=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.train))
        generator = torch.Generator().manual_seed(cfg.train.seed)
        loader = DataLoader(CaptionPairs(self.data.train), batch_size=cfg.train.batch_size, shuffle=True,
                            drop_last=len(self.data.train.caption_ids) >= cfg.train.batch_size, generator=generator)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(self.model, self.optimizer, loader)
        self.ema.to(self.accelerator.device)
        self.step = 0
        self.log_path = self.out_dir / "logs" / "train.jsonl"
        self.writer = None

    # ---- logging -------------------------------------------------------------------------------
    def _log(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "logs" / "tensorboard"))
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(key, value, record["step"])

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        """Write model files, then the trainer state into a fresh folder swapped in by rename."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        model = self.accelerator.unwrap_model(self.model)
        save_model_files(self.out_dir, self.cfg, model, self.tokenizer, self.ema.module.state_dict())
        tmp = self.out_dir / "trainer_state.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_optimizer(self.optimizer, tmp)
        tensors, meta = rng_state()
        save_tensors(tmp / "rng.safetensors", tensors)
        timestep_state = getattr(self.diffusion.timesteps, "state_dict", lambda: {})()
        if timestep_state:
            save_tensors(tmp / "timesteps.safetensors", timestep_state)
        save_tensors(tmp / "ema.safetensors", {"n_averaged": self.ema.n_averaged})
        write_json(tmp / "state.json", {"step": self.step, "scheduler": self.scheduler.state_dict(), "rng": meta})
        final, old = self.out_dir / "trainer_state", self.out_dir / "trainer_state.old"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> bool:
        state_dir = self.out_dir / "trainer_state"
        if not (state_dir / "state.json").exists():
            return False
        state = json.loads((state_dir / "state.json").read_text())
        model = self.accelerator.unwrap_model(self.model)
        model.load_state_dict(load_file(str(self.out_dir / "model.safetensors")))
        self.ema.module.load_state_dict(load_file(str(self.out_dir / "ema.safetensors")))
        self.ema.n_averaged.copy_(load_file(str(state_dir / "ema.safetensors"))["n_averaged"])
        load_optimizer(self.optimizer, state_dir)
        self.scheduler.load_state_dict(state["scheduler"])
        if (state_dir / "timesteps.safetensors").exists():
            self.diffusion.timesteps.load_state_dict(load_file(str(state_dir / "timesteps.safetensors")))
        set_rng_state(load_file(str(state_dir / "rng.safetensors")), state["rng"])
        self.step = state["step"]
        log.info("resumed %s at step %d", self.out_dir, self.step)
        return True

    # ---- validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        val = self.data.val
        if val is None:
            return {}
        model = self.ema.module.eval()
        device = self.accelerator.device
        record: dict = {}
        if not self.is_diffusion:
            n = min(256, len(val.caption_ids))
            with self.accelerator.autocast():
                record["val/loss"] = float(model(val.caption_ids[:n].to(device),
                                                 val.features[val.caption_image[:n]].to(device))["loss"])
        with torch.random.fork_rng(devices=[]):  # validation must not shift the training RNG stream
            torch.manual_seed(1234)
            n = min(256, len(val.caption_ids))
            ids = val.caption_ids[:n].to(device)
            feats = val.features[val.caption_image[:n]].to(device)
            T = self.diffusion.num_timesteps
            for q in range(4 if self.is_diffusion else 0):  # improved-diffusion's loss per timestep quartile
                t = torch.randint(q * T // 4, (q + 1) * T // 4, (n * self.cfg.diffusion.timesteps_per_caption,),
                                  device=device)
                with self.accelerator.autocast():
                    record[f"val/loss_q{q}"] = float(self.diffusion.training_losses(model, ids, feats, t=t)["loss"])
        images = val.image_ids[: self.cfg.train.eval_images]
        pipe = CaptionPipeline(self.cfg, model, self.tokenizer, device)
        captions = pipe(val.features[: len(images)], seed=self.cfg.sampler.seed).texts
        predictions = dict(zip(images, captions))
        record["val/CIDEr"] = cider(predictions, {i: val.references[i] for i in images})
        record["val/samples"] = [{"image_id": i, "caption": c} for i, c in list(predictions.items())[:3]]
        return record

    def _losses(self, model, ids, feats) -> dict:
        if self.is_diffusion:
            return self.diffusion.training_losses(model, ids, feats)
        return model(ids, feats)  # through forward, so DDP synchronises the gradients

    # ---- the loop ------------------------------------------------------------------------------
    def _batches(self):
        # The loader's shuffling generator starts from train.seed in every Trainer, so a resumed run
        # that skips the batches already consumed sees exactly the same order as an uninterrupted one.
        while True:
            yield from self.loader

    def train(self, resume: bool = True) -> dict:
        cfg = self.cfg.train
        if resume:
            self.resume()
        batches = self._batches()
        micro_per_step = cfg.grad_accum
        for _ in range(self.step * micro_per_step):  # skip what was already consumed
            next(batches)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.accelerator.is_main_process),
                   desc="train", dynamic_ncols=True)
        start, last = time.time(), {}
        model = self.model.train()
        while self.step < cfg.steps:
            ids, feats = next(batches)
            feats = add_feature_noise(feats, self.cfg.data.feature_noise_std)
            with self.accelerator.accumulate(model), self.accelerator.autocast():
                terms = self._losses(model, ids, feats)
                if not torch.isfinite(terms["loss"]):  # stop before the update: the last checkpoint stays good
                    raise FloatingPointError(f"non-finite loss {float(terms['loss'])} at step {self.step + 1}")
                self.accelerator.backward(terms["loss"])
                if self.accelerator.sync_gradients and cfg.grad_clip > 0:
                    self.accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            if not self.accelerator.sync_gradients:
                continue
            self.scheduler.step()
            self.ema.update_parameters(self.accelerator.unwrap_model(model))
            self.step += 1
            bar.update(1)
            last = {k: float(v.detach()) for k, v in terms.items() if v.dim() == 0}
            # the last step: the planned one, or the first past train.time_budget_s (then it saves and stops)
            done = self.step == cfg.steps or 0 < cfg.time_budget_s <= time.time() - start
            if self.step % cfg.log_every == 0 or done:
                bar.set_postfix(loss=f"{last['loss']:.3f}")
                self._log({"step": self.step, "lr": self.scheduler.get_last_lr()[0],
                           "elapsed_s": time.time() - start, **{f"train/{k}": v for k, v in last.items()}})
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or done):
                self._log({"step": self.step, **self.validate()})
                model.train()
            if self.step % cfg.save_every == 0 or done:
                self.save()
            if done:
                break
        bar.close()
        if self.writer is not None:
            self.writer.close()
        return {"steps": self.step, "train_s": time.time() - start, **last}
