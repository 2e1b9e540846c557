"""Training: the data a Config names, and an Accelerate-based Trainer that optimises a captioner.

The Trainer does optimisation only (device placement, mixed precision, gradient accumulation, AdamW,
warm-up + decay, EMA, clipping); the losses come from the captioner (:meth:`Captioner.training_losses`),
checkpoints and resume from :class:`~diffcap.training.rundir.RunDir`, and the validation report from
:class:`~diffcap.training.validation.Validator`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import Config, ConfigError, TrainConfig, resolve
from ..data.contract import (
    CaptionRecord,
    DataError,
    FeatureSpec,
    FeatureStore,
    check_ids,
    describe_ids,
    read_captions,
)
from ..data.datasets import CaptionPairs, SplitData, load_split
from ..diffusion.noise import StepNoise
from ..io import atomic_output, read_jsonl_log
from ..models.autoregressive import AutoregressiveCaptioner
from ..models.factory import build_model
from ..models.prenorm_body import copy_teacher
from ..precision import training_device, training_precision
from ..text.tokenizer import CaptionTokenizer
from .rundir import RunDir, TrainingState
from .validation import NonFiniteCheck, Validator

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    tokenizer: CaptionTokenizer
    train: SplitData
    val: SplitData | None
    features: FeatureSpec  # the feature file's item shape and metadata, which config.resolve reads


def load_training_data(cfg: Config) -> TrainingData:
    """Read the captions and feature files of ``cfg.data`` and build the tokenizer on the training split."""
    records = read_captions(cfg.data.captions)
    store = FeatureStore.open(cfg.data.features)
    check_ids(records, store, cfg.data.captions)
    check_splits_apart(records, cfg.data.train_split, cfg.data.captions)
    captioned = {r.image_id for r in records}
    # check_ids found every captioned id in the store, so only a larger store lists its ids to name the rest.
    if len(store) > len(captioned) and (unused := [i for i in store.ids if i not in captioned]):
        log.warning(
            "%s: %s have features but no captions in %s; they are not used",
            store.path,
            describe_ids(unused),
            cfg.data.captions,
        )
    train_captions = [r.caption for r in records if r.split == cfg.data.train_split]
    if cfg.text.tokenizer == "word_level":
        tokenizer = CaptionTokenizer.build_word_level(
            train_captions, min_count=cfg.text.min_count, max_length=cfg.text.max_length
        )
    else:
        tokenizer = CaptionTokenizer.from_pretrained(cfg.text.tokenizer, max_length=cfg.text.max_length)
    train = load_split(records, store, tokenizer, cfg.data.train_split, cfg.data.captions)
    has_val = any(r.split == cfg.data.val_split for r in records)
    val = load_split(records, store, tokenizer, cfg.data.val_split, cfg.data.captions) if has_val else None
    if cfg.data.overfit_n:
        # Debug setting: fit N fixed examples and report on those same examples.
        train = train.subset(cfg.data.overfit_n)
        val = train
    return TrainingData(tokenizer, train, val, store.spec)


def check_splits_apart(records: list[CaptionRecord], train_split: str, source: str) -> None:
    """An image whose captions are in the training split and in another one would let validation
    (or a test) score the model on what it trained on: refuse, naming the images."""
    splits: dict[str, set[str]] = {}
    for r in records:
        splits.setdefault(r.image_id, set()).add(r.split)
    if shared := [i for i, s in splits.items() if train_split in s and len(s) > 1]:
        others = sorted({x for i in shared for x in splits[i]} - {train_split})
        raise DataError(
            f"{source}: {describe_ids(shared)} have captions in the '{train_split}' split and in "
            f"{', '.join(repr(x) for x in others)}; give each image one split"
        )


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


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: every trainable parameter at train.lr, except that with
    train.body_lr_scale != 1 the pretrained transformer body (``denoiser.body``) gets its own group at
    lr x body_lr_scale. The scheduler multiplies each group's rate by the same factor."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.body_lr_scale == 1.0:
        return [{"params": [p for _, p in params], "lr": cfg.lr}]
    body = [p for n, p in params if n.startswith("denoiser.body.")]
    if not body:
        raise ConfigError("train.body_lr_scale: this model has no trainable pretrained body (denoiser.body)")
    rest = [p for n, p in params if not n.startswith("denoiser.body.")]
    return [{"params": rest, "lr": cfg.lr}, {"params": body, "lr": cfg.lr * cfg.body_lr_scale}]


def ema_multi_avg_fn(decay: float):
    """EMA with warm-up, decay_n = min(decay, (1 + n) / (10 + n)), so short runs are not dominated by
    the random initialisation (as in diffusers' EMAModel with use_ema_warmup).

    In place and over all tensors of a dtype at once (torch.optim.swa_utils.get_ema_multi_avg_fn has no
    warm-up): a per-tensor ``averaged + (current - averaged) * (1 - d)`` allocates three fresh copies of
    every weight, and for the proxy's 13M-parameter student that took 35-50 ms of a 0.2 s training step on
    the CPU, against 5 ms for the in-place update (BENCHMARKS.md, "Session 16")."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # AveragedModel groups the tensors by dtype, so a group is all floating point or all not
        if not averaged[0].is_floating_point():  # masks and counters are copied, not averaged
            torch._foreach_copy_(averaged, current)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averaged, current, 1 - min(decay, (1 + n) / (10 + n)))

    return update


class TrainLog:
    """logs/train.jsonl, and the same scalars in TensorBoard (opened on the first record)."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.out_dir, self.enabled = out_dir, enabled
        self.path = out_dir / "logs" / "train.jsonl"
        self.writer = None
        self.start_step = 0
        self.validated: set[int] = set()  # the steps whose validation the log holds

    def start(self, step: int) -> None:
        """Continue the logs of a run resumed at ``step``: the records of later steps, written before
        the run was stopped, describe training that is done again now, so they are dropped (JSONL
        rows here; TensorBoard's when the writer opens, through its ``purge_step``)."""
        self.start_step = step
        if not self.enabled or not self.path.exists():
            return
        rows = read_jsonl_log(self.path)
        kept = [r for r in rows if r.get("step", 0) <= step]
        self.validated = {r["step"] for r in kept if any(k.startswith("val/") for k in r)}
        lines = "".join(json.dumps(r) + "\n" for r in kept)
        if lines != self.path.read_text():  # also rewritten to drop a torn last line, which appends would extend
            with atomic_output(self.path) as tmp:
                tmp.write_text(lines)

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides the events from purge_step on, as start() drops the later JSONL rows; at step 0
            # too, so that a rerun that found no checkpoint does not show a killed run's curves under its own.
            purge = self.start_step + 1
            self.writer = SummaryWriter(str(self.out_dir / "logs" / "tensorboard"), purge_step=purge)
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Trainer:
    """Trains the captioner ``cfg`` describes into the run directory ``out_dir``.

    ``cfg`` is resolved against the data (:func:`diffcap.config.resolve`); ``self.cfg`` is the result,
    which is what the run directory saves.
    """

    def __init__(self, cfg: Config, out_dir: str | Path, data: TrainingData | None = None, replan=None):
        self.out_dir = Path(out_dir)
        # A budgeted run's re-planner (diffcap.experiments.budget.Replan), which may revise train.steps
        # (and with it the learning-rate schedule, which reads train.steps at every step).
        self.replan = replan
        precision = training_precision(cfg.train.mixed_precision, training_device())
        self.accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.train.grad_accum)
        acc = self.accelerator
        set_seed(cfg.train.seed)
        self.data = data or load_training_data(cfg)
        self.tokenizer = self.data.tokenizer
        self.cfg = cfg = resolve(cfg, self.data.features, self.tokenizer)
        self.run_dir = RunDir(self.out_dir, is_main=acc.is_main_process, barrier=acc.wait_for_everyone)
        model = build_model(cfg, self.tokenizer)
        model.restrict_vocabulary(self.data.train.caption_ids)
        ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
        groups = parameter_groups(model, cfg.train)
        self.lr_scales = [g["lr"] / cfg.train.lr if cfg.train.lr else 1.0 for g in groups]
        # The fused kernel updates all parameters in one pass: 6 ms instead of 38 ms per step for the
        # proxy's 13M parameters on the CPU (PyTorch has it for CPU and CUDA since 2.4).
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train))
        generator = torch.Generator().manual_seed(cfg.train.seed)
        # Each process gets batch_size captions; Accelerate deals consecutive batches of one shuffled
        # order to the processes, so N processes see the same global batches as one with N x batch_size
        # (drop_last by the global batch keeps every step's batches complete and equal).
        global_batch = cfg.train.batch_size * acc.num_processes
        loader = DataLoader(
            CaptionPairs(self.data.train),
            batch_size=cfg.train.batch_size,
            shuffle=True,
            drop_last=len(self.data.train.caption_ids) >= global_batch,
            generator=generator,
            # Workers start again each epoch (not persistent_workers): a new iterator draws its seed from
            # `generator` as the workerless loader does, so every epoch's order is the same with or without.
            num_workers=cfg.train.num_workers,
            pin_memory=acc.device.type == "cuda",  # page-locked batches: no staging copy on the way to the GPU
        )
        self.model, optimizer, self.loader = acc.prepare(model, optimizer, loader)
        ema.to(acc.device)
        self.state = TrainingState(acc.unwrap_model(self.model), ema, optimizer, scheduler, processes=acc.num_processes)
        self.ema, self.optimizer, self.scheduler = ema, optimizer, scheduler
        self.train_log = TrainLog(self.out_dir, acc.is_main_process)
        self.validator = Validator(cfg, self.tokenizer, self.data.val, acc.device, acc.autocast)
        if cfg.train.keep_best and self.data.val is None:
            raise ConfigError(f"train.keep_best: {cfg.data.captions} has no captions in split {cfg.data.val_split!r}")
        self.non_finite = NonFiniteCheck(acc, self.data.train, cfg.data.captions)
        self.last_checkpoint: tuple[int, Path] | None = None  # (step, folder) resumed from or last written
        self.resumed_at: int | None = None  # the step resume() restored, if it did

    @property
    def step(self) -> int:
        return self.state.step

    def save(self) -> None:
        folder = self.run_dir.save(self.state, self.cfg, self.tokenizer)
        self.last_checkpoint = (self.step, folder)

    def resume(self) -> bool:
        """Restore the newest readable checkpoint (see :meth:`RunDir.resume_latest`); False if none."""
        folder = self.run_dir.resume_latest(self.state, self.cfg)
        if folder is None:
            return False
        self._apply_schedule()
        self.last_checkpoint = (self.step, folder)
        self.resumed_at = self.step
        return True

    def _start_from_teacher(self) -> None:
        """model.init_from: a fresh run's denoiser starts from its autoregressive teacher's EMA weights
        (models/prenorm_body.py); a resumed one has its own weights and never reads the teacher."""
        source = Path(self.cfg.model.init_from)
        _, teacher, tokenizer = RunDir(source).load_model(ema=True)
        if not isinstance(teacher, AutoregressiveCaptioner):
            raise ConfigError(f"model.init_from={source}: not an autoregressive run (model.kind={teacher.cfg.kind})")
        if tokenizer.hf.get_vocab() != self.tokenizer.hf.get_vocab():
            raise ConfigError(f"model.init_from={source}: the teacher's tokenizer is not this run's")
        model = self.state.model
        copy_teacher(model, teacher, source=str(source))
        self.ema.module.load_state_dict(model.state_dict())

    def _apply_schedule(self) -> None:
        """The learning rate of this run's settings at the resumed step: a resume may change train.lr and
        the schedule (rundir.RESUME_MAY_CHANGE), and the optimizer state loaded carries the old ones.
        With unchanged settings this recomputes exactly what LambdaLR had set."""
        cfg, scheduler = self.cfg.train, self.scheduler
        factor = lr_lambda(cfg)(scheduler.last_epoch)
        scheduler.base_lrs = [cfg.lr * scale for scale in self.lr_scales]
        for group, base in zip(self.optimizer.param_groups, scheduler.base_lrs):
            group["initial_lr"], group["lr"] = base, base * factor

    def _step_noise(self, ids: torch.Tensor, micro: int) -> StepNoise:
        """The random draws of micro-batch ``micro`` (see diffusion/noise.py)."""
        acc = self.accelerator
        return StepNoise(
            self.cfg.train.seed,
            micro,
            k=self.cfg.diffusion.timesteps_per_caption,
            batch=ids.shape[0],
            rank=acc.process_index,
            world=acc.num_processes,
            device=ids.device,
            gather=acc.gather,
        )

    def _clip_and_check(self, model: torch.nn.Module, rows: torch.Tensor) -> None:
        """Clip the gradient to train.grad_clip and stop before the update if its norm is not finite: a
        loss can be finite while its gradient is not, and one NaN in the gradient spreads to every
        weight through the clipping and Adam. With fp16 the loss scaler handles it instead (an
        overflow at a large loss scale is expected; it skips that update and lowers the scale)."""
        clip = self.cfg.train.grad_clip
        norm = self.accelerator.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)  # inf: norm only
        if norm is not None and self.accelerator.scaler is None:
            self.non_finite.gradient(norm, rows, self.step + 1, self._kept())

    def _kept(self) -> str:
        if self.last_checkpoint is None:
            return "no checkpoint was written yet"
        return f"the checkpoint of step {self.last_checkpoint[0]} is intact ({self.last_checkpoint[1]})"

    def _batches(self):
        # The loader's shuffling generator starts from train.seed in every Trainer, so a resumed run
        # that skips the batches already consumed sees exactly the same order as an uninterrupted one.
        while True:
            yield from self.loader

    def _validate(self, done: bool) -> None:
        """The validation report, at every train.eval_every steps and at the last step."""
        every = self.cfg.train.eval_every
        if every and (self.step % every == 0 or done) and self.accelerator.is_main_process:
            record = self.validator(self.ema.module)
            self.train_log({"step": self.step, **record})
            if self.cfg.train.keep_best:
                self._keep_best(record["val/CIDEr"])
            self.model.train()

    def _keep_best(self, score: float) -> None:
        """train.keep_best: the EMA weights go to RUN/best if ``score`` beats the best kept (also before a resume)."""
        best = self.run_dir.best_record()
        if best is None or score > best["val/CIDEr"]:
            record = {"step": self.step, "val/CIDEr": score}
            self.run_dir.save_best(record, self.cfg, self.ema.module, self.tokenizer)

    def _over_budget(self, start: float) -> bool:
        budget = self.cfg.train.time_budget_s
        if budget <= 0:
            return False
        over = torch.tensor([float(budget <= time.time() - start)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:  # every process must stop at the same step
            over = self.accelerator.reduce(over, "sum")
        return bool(over.item() > 0)

    def _agreed_elapsed(self, start: float) -> float:
        """Seconds since ``start``: the longest of all processes, so that every process plans alike."""
        elapsed = torch.tensor([time.time() - start], device=self.accelerator.device)
        return float(self.accelerator.gather(elapsed).max().item())

    def _revise_plan(self, start: float, bar) -> None:
        if self.replan is None or not self.replan.wants(self.step):
            return
        steps = self.replan.revise(self.step, self._agreed_elapsed(start), write=self.accelerator.is_main_process)
        if steps != self.cfg.train.steps:
            self.cfg.train.steps = bar.total = steps
            bar.refresh()

    def train(self, resume: bool = True) -> dict:
        cfg, acc = self.cfg.train, self.accelerator
        bar = None
        try:
            self.run_dir.lock()
            if resume:
                self.resume()
            else:
                self.run_dir.start_over()
            if self.resumed_at is None and self.cfg.model.init_from:
                self._start_from_teacher()
            if self.step >= cfg.steps:
                log.warning(
                    "%s: already trained to step %d, so train.steps=%d trains nothing; raise train.steps to "
                    "continue, or pass --no-resume to start over",
                    self.out_dir,
                    self.step,
                    cfg.steps,
                )
            self.train_log.start(self.step)
            if self.resumed_at and self.step not in self.train_log.validated:
                # The checkpoint is written before validation, so a kill during it loses only the report.
                self._validate(done=self.step >= cfg.steps)
            if self.state.micro < 0:  # a checkpoint from before the count was saved
                self.state.micro = self.step * cfg.grad_accum
            batches = self._batches()
            for _ in range(self.state.micro):  # skip what was already consumed
                next(batches)
            bar = tqdm(
                total=cfg.steps,
                initial=self.step,
                disable=not (cfg.progress and acc.is_main_process),
                desc="train",
                dynamic_ncols=True,
            )
            start, last = time.time(), {}
            if self.replan is not None:
                self.replan.start(self.step)
            model = self.model.train()
            step_rows = []  # the training rows of the step's micro-batches, to name them in an error
            while self.step < cfg.steps:
                ids, feats, index = next(batches)
                micro = self.state.micro  # keys the micro-batch's random draws
                feats = add_feature_noise(feats, self.cfg.data.feature_noise_std, partial(self._step_noise, ids, micro))
                step_rows.append(index)
                with acc.accumulate(model), acc.autocast():
                    terms = self.state.model.training_losses(ids, feats, noise=self._step_noise(ids, micro), net=model)
                    self.state.micro += 1
                    # Checked before the update, so the last checkpoint stays good.
                    scalars = self.non_finite.scalars(terms, index, self.step + 1, self._kept())
                    acc.backward(terms["loss"])
                    if acc.sync_gradients:
                        self._clip_and_check(model, torch.cat(step_rows))
                        step_rows = []
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                self.scheduler.step()
                self.ema.update_parameters(self.state.model)
                self.state.step += 1
                bar.update(1)
                last = scalars
                self._revise_plan(start, bar)
                # the last step: the planned one, or the first past train.time_budget_s (then it saves and stops)
                done = self.step == cfg.steps or self._over_budget(start)
                if self.step % cfg.log_every == 0 or done:
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
                    self.train_log(
                        {
                            "step": self.step,
                            "lr": self.scheduler.get_last_lr()[0],
                            "elapsed_s": time.time() - start,
                            **{f"train/{k}": v for k, v in last.items()},
                        }
                    )
                if self.step % cfg.save_every == 0 or done:  # before validation, so an error there costs no work
                    self.save()
                self._validate(done)
                if done:
                    break
            return {"steps": self.step, "train_s": time.time() - start, **last}
        finally:  # however training ends, an exception included
            if bar is not None:
                bar.close()
            self.train_log.close()
            self.run_dir.unlock()
