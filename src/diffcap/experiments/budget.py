"""Training to a wall-time budget: measure seconds per step, then plan ``train.steps`` to fit.

Comparing settings fairly on one machine means giving each the same budget. A fixed step count
favours cheap settings, and ``train.time_budget_s`` alone cuts the learning-rate schedule short
(it would never decay). So a short throwaway run measures seconds per step, ``train.steps`` is set
so that the whole schedule fits the budget, and ``train.time_budget_s`` stays as the hard stop.
Both ``diffcap sweep`` and the Flickr8k proxy benchmark train this way (:func:`train_to_budget`).

Fifteen steps are a noisy measure: identical proxy settings read 0.244 to 0.307 s/step, so one run
left a sixth of its budget unused and another hit the hard stop before its learning rate had decayed.
The real run therefore measures itself again (:class:`Replan`, at :data:`REPLAN_AT` of its planned
steps) and re-fits the rest of its schedule to the time left.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import shutil
import time
from pathlib import Path

from ..config import Config
from ..io import write_json

CALIBRATION_STEPS, CALIBRATION_SKIP = 20, 5  # time steps SKIP..STEPS of a throwaway run
BUDGET_FILL = 0.95  # plan this fraction of the budget, leaving room for the final checkpoint
PLAN_FILE = "plan.json"  # in the run directory: a resumed run keeps its plan, hence its LR schedule
# Re-fit train.steps at these fractions of the plan as it stands then: after the warm-up (a tenth at
# most), half-way, when the measure covers hundreds of steps, and at nine tenths, when only the last steps
# are left to fit. Without the last one a run that sped up after half-way ended early: the proxy's
# students used 90-94% of their time, not the planned 95% (BENCHMARKS.md, "Session 17"). A revision moves
# the learning rate by little (linear decay: from progress f to f x old / new steps).
REPLAN_AT = (0.1, 0.5, 0.9)


def reset_accelerate() -> None:
    """Accelerate keeps one process-wide state whose mixed precision cannot change; every Trainer of a
    multi-run process (and any later code in it) starts from a clean one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def logged_elapsed(run_dir: Path) -> dict[int, float]:
    """Step -> seconds since training started, from the run's log (every train.log_every steps). Timing
    between two logged steps leaves out process start-up and the first, slower steps."""
    with (Path(run_dir) / "logs" / "train.jsonl").open() as f:
        return {r["step"]: r["elapsed_s"] for r in map(json.loads, f) if "elapsed_s" in r}


def calibrate(cfg: Config, data, run_dir: Path) -> float:
    """Seconds per optimiser step, from steps CALIBRATION_SKIP..CALIBRATION_STEPS of a throwaway run."""
    import torch.utils.tensorboard  # noqa: F401  (imported here so its import is not timed as a step)

    from ..training import Trainer

    c = copy.deepcopy(cfg)
    c.train.steps, c.train.log_every, c.train.time_budget_s = CALIBRATION_STEPS, CALIBRATION_SKIP, 0.0
    c.train.eval_every, c.train.save_every, c.train.progress, c.train.keep_best = 0, 10**9, False, False
    shutil.rmtree(run_dir, ignore_errors=True)
    reset_accelerate()
    Trainer(c, run_dir, data=data).train(resume=False)
    elapsed = logged_elapsed(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return (elapsed[CALIBRATION_STEPS] - elapsed[CALIBRATION_SKIP]) / (CALIBRATION_STEPS - CALIBRATION_SKIP)


def planned_steps(budget_s: float, sec_per_step: float) -> int:
    """Optimiser steps that fill :data:`BUDGET_FILL` of ``budget_s`` at ``sec_per_step``."""
    return max(1, int(BUDGET_FILL * budget_s / max(sec_per_step, 1e-9)))


def new_plan(cfg: Config, budget_s: float, sec_per_step: float) -> dict:
    """The plan of a budgeted run: steps that fit ``budget_s`` at ``sec_per_step``, and a warm-up no longer
    than a tenth of them. ``calibrated_steps`` stays as first planned; ``steps`` is what :class:`Replan`
    revises."""
    steps = planned_steps(budget_s, sec_per_step)
    return {
        "sec_per_step": sec_per_step,
        "steps": steps,
        "calibrated_steps": steps,
        "warmup_steps": min(cfg.train.warmup_steps, max(1, steps // 10)),
        "revisions": [],
    }


def plan_to_budget(cfg: Config, budget_s: float, plan: dict) -> Config:
    """A copy of ``cfg`` that trains ``plan``'s steps and warm-up, with train.time_budget_s as the hard stop."""
    out = copy.deepcopy(cfg)
    out.train.steps = plan["steps"]
    out.train.time_budget_s = float(budget_s)
    out.train.warmup_steps = plan["warmup_steps"]
    return out


class Replan:
    """Re-fits a budgeted run's train.steps to the seconds per step of the run itself.

    The Trainer asks :meth:`wants` after every optimiser step and, where it does, passes the seconds
    since training started (the same on every process). The first such step, :data:`CALIBRATION_SKIP`
    steps in, starts the clock (the first steps are slower); at each fraction of :data:`REPLAN_AT` of
    the planned steps (as the previous revision left them), :meth:`revise` measures seconds per step since
    then and plans the steps that end at :data:`BUDGET_FILL` of the budget. Each revision is written to
    the plan file, so a resumed run keeps the schedule it had. The revision steps depend only on the plan
    and the elapsed time, which the Trainer agrees on across processes, so every process revises at the
    same step to the same number.
    """

    def __init__(self, budget_s: float, plan: dict, plan_path: Path):
        self.budget_s, self.plan, self.plan_path = budget_s, plan, Path(plan_path)
        self.clock_step, self.clock_s, self.next_point, self.fractions = None, 0.0, None, ()

    def _next(self, step: int) -> None:
        """Drops the fractions whose point on the plan as it stands is not beyond ``step``; the next point is
        the first left, if any."""
        marks = [int(f * self.plan["steps"]) for f in self.fractions]
        ahead = next((i for i, m in enumerate(marks) if m > step), len(marks))
        self.fractions = self.fractions[ahead:]
        self.next_point = marks[ahead] if self.fractions else None

    def start(self, step: int) -> None:
        """Training starts (or resumes) at ``step``."""
        self.clock_step, self.fractions = step + CALIBRATION_SKIP, REPLAN_AT
        self._next(self.clock_step)

    def wants(self, step: int) -> bool:
        return step == self.clock_step or step == self.next_point

    def revise(self, step: int, elapsed_s: float, write: bool = True) -> int:
        """The run's train.steps after ``step``, ``elapsed_s`` seconds into training."""
        if step == self.clock_step:
            self.clock_s = elapsed_s
            return self.plan["steps"]
        sec = (elapsed_s - self.clock_s) / (step - self.clock_step)
        steps = max(step + 1, step + int((BUDGET_FILL * self.budget_s - elapsed_s) / max(sec, 1e-9)))
        self.plan["revisions"].append({"at_step": step, "sec_per_step": sec, "steps": steps})
        self.plan["steps"] = steps
        self.fractions = self.fractions[1:]  # this point's fraction is done
        self._next(step)
        if write:
            write_json(self.plan_path, self.plan)
        return steps


def train_to_budget(
    cfg: Config,
    budget_s: float,
    run_dir: str | Path,
    *,
    data=None,
    resume: bool = False,
    checkpoints: int = 0,
    validations: int = 0,
    say=None,
) -> dict:
    """Calibrate, plan ``cfg`` to fit ``budget_s`` seconds (0: train ``cfg.train.steps`` as given), train.

    Without ``resume`` the run directory starts empty; with it, training continues from the run's newest
    checkpoint and the plan of ``RUN/plan.json``. ``checkpoints`` > 0 saves that many checkpoints over the
    run, so a stopped run can resume mid-way; ``validations`` > 0 validates that many times over it
    (train.eval_every; with train.keep_best ``RUN/best`` then holds the best of them).
    Returns the training record: ``steps``, ``planned_steps``,
    ``train_s`` (this process only, so after a resume not the time before the stop), ``wall_s``,
    ``stopped_by_budget``, ``budget_s``, ``sec_per_step``, ``calibration_wall_s``, ``resumed``,
    ``resumed_at_step``, ``final_loss``, ``params``, ``params_trainable``; with a budget also
    ``calibrated_steps`` (the first plan; ``planned_steps`` is the last revision) and ``revisions``;
    with train.keep_best ``best`` (RUN/best/best.json: the step and val/CIDEr kept).
    """
    from ..training import Trainer, load_training_data

    say = say or (lambda message: None)
    run_dir = Path(run_dir)
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    data = data if data is not None else load_training_data(cfg)
    plan_path, calibration_wall_s, replan = run_dir / PLAN_FILE, 0.0, None
    if budget_s > 0:
        if resume and plan_path.exists():
            saved = json.loads(plan_path.read_text())
            # a plan from before revisions lacks the keys new_plan adds; its steps are the calibrated ones
            plan = {**new_plan(cfg, budget_s, saved["sec_per_step"]), **saved}
        else:
            t0 = time.time()
            sec = calibrate(cfg, data, run_dir.parent / f".{run_dir.name}-calibration")
            calibration_wall_s = time.time() - t0
            plan = new_plan(cfg, budget_s, sec)
            write_json(plan_path, plan)
        cfg = plan_to_budget(cfg, budget_s, plan)
        replan = Replan(budget_s, plan, plan_path)
        say(f"{run_dir.name}: {plan['sec_per_step']:.4f} s/step -> {cfg.train.steps} steps in {budget_s:.0f} s")
    else:
        plan = {"sec_per_step": None}
    if checkpoints > 0:
        cfg = copy.deepcopy(cfg)
        cfg.train.save_every = max(1, math.ceil(cfg.train.steps / checkpoints))
    if validations > 0:
        cfg = copy.deepcopy(cfg)
        cfg.train.eval_every = max(1, math.ceil(cfg.train.steps / validations))
    reset_accelerate()
    trainer = Trainer(cfg, run_dir, data=data, replan=replan)
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = time.time()
    stats = trainer.train(resume=resume)
    record = {
        "steps": stats["steps"],
        "planned_steps": trainer.cfg.train.steps,
        "train_s": stats["train_s"],
        "wall_s": time.time() - start,
        "stopped_by_budget": budget_s > 0 and stats["steps"] < trainer.cfg.train.steps,
        "budget_s": budget_s,
        "sec_per_step": plan["sec_per_step"],
        "calibration_wall_s": calibration_wall_s,
        "resumed": trainer.resumed_at is not None,
        "resumed_at_step": trainer.resumed_at,
        "final_loss": stats.get("loss"),
        "params": params,
        "params_trainable": trainable,
        **({"calibrated_steps": plan["calibrated_steps"], "revisions": plan["revisions"]} if replan else {}),
        **({"best": trainer.run_dir.best_record()} if trainer.cfg.train.keep_best else {}),
    }
    del trainer, model
    gc.collect()
    reset_accelerate()
    for r in record.get("revisions", []):
        say(f"{run_dir.name}: at step {r['at_step']}, {r['sec_per_step']:.4f} s/step -> {r['steps']} steps")
    say(
        f"{run_dir.name}: trained {record['steps']} steps in {record['train_s']:.1f} s, "
        f"loss {record['final_loss'] if record['final_loss'] is not None else float('nan'):.3f}"
    )
    return record
