"""Training to a wall-time budget: the plan re-fits itself to the run's own seconds per step."""

from __future__ import annotations

import json

from conftest import small_config

import diffcap.experiments.budget as budget
from diffcap.experiments.budget import Replan, new_plan, train_to_budget


def test_replan_refits_the_steps_to_the_measured_seconds_per_step(tmp_path):
    cfg = small_config(tmp_path, steps=10)
    plan = new_plan(cfg, budget_s=100.0, sec_per_step=1.0)  # 95 steps fill 95% of 100 s
    assert (plan["steps"], plan["calibrated_steps"], plan["warmup_steps"]) == (95, 95, 9)
    replan = Replan(100.0, plan, tmp_path / "plan.json")
    replan.start(0)
    # the clock starts CALIBRATION_SKIP steps in; the first revision at a tenth of the 95 planned steps
    assert [s for s in range(300) if replan.wants(s)] == [5, 9]
    assert replan.revise(5, 6.0) == 95 and not (tmp_path / "plan.json").exists()
    # 4 steps in 2 s: 0.5 s/step, so the 95 - 8 s left hold 174 more steps
    assert replan.revise(9, 8.0) == 9 + 174
    assert json.loads((tmp_path / "plan.json").read_text())["steps"] == 183
    # the next revision is half-way through the plan as revised, not the calibrated one
    assert [s for s in range(300) if replan.wants(s)] == [5, 91]
    assert replan.revise(91, 49.0) == 183  # on plan: 0.5 s/step since the clock started
    # faster in the last part (61.25 s for 159 steps): nine tenths in, the 27.75 s left hold 72 steps
    assert [s for s in range(300) if replan.wants(s)] == [5, 164]
    assert replan.revise(164, 67.25) == 164 + 72
    assert [s for s in range(300) if replan.wants(s)] == [5]  # no revision is left
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert [(r["at_step"], r["steps"]) for r in saved["revisions"]] == [(9, 183), (91, 183), (164, 236)]
    # a resumed run starts the clock again and revises only at the points still ahead of it, on its plan
    resumed = Replan(100.0, saved, tmp_path / "plan.json")
    resumed.start(30)
    assert [s for s in range(300) if resumed.wants(s)] == [35, 118]  # half of 236
    resumed.start(120)
    assert [s for s in range(300) if resumed.wants(s)] == [125, 212]  # nine tenths of 236
    resumed.start(210)
    assert [s for s in range(300) if resumed.wants(s)] == [215]  # only its clock: no revision is ahead


def test_a_run_planned_from_a_slow_calibration_trains_its_whole_budget(feature_data, tmp_path, monkeypatch):
    """A calibration that reads ten times the real seconds per step plans a tenth of the steps; without
    the revision the run would stop there, with most of its budget unused."""
    real = budget.calibrate

    def slow_reading(cfg, data, run_dir):
        return 10 * real(cfg, data, run_dir)

    monkeypatch.setattr(budget, "calibrate", slow_reading)
    monkeypatch.setattr(budget, "CALIBRATION_STEPS", 8)
    monkeypatch.setattr(budget, "CALIBRATION_SKIP", 3)
    cfg = small_config(feature_data, steps=10)
    run = tmp_path / "run"
    record = train_to_budget(cfg, 8.0, run)
    first = record["calibrated_steps"]
    assert record["revisions"] and record["planned_steps"] > 3 * first and record["steps"] > 3 * first
    plan = json.loads((run / "plan.json").read_text())
    assert plan["steps"] == record["planned_steps"] and plan["revisions"] == record["revisions"]
    logged = [json.loads(line) for line in (run / "logs" / "train.jsonl").open()]
    if not record["stopped_by_budget"]:  # the schedule reached its end: the learning rate decayed fully
        assert abs(logged[-1]["lr"] - cfg.train.final_lr) < 1e-9
    # the run's saved settings are the revised ones, and a resume keeps them
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["steps"] == record["planned_steps"]
    again = train_to_budget(cfg, 8.0, run, resume=True)
    assert again["planned_steps"] == record["planned_steps"] and again["calibration_wall_s"] == 0.0
