"""Training to a wall-time budget: measure seconds per step, then plan ``train.steps`` to fit.

Comparing settings fairly on one machine means giving each the same budget. A fixed step count
favours cheap settings, and ``train.time_budget_s`` alone cuts the learning-rate schedule short
(it would never decay). So a short throwaway run measures seconds per step, ``train.steps`` is set
so that the whole schedule fits the budget, and ``train.time_budget_s`` stays as the hard stop.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from .config import Config

CALIBRATION_STEPS, CALIBRATION_SKIP = 20, 5  # time steps SKIP..STEPS of a throwaway run
BUDGET_FILL = 0.95  # plan this fraction of the budget, leaving room for the final checkpoint


def reset_accelerate() -> None:
    """Accelerate keeps one process-wide state whose mixed precision cannot change; every Trainer of a
    multi-run process (and any later code in it) starts from a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def calibrate(cfg: Config, data, run_dir: Path) -> float:
    """Seconds per optimiser step, from steps CALIBRATION_SKIP..CALIBRATION_STEPS of a throwaway run."""
    import torch.utils.tensorboard  # noqa: F401  (imported here so its import is not timed as a step)

    from .train import Trainer

    c = copy.deepcopy(cfg)
    c.train.steps, c.train.log_every, c.train.time_budget_s = CALIBRATION_STEPS, CALIBRATION_SKIP, 0.0
    c.train.eval_every, c.train.save_every, c.train.progress = 0, 10**9, False
    shutil.rmtree(run_dir, ignore_errors=True)
    reset_accelerate()
    Trainer(c, run_dir, data=data).train(resume=False)
    with (run_dir / "logs" / "train.jsonl").open() as f:
        elapsed = {r["step"]: r["elapsed_s"] for r in map(json.loads, f) if "elapsed_s" in r}
    shutil.rmtree(run_dir, ignore_errors=True)
    return (elapsed[CALIBRATION_STEPS] - elapsed[CALIBRATION_SKIP]) / (CALIBRATION_STEPS - CALIBRATION_SKIP)


def plan_to_budget(cfg: Config, budget_s: float, sec_per_step: float) -> int:
    """Set train.steps (and a warm-up no longer than a tenth of them) to fit ``budget_s``; returns the steps."""
    planned = max(1, int(BUDGET_FILL * budget_s / max(sec_per_step, 1e-9)))
    cfg.train.steps = planned
    cfg.train.time_budget_s = float(budget_s)
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, max(1, planned // 10))
    return planned
