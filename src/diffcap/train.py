"""Training: data and model assembly from a Config, and an Accelerate-based Trainer.

The Trainer does optimisation only (device placement, mixed precision, gradient accumulation,
AdamW, warm-up + decay, EMA, clipping, checkpoint/resume, periodic validation); the losses come from
GaussianDiffusion and the captions from CaptionPipeline.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from safetensors import SafetensorError
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import RunDirError, check_shapes, load_weights, save_model_files
from .checkpoints import (
    CHECKPOINTS, checkpoint_path, list_checkpoints, prune, publish, remove_partial_checkpoints, write_checkpoint,
)
from .config import Config, ConfigError, TrainConfig
from .data.contract import DataError, FeatureStore, check_ids, describe_ids, read_captions
from .data.datasets import CaptionPairs, SplitData, load_split
from .diffusion.diffusion import GaussianDiffusion
from .diffusion.noise import StepNoise
from .evaluation.metrics import cider
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
    captioned = {r.image_id for r in records}
    if unused := [i for i in store.ids if i not in captioned]:
        log.warning("%s: %s have features but no captions in %s; they are not used",
                    store.path, describe_ids(unused), cfg.data.captions)
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


def add_feature_noise(feats: torch.Tensor, std: float, noise: Callable[[], StepNoise]) -> torch.Tensor:
    """CapDec's noise injection (arXiv 2211.00575): training conditions only, never at sampling.

    The noise comes from the step's :class:`StepNoise` (``noise()`` makes it), so an example's noise
    depends only on (seed, step, its position in the global batch), whatever the number of
    processes. With ``std`` 0 nothing is drawn."""
    if std <= 0 or not feats.is_floating_point():
        return feats
    return feats + std * noise().example_randn(*feats.shape[1:]).to(feats.device, feats.dtype)


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


# What makes a checkpoint unreadable (then the one before it is tried); a checkpoint that does not
# fit the model (ConfigError, DataError) is not among them: an older one would not fit either.
_UNREADABLE = (RunDirError, SafetensorError, OSError, KeyError, json.JSONDecodeError)


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
        # The fused kernel updates all parameters in one pass: 6 ms instead of 38 ms per step for the
        # proxy's 13M parameters on the CPU (PyTorch has it for CPU and CUDA since 2.4).
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.train))
        generator = torch.Generator().manual_seed(cfg.train.seed)
        # Each process gets batch_size captions; Accelerate deals consecutive batches of one shuffled
        # order to the processes, so N processes see the same global batches as one with N x batch_size
        # (drop_last by the global batch keeps every step's batches complete and equal).
        global_batch = cfg.train.batch_size * self.accelerator.num_processes
        loader = DataLoader(CaptionPairs(self.data.train), batch_size=cfg.train.batch_size, shuffle=True,
                            drop_last=len(self.data.train.caption_ids) >= global_batch, generator=generator)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(self.model, self.optimizer, loader)
        self.ema.to(self.accelerator.device)
        self.step = 0
        self.log_path = self.out_dir / "logs" / "train.jsonl"
        self.writer = None
        self.last_checkpoint: tuple[int, Path] | None = None  # (step, folder) resumed from or last written
        self.resumed_at: int | None = None  # the step resume() restored, if it did

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
    def _write_checkpoint(self, folder: Path) -> None:
        model = self.accelerator.unwrap_model(self.model)
        save_model_files(folder, self.cfg, model, self.tokenizer, self.ema.module.state_dict())
        state_dir = folder / "trainer_state"
        state_dir.mkdir()
        save_optimizer(self.optimizer, state_dir)
        tensors, meta = rng_state()
        save_tensors(state_dir / "rng.safetensors", tensors)
        timestep_state = getattr(self.diffusion.timesteps, "state_dict", lambda: {})()
        if timestep_state:
            save_tensors(state_dir / "timesteps.safetensors", timestep_state)
        save_tensors(state_dir / "ema.safetensors", {"n_averaged": self.ema.n_averaged})
        write_json(state_dir / "state.json", {"step": self.step, "scheduler": self.scheduler.state_dict(), "rng": meta})

    def save(self) -> None:
        """Write checkpoints/step-N (complete before it is visible), publish its model files to the
        top of the run directory for CaptionPipeline, and keep only the newest train.keep_checkpoints."""
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = (self.step, checkpoint_path(self.out_dir, self.step))
        if not self.accelerator.is_main_process:
            return
        remove_partial_checkpoints(self.out_dir)
        folder = write_checkpoint(self.out_dir, self.step, self._write_checkpoint)
        publish(self.out_dir, folder)
        prune(self.out_dir, self.cfg.train.keep_checkpoints)

    def resume(self) -> bool:
        """Restore the newest complete checkpoint; an unreadable one (e.g. a truncated file) is
        reported and the one before it used, and once that one has loaded the unreadable ones are
        renamed aside to ``checkpoints/unreadable-step-N`` (so they neither count among the
        checkpoints kept nor pass for the newest). False if the run directory has no checkpoint."""
        if self.accelerator.is_main_process:
            for p in remove_partial_checkpoints(self.out_dir):
                log.warning("%s: removed what an interrupted save left behind", p)
        candidates = [p for _, p in reversed(list_checkpoints(self.out_dir))]
        if not candidates and (self.out_dir / "trainer_state" / "state.json").exists():
            candidates = [self.out_dir]  # the layout before checkpoints/: model files + trainer_state/ on top
        if not candidates:
            return False
        self._check_fits(candidates[0])
        problems, unreadable = [], []
        for folder in candidates:
            try:
                self._load_checkpoint(folder)
            except _UNREADABLE as exc:
                log.warning("%s: unreadable checkpoint, trying the one before (%s)", folder, exc)
                problems.append(f"{folder}: {exc}")
                unreadable.append(folder)
                continue
            # Every process has read what it needs before the main process moves anything.
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                for bad in unreadable:
                    if bad != self.out_dir:
                        self._set_aside(bad)
                if folder != self.out_dir:
                    publish(self.out_dir, folder)  # repairs a publish cut short by a kill
            self.last_checkpoint = (self.step, folder)
            self.resumed_at = self.step
            log.info("resumed %s at step %d from %s", self.out_dir, self.step, folder)
            return True
        raise RunDirError(f"{self.out_dir}: no readable checkpoint ({'; '.join(problems)}); "
                          "pass --no-resume to start over")

    def _set_aside_old_checkpoints(self) -> None:
        """Starting over in a run directory that holds another run's checkpoints: move them aside
        rather than delete them, and so that pruning and a later resume see only this run's."""
        old = self.out_dir / CHECKPOINTS
        if not self.accelerator.is_main_process or not old.is_dir() or not any(old.iterdir()):
            return
        aside = self.out_dir / f"{CHECKPOINTS}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        old.rename(aside)
        (self.out_dir / "checkpoint.json").unlink(missing_ok=True)
        log.warning("%s: starting over; the earlier run's checkpoints were moved to %s", self.out_dir, aside)

    @staticmethod
    def _set_aside(folder: Path) -> Path:
        """Rename an unreadable checkpoint to ``unreadable-step-N`` (not listed, never pruned)."""
        target = folder.with_name(f"unreadable-{folder.name}")
        n = 1
        while target.exists():
            n += 1
            target = folder.with_name(f"unreadable-{folder.name}-{n}")
        folder.rename(target)
        log.warning("%s: unreadable checkpoint renamed to %s (inspect or delete it)", folder, target)
        return target

    def _check_fits(self, folder: Path) -> None:
        """The run's features must have the shape the checkpoint was trained on: say so before
        anything trains, naming both files, instead of a size-mismatch error from torch."""
        try:
            saved = json.loads((folder / "config.json").read_text())["model"]
        except (OSError, ValueError, KeyError):
            return  # an unreadable checkpoint is reported when it is loaded
        m = self.cfg.model
        old, new = (saved.get("cond_tokens"), saved.get("cond_dim")), (m.cond_tokens, m.cond_dim)
        if old != new:
            raise DataError(f"{self.cfg.data.features}: features of {new[0]} token(s) x {new[1]} do not fit the run "
                            f"{self.out_dir}, trained on {old[0]} token(s) x {old[1]} ({folder / 'config.json'}); "
                            "use the same feature extractor, or a new --out")

    def _load_checkpoint(self, folder: Path) -> None:
        # Read and check everything first, so that an unreadable file changes nothing.
        state_dir = folder / "trainer_state"
        state = json.loads((state_dir / "state.json").read_text())
        model = self.accelerator.unwrap_model(self.model)
        weights = load_weights(folder / "model.safetensors")
        ema_weights = load_weights(folder / "ema.safetensors")
        check_shapes(folder / "model.safetensors", weights, model.state_dict())
        n_averaged = load_weights(state_dir / "ema.safetensors")["n_averaged"]
        timesteps = state_dir / "timesteps.safetensors"
        timestep_state = load_weights(timesteps) if timesteps.exists() else None
        rng = load_weights(state_dir / "rng.safetensors")
        load_optimizer(self.optimizer, state_dir)
        model.load_state_dict(weights)
        self.ema.module.load_state_dict(ema_weights)
        self.ema.n_averaged.copy_(n_averaged)
        self.scheduler.load_state_dict(state["scheduler"])
        if timestep_state is not None:
            self.diffusion.timesteps.load_state_dict(timestep_state)
        set_rng_state(rng, state["rng"])
        self.step = state["step"]

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

    def _step_noise(self, ids: torch.Tensor, micro: int) -> StepNoise:
        """The random draws of micro-batch ``micro`` (see diffusion/noise.py)."""
        acc = self.accelerator
        return StepNoise(self.cfg.train.seed, micro, k=self.cfg.diffusion.timesteps_per_caption,
                         batch=ids.shape[0], rank=acc.process_index, world=acc.num_processes,
                         device=ids.device, gather=acc.gather)

    def _losses(self, model, ids, feats, micro: int) -> dict:
        if self.is_diffusion:
            return self.diffusion.training_losses(model, ids, feats, noise=self._step_noise(ids, micro))
        return model(ids, feats)  # through forward, so DDP synchronises the gradients

    def _scalars(self, terms: dict, index: torch.Tensor) -> dict[str, float]:
        """The scalar terms averaged over processes (one all-reduce per step, which also tells every
        process whether any loss is non-finite). Raises before the update if one is."""
        names = [k for k, v in terms.items() if v.dim() == 0]
        values = torch.stack([(~torch.isfinite(terms["loss"].detach())).float()]
                             + [terms[k].detach().float() for k in names])
        world = self.accelerator.num_processes
        if world > 1:
            values = self.accelerator.reduce(values, "sum")
        if values[0] > 0:
            self._raise_non_finite(terms, index)
        return {k: float(v) / world for k, v in zip(names, values[1:])}

    def _raise_non_finite(self, terms: dict, index: torch.Tensor) -> None:
        local = index.tolist()
        culprits: list[int] = []
        if not torch.isfinite(terms["loss"]):
            culprits = local
            per = terms.get("per_sample")
            if per is not None and per.numel() % len(local) == 0:  # [K*B]: name the captions themselves
                rows = (~torch.isfinite(per.detach().view(-1, len(local)))).any(0)
                culprits = [local[i] for i in rows.nonzero().flatten().tolist()] or local
        train = self.data.train
        images = [train.image_ids[int(train.caption_image[i])] for i in culprits]
        if self.accelerator.num_processes > 1:
            images = gather_object(images)
        images = list(dict.fromkeys(images))
        kept = (f"the checkpoint of step {self.last_checkpoint[0]} is intact ({self.last_checkpoint[1]})"
                if self.last_checkpoint is not None else "no checkpoint was written yet")
        raise FloatingPointError(
            f"non-finite loss at step {self.step + 1} (batch of {len(local) * self.accelerator.num_processes} "
            f"captions from {self.cfg.data.captions}); non-finite for image {describe_ids(images)}; "
            f"stopped before the update, {kept}")

    # ---- the loop ------------------------------------------------------------------------------
    def _batches(self):
        # The loader's shuffling generator starts from train.seed in every Trainer, so a resumed run
        # that skips the batches already consumed sees exactly the same order as an uninterrupted one.
        while True:
            yield from self.loader

    def _over_budget(self, start: float) -> bool:
        budget = self.cfg.train.time_budget_s
        if budget <= 0:
            return False
        over = torch.tensor([float(budget <= time.time() - start)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:  # every process must stop at the same step
            over = self.accelerator.reduce(over, "sum")
        return bool(over.item() > 0)

    def train(self, resume: bool = True) -> dict:
        cfg = self.cfg.train
        bar = None
        try:
            if resume:
                self.resume()
            else:
                self._set_aside_old_checkpoints()
            batches = self._batches()
            micro = self.step * cfg.grad_accum
            for _ in range(micro):  # skip what was already consumed
                next(batches)
            bar = tqdm(total=cfg.steps, initial=self.step, disable=not (cfg.progress and self.accelerator.is_main_process),
                       desc="train", dynamic_ncols=True)
            start, last = time.time(), {}
            model = self.model.train()
            while self.step < cfg.steps:
                ids, feats, index = next(batches)
                feats = add_feature_noise(feats, self.cfg.data.feature_noise_std, lambda: self._step_noise(ids, micro))
                with self.accelerator.accumulate(model), self.accelerator.autocast():
                    terms = self._losses(model, ids, feats, micro)
                    micro += 1
                    # Checked before the update, so the last checkpoint stays good.
                    scalars = self._scalars(terms, index)
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
                last = scalars
                # the last step: the planned one, or the first past train.time_budget_s (then it saves and stops)
                done = self.step == cfg.steps or self._over_budget(start)
                if self.step % cfg.log_every == 0 or done:
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
                    self._log({"step": self.step, "lr": self.scheduler.get_last_lr()[0],
                               "elapsed_s": time.time() - start, **{f"train/{k}": v for k, v in last.items()}})
                if self.step % cfg.save_every == 0 or done:  # before validation, so an error there costs no work
                    self.save()
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or done) and self.accelerator.is_main_process:
                    self._log({"step": self.step, **self.validate()})
                    model.train()
                if done:
                    break
            return {"steps": self.step, "train_s": time.time() - start, **last}
        finally:  # however training ends, an exception included
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.close()
                self.writer = None
