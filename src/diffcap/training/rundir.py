"""The run directory: everything needed to rebuild a trained captioner, and to resume its training.

    RUN_DIR/config.json          the resolved Config
    RUN_DIR/body_config.json     the captioner's architecture (so a pretrained backbone rebuilds offline)
    RUN_DIR/tokenizer/           the tokenizer files
    RUN_DIR/model.safetensors    raw weights
    RUN_DIR/ema.safetensors      EMA weights (what sampling uses by default)
    RUN_DIR/checkpoint.json      which checkpoint the files above were published from
    RUN_DIR/best/                with train.keep_best: config, tokenizer and the EMA weights of the
                                 best validation so far, and best.json (its step and val/CIDEr)
    RUN_DIR/checkpoints/step-N/  the last few checkpoints: all of the above plus trainer_state/
                                 (optimizer, LR schedule, step, RNG and EMA states, the captioner's
                                 training state), for resume

A checkpoint is written into a hidden temporary folder, synced, and renamed to ``step-NNNNNN``, so a
folder with that name is always complete: a process killed at any moment leaves at worst a hidden
``.step-*.tmp`` folder, which the next run deletes. Its ``checksums.json`` holds the SHA-256 of every
other file, checked when the checkpoint is loaded, so a file damaged later (a flipped bit, a truncated
copy) is found rather than trained on. Weights that are not finite are never written, and a
checkpoint holding some is passed over like an unreadable one.

Then the files that CaptionPipeline reads are published to the top of the run directory, each by an
atomic rename; a kill in the middle of publishing leaves one file a checkpoint behind, and the next
resume re-publishes from the newest checkpoint. The published weights are hard links to the newest
checkpoint's files (where the file system allows): a chosen trade-off, since a second copy of each
would double the largest files of the run. They are therefore no backup of that checkpoint; the
older checkpoints are, and ``checkpoint.json`` names the one whose checksums cover the top level.

Weights and optimizer state are safetensors and everything else is JSON: nothing is pickled, so
loading runs no code (torch and Accelerate would save optimizer and RNG state with pickle).
"""

from __future__ import annotations

import fcntl
import filecmp
import json
import logging
import os
import random
import re
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.optim.swa_utils import AveragedModel

from ..config import Config, ConfigError
from ..data.contract import DataError
from ..io import atomic_directory, file_sha256, link_or_copy, remove_partial, save_tensors, write_json
from ..models.base import Captioner
from ..models.factory import build_model
from ..text.tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
BEST = "best"  # train.keep_best: the model files of the best validation so far
BEST_RECORD = "best.json"
PUBLISHED_FILES = ("config.json", "body_config.json", "model.safetensors", "ema.safetensors")
TRAINER_STATE = "trainer_state"
CAPTIONER_STATE = "timesteps.safetensors"  # Captioner.training_state(): the timestep sampler's history
CHECKSUMS = "checksums.json"  # in each checkpoint: {"sha256": {relative path: hex digest}}
_NAME = re.compile(r"^step-(\d+)$")


# What a resumed run may set differently from its checkpoint: how long it trains, its learning-rate
# schedule, what it logs and keeps, where the data files are, and how it samples. The new values
# apply from the resumed step on. Anything else (the model, the loss, the batch, the seed, the
# optimizer) would make the run neither the old one nor a fresh one, so resume refuses it.
RESUME_MAY_CHANGE = (
    "train.steps",
    "train.lr",
    "train.final_lr",
    "train.lr_schedule",
    "train.warmup_steps",
    "train.eval_every",
    "train.eval_images",
    "train.save_every",
    "train.keep_checkpoints",
    "train.keep_best",
    "train.log_every",
    "train.progress",
    "train.time_budget_s",
    "train.num_workers",
    "data.captions",
    "data.features",
    "sampler.*",
)


def changed_settings(saved: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of every setting that differs and that a resume may not change."""

    def flat(cfg: Config) -> dict[str, Any]:
        return {f"{s}.{k}": v for s, section in cfg.to_dict().items() for k, v in section.items()}

    old, now = flat(saved), flat(new)
    may = {k for k in now if k in RESUME_MAY_CHANGE or f"{k.split('.')[0]}.*" in RESUME_MAY_CHANGE}
    return [(k, old[k], now[k]) for k in now if k not in may and old[k] != now[k]]


class RunDirError(FileNotFoundError):
    pass


class DamagedCheckpoint(RunDirError):
    """A checkpoint file whose contents are not what was written, or weights that are not finite."""


# What makes a checkpoint unreadable (then the one before it is tried); a checkpoint that does not
# fit the model (ConfigError, DataError) is not among them: an older one would not fit either.
_UNREADABLE = (RunDirError, SafetensorError, OSError, KeyError, json.JSONDecodeError)


@dataclass
class TrainingState:
    """Everything a training run changes, as a checkpoint saves and restores it."""

    model: Captioner  # unwrapped (not the DDP wrapper)
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    # Micro-batches consumed so far: resume skips exactly these. Not step * grad_accum, since Accelerate
    # also ends an accumulation at the end of each pass over the data (a step of fewer micro-batches).
    micro: int = 0
    processes: int = 1  # the global batch, and so the data order, depends on it


class RunDir:
    """One run directory. ``is_main`` and ``barrier`` make it safe to use from every process of a
    multi-process run: only the main process writes, and ``barrier()`` waits for all processes."""

    def __init__(self, path: str | Path, *, is_main: bool = True, barrier: Callable[[], None] = lambda: None):
        self.path = Path(path)
        self.is_main, self.barrier = is_main, barrier
        self._lock: int | None = None

    # ---- a trained run ---------------------------------------------------------------------------
    def load_model(self, *, ema: bool = True) -> tuple[Config, Captioner, CaptionTokenizer]:
        """Rebuild config, model (EMA weights if present and ``ema``) and tokenizer."""
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: run directory not found")
        config_file = _require(self.path / "config.json")
        cfg = Config.from_dict(json.loads(config_file.read_text()), str(config_file))
        body_config = json.loads(_require(self.path / "body_config.json").read_text())
        tokenizer = CaptionTokenizer.load(_require(self.path / "tokenizer"))
        model = build_model(cfg, tokenizer, pretrained=False, body_config=body_config)
        weights = self.path / (
            "ema.safetensors" if ema and (self.path / "ema.safetensors").exists() else "model.safetensors"
        )
        self._verify_published(weights)
        state = model.upgrade_state_dict(load_weights(weights))
        if bad := non_finite(state):
            raise DamagedCheckpoint(f"{weights}: weights that are not finite ({', '.join(bad[:5])})")
        check_shapes(weights, state, model.state_dict())
        model.load_state_dict(state)
        model.eval()
        return cfg, model, tokenizer

    def _verify_published(self, weights: Path) -> None:
        """Check a top-level weights file against the checksum of the checkpoint it was published
        from (checkpoint.json names it), when that checkpoint is still there."""
        try:
            folder = self.path / json.loads((self.path / "checkpoint.json").read_text())["checkpoint"]
            expected = json.loads((folder / CHECKSUMS).read_text())["sha256"][weights.name]
        except (OSError, ValueError, KeyError):
            return  # a run saved without checksums, or assembled by hand
        if file_sha256(weights) != expected:
            raise DamagedCheckpoint(
                f"{weights}: contents differ from the checksum recorded in {folder / CHECKSUMS} (the file "
                "is damaged); if the run's checkpoints are intact, resuming the training re-publishes it"
            )

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, folder), oldest first; temporary folders are never listed."""
        root = self.path / CHECKPOINTS
        if not root.is_dir():
            return []
        return sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name)))

    def checkpoint_path(self, step: int) -> Path:
        return self.path / CHECKPOINTS / f"step-{step:06d}"

    # ---- training --------------------------------------------------------------------------------
    def save(self, state: TrainingState, cfg: Config, tokenizer: CaptionTokenizer) -> Path:
        """Write checkpoints/step-N (complete before it is visible), publish its model files to the top
        of the run directory for CaptionPipeline, and keep only the newest ``train.keep_checkpoints``.
        Returns the checkpoint's folder (on every process)."""
        self.barrier()
        final = self.checkpoint_path(state.step)
        # Every process holds the same weights, so all of them stop here together.
        if bad := non_finite(state.model.state_dict()) + non_finite(state.ema.module.state_dict(), "ema."):
            raise FloatingPointError(
                f"{final}: not written, the weights of step {state.step} are not finite ({', '.join(bad[:5])})"
            )
        if not self.is_main:
            return final
        self._remove_partial()
        with atomic_directory(final) as tmp:
            _write_checkpoint(tmp, state, cfg, tokenizer)
        self._publish(final)
        self._prune(cfg.train.keep_checkpoints)
        return final

    def resume_latest(self, state: TrainingState, cfg: Config) -> Path | None:
        """Restore ``state`` from the newest complete checkpoint and return its folder, or None if there
        is none. An unreadable one (e.g. a truncated file) is reported and the one before it used;
        once that one has loaded, the unreadable ones are renamed aside to ``unreadable-step-N`` (so
        they neither count among the checkpoints kept nor pass for the newest)."""
        if self.is_main:
            for p in self._remove_partial():
                log.warning("%s: removed what an interrupted save left behind", p)
        candidates = [p for _, p in reversed(self.checkpoints())]
        if not candidates:
            return None
        self._check_fits(candidates[0], cfg)
        self._check_settings(candidates[0], cfg)
        problems, unreadable = [], []
        for folder in candidates:
            try:
                _load_checkpoint(folder, state)
            except _UNREADABLE as exc:
                log.warning("%s: unreadable checkpoint, trying the one before (%s)", folder, exc)
                problems.append(f"{folder}: {exc}")
                unreadable.append(folder)
                continue
            # Every process has read what it needs before the main process moves anything.
            self.barrier()
            if self.is_main:
                for bad in unreadable:
                    _set_aside(bad)
                self._publish(folder)  # repairs a publish cut short by a kill
            log.info("resumed %s at step %d from %s", self.path, state.step, folder)
            return folder
        raise RunDirError(
            f"{self.path}: no readable checkpoint ({'; '.join(problems)}); pass --no-resume to start over"
        )

    def start_over(self) -> None:
        """Starting over in a run directory that holds another run's checkpoints or logs: move them aside
        rather than delete them, so that pruning and a later resume see only this run's checkpoints and
        its logs start empty (also when the earlier run was stopped before its first checkpoint)."""
        if not self.is_main:
            return
        old = self.path / CHECKPOINTS
        moved = [p for p in (old, self.path / "logs", self.path / BEST) if p.is_dir() and any(p.iterdir())]
        if not moved:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for p in moved:
            p.rename(self.path / f"{p.name}.replaced-{stamp}")
        (self.path / "checkpoint.json").unlink(missing_ok=True)
        names = " and ".join(p.name for p in moved)
        log.warning("%s: starting over; the earlier run's %s moved to *.replaced-%s", self.path, names, stamp)

    def best_record(self) -> dict | None:
        """``RUN/best/best.json`` (``step`` and ``val/CIDEr`` of the kept weights), or None before the first."""
        path = self.path / BEST / BEST_RECORD
        return json.loads(path.read_text()) if path.exists() else None

    def save_best(self, record: dict, cfg: Config, model: Captioner, tokenizer: CaptionTokenizer) -> Path:
        """Replace ``RUN/best`` by ``model``'s weights (the EMA model, saved as both weight files) and
        ``record``, in one atomic rename: a kill while writing leaves the previous best whole."""
        final = self.path / BEST
        with atomic_directory(final) as tmp:
            save_model_files(tmp, cfg, model, tokenizer, model.state_dict())
            write_json(tmp / BEST_RECORD, record)
        return final

    def lock(self) -> None:
        """Hold ``train.lock`` in the run directory until :meth:`unlock` or the process ends (an
        ``flock``, which the system releases however the process ends, so no stale lock survives a kill).
        A second trainer on the same directory would delete the first one's temporary files as the
        leftovers of a crash; it stops here instead, naming the process that holds the lock."""
        if not self.is_main or self._lock is not None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.path / "train.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(
                f"{self.path}: another training run is using this directory ({holder}, per {path}); "
                "wait for it to end, or train into another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(
            fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
        )
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the file releases the flock
            self._lock = None

    # ---- housekeeping ----------------------------------------------------------------------------
    def _remove_partial(self) -> list[Path]:
        """Delete what a killed writer left behind (hidden temporary files and folders)."""
        root = self.path / CHECKPOINTS
        removed = remove_partial(root) if root.is_dir() else []
        return removed + (remove_partial(self.path) if self.path.is_dir() else [])

    def _prune(self, keep: int) -> list[Path]:
        """Delete all but the newest ``keep`` checkpoints (keep <= 0 keeps them all)."""
        if keep <= 0:
            return []
        old = [p for _, p in self.checkpoints()[:-keep]]
        for p in old:
            # Rename first, so a kill during the (non-atomic) delete leaves a hidden folder, not a
            # half-deleted checkpoint that looks complete.
            doomed = p.with_name(f".{p.name}.deleted.tmp")
            p.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        return old

    def _publish(self, checkpoint: Path) -> None:
        """Make the top-level files of the run directory those of ``checkpoint`` (hard links where possible)."""
        tokenizer = self.path / "tokenizer"
        if not tokenizer.is_dir() or _differs(tokenizer, checkpoint / "tokenizer"):
            with atomic_directory(tokenizer) as tmp:
                shutil.copytree(checkpoint / "tokenizer", tmp, dirs_exist_ok=True)
        for name in PUBLISHED_FILES:
            if (checkpoint / name).exists():
                link_or_copy(checkpoint / name, self.path / name)
        write_json(
            self.path / "checkpoint.json",
            {"checkpoint": str(checkpoint.relative_to(self.path)), "step": int(_NAME.match(checkpoint.name).group(1))},
        )

    def _check_settings(self, folder: Path, cfg: Config) -> None:
        """Resume only with the settings the checkpoint was trained with, except those that may change
        on resume (:data:`RESUME_MAY_CHANGE`): a setting ignored silently would make
        config.json describe a run that never happened."""
        try:
            saved = Config.from_dict(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
        except (OSError, json.JSONDecodeError):
            return  # an unreadable checkpoint is reported when it is loaded (an invalid one raises ConfigError)
        if changed := changed_settings(saved, cfg):
            listed = "; ".join(f"{key} was {old!r}, now {new!r}" for key, old, new in changed)
            raise ConfigError(
                f"{self.path}: cannot resume {folder.name} with other settings ({listed}). Set them back to "
                "resume, or start afresh: --no-resume (the earlier checkpoints are moved aside) or a new --out. "
                f"A resume may change only {', '.join(RESUME_MAY_CHANGE)}"
            )

    def _check_fits(self, folder: Path, cfg: Config) -> None:
        """The run's features must have the shape the checkpoint was trained on: say so before
        anything trains, naming both files, instead of a size-mismatch error from torch."""
        try:
            saved = json.loads((folder / "config.json").read_text())["model"]
        except (OSError, ValueError, KeyError):
            return  # an unreadable checkpoint is reported when it is loaded
        m = cfg.model
        old, new = (saved.get("cond_tokens"), saved.get("cond_dim")), (m.cond_tokens, m.cond_dim)
        if old != new:
            raise DataError(
                f"{cfg.data.features}: features of {new[0]} token(s) x {new[1]} do not fit the run "
                f"{self.path}, trained on {old[0]} token(s) x {old[1]} ({folder / 'config.json'}); "
                "use the same feature extractor, or a new --out"
            )


def _write_checkpoint(folder: Path, state: TrainingState, cfg: Config, tokenizer: CaptionTokenizer) -> None:
    save_model_files(folder, cfg, state.model, tokenizer, state.ema.module.state_dict())
    state_dir = folder / TRAINER_STATE
    state_dir.mkdir()
    save_optimizer(state.optimizer, state_dir)
    tensors, meta = rng_state()
    save_tensors(state_dir / "rng.safetensors", tensors)
    if captioner_state := state.model.training_state():
        save_tensors(state_dir / CAPTIONER_STATE, captioner_state)
    save_tensors(state_dir / "ema.safetensors", {"n_averaged": state.ema.n_averaged})
    write_json(
        state_dir / "state.json",
        {
            "step": state.step,
            "micro_batches": state.micro,
            "processes": state.processes,
            "scheduler": state.scheduler.state_dict(),
            "rng": meta,
        },
    )
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    write_json(folder / CHECKSUMS, {"sha256": {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}})


def _load_checkpoint(folder: Path, state: TrainingState) -> None:
    # Read and check everything first, so that an unreadable file changes nothing.
    verify_checksums(folder)
    state_dir = folder / TRAINER_STATE
    saved = json.loads((state_dir / "state.json").read_text())
    if saved.get("processes", state.processes) != state.processes:
        raise ConfigError(
            f"{folder}: trained by {saved['processes']} process(es), resumed by {state.processes}: the global "
            "batch, and so the data order, would change; resume with as many processes, or start afresh "
            "(--no-resume, or a new --out)"
        )
    weights = state.model.upgrade_state_dict(load_weights(folder / "model.safetensors"))
    ema_weights = state.model.upgrade_state_dict(load_weights(folder / "ema.safetensors"))
    moments = load_weights(state_dir / "optimizer.safetensors")
    if bad := non_finite(weights) + non_finite(ema_weights, "ema.") + non_finite(moments, "optimizer."):
        raise DamagedCheckpoint(f"{folder}: tensors that are not finite ({', '.join(bad[:5])})")
    check_shapes(folder / "model.safetensors", weights, state.model.state_dict())
    n_averaged = load_weights(state_dir / "ema.safetensors")["n_averaged"]
    captioner_file = state_dir / CAPTIONER_STATE
    captioner_state = load_weights(captioner_file) if captioner_file.exists() else {}
    rng = load_weights(state_dir / "rng.safetensors")
    load_optimizer(state.optimizer, state_dir, moments)
    state.model.load_state_dict(weights)
    state.ema.module.load_state_dict(ema_weights)
    state.ema.n_averaged.copy_(n_averaged)
    state.scheduler.load_state_dict(saved["scheduler"])
    state.model.load_training_state(captioner_state)
    set_rng_state(rng, saved["rng"])
    # -1: a checkpoint written before the count was saved (the trainer then assumes full accumulations)
    state.step, state.micro = saved["step"], saved.get("micro_batches", -1)


def verify_checksums(folder: Path) -> None:
    """Every file listed in the checkpoint's checksums.json must have the recorded SHA-256."""
    listed = folder / CHECKSUMS
    if not listed.exists():
        log.warning("%s: no %s (written by an older diffcap), so its files are not verified", folder, CHECKSUMS)
        return
    for name, digest in json.loads(listed.read_text())["sha256"].items():
        if file_sha256(_require(folder / name)) != digest:
            raise DamagedCheckpoint(f"{folder / name}: contents differ from the SHA-256 in {listed} (damaged)")


def non_finite(tensors: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [prefix + name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


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


def _differs(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    return bool(
        cmp.left_only or cmp.right_only or filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)[1:] != ([], [])
    )


# ---- model files -----------------------------------------------------------------------------------
def save_model_files(
    run_dir: str | Path,
    cfg: Config,
    model: Captioner,
    tokenizer: CaptionTokenizer,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", cfg.to_dict())
    write_json(run_dir / "body_config.json", model.body_config())
    tokenizer.save(run_dir / "tokenizer")
    save_tensors(run_dir / "model.safetensors", model.state_dict(), {"format": "pt"})
    if ema_state is not None:
        save_tensors(run_dir / "ema.safetensors", ema_state, {"format": "pt"})


def _require(path: Path) -> Path:
    if not path.exists():
        raise RunDirError(f"{path}: missing from the run directory (is {path.parent} a diffcap run?)")
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(_require(path)))
    except SafetensorError as exc:
        raise RunDirError(f"{path}: not a readable safetensors file ({exc})") from exc


def check_shapes(path: Path, saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> None:
    """Saved weights must fit the model the config builds: say which file and tensors do not,
    instead of torch's size-mismatch error."""
    wrong = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}"
        for k, v in current.items()
        if k in saved and saved[k].shape != v.shape
    ]
    missing = sorted(set(current) ^ set(saved))
    if wrong or missing:
        differ = f"; keys differ: {missing[:5]}" if missing else ""
        raise ConfigError(
            f"{path}: does not fit the model built from the current config and data "
            f"(saved vs now: {'; '.join(wrong[:3])}{differ}); "
            "was it written by another version of diffcap, or the vocabulary built from other captions?"
        )


# ---- optimizer and RNG state as safetensors + JSON -------------------------------------------------
def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    save_tensors(directory / "optimizer.safetensors", tensors)
    write_json(directory / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`save_optimizer` wrote: ``tensors`` are those of its optimizer.safetensors."""
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    return tensors, {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy.keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
