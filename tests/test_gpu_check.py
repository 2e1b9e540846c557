"""benchmarks/gpu_check.py: a clear refusal where there is no GPU, and (--smoke) every check runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # no GPU, also on a machine with one
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300)


def test_without_a_gpu_it_says_so_and_measures_nothing(tmp_path):
    done = run("--out", str(tmp_path / "gpu.json"))
    assert (
        done.returncode == 2 and "no CUDA GPU is visible here" in done.stderr and "nothing was measured" in done.stderr
    )
    assert not (tmp_path / "gpu.json").exists()


def test_smoke_runs_every_check(tmp_path):
    done = run("--smoke", "--out", str(tmp_path / "gpu.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [r["precision"] for r in result["training"]] == ["bf16"] and result["training"][0]["losses_finite"]
    assert result["resume"]["max_abs_weight_diff"] == 0.0  # on the CPU a resumed run is the same run
    assert {(r["precision"], r["steps"]) for r in result["sampling"]} == {
        (p, s) for p in ("fp32", "bf16") for s in (10, 20)
    }
