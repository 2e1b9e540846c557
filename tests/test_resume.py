"""Checkpoints never lost or corrupt: the last N kept, each complete before visible; a run killed with
SIGKILL resumes from the newest complete one and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_config
from safetensors.torch import load_file

import diffcap
from diffcap.pipeline import CaptionPipeline
from diffcap.training import Trainer
from diffcap.training.rundir import RunDir


def cli_env() -> dict[str, str]:
    """Environment for `python -m diffcap.cli` subprocesses: this checkout's sources, one thread
    (bit-identical results need the same thread count as the in-process run)."""
    src = str(Path(diffcap.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def tensors_equal(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for name in x:
        assert torch.equal(x[name], y[name]), f"{a.name}: {name} differs"


def test_last_n_checkpoints_kept_and_published(feature_data, tmp_path):
    cfg = small_config(feature_data, steps=6)
    cfg.train.save_every, cfg.train.keep_checkpoints = 1, 2
    Trainer(cfg, tmp_path / "run").train(resume=False)
    run = tmp_path / "run"
    assert [s for s, _ in RunDir(run).checkpoints()] == [5, 6]
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 6
    for name in ("model.safetensors", "ema.safetensors"):
        tensors_equal(run / name, run / "checkpoints" / "step-000006" / name)
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    CaptionPipeline.from_pretrained(run)  # the top level stays a complete run directory


def test_interrupted_save_leaves_previous_checkpoint_and_resume_cleans_up(feature_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = small_config(feature_data, steps=4)
    cfg.train.save_every = 2
    trainer = Trainer(cfg, run)
    calls = []
    real = diffcap.training.rundir.save_optimizer

    def dies_on_second_save(optimizer, directory):
        calls.append(directory)
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for a kill in the middle of writing step 4
        real(optimizer, directory)

    monkeypatch.setattr(diffcap.training.rundir, "save_optimizer", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(resume=False)
    assert [s for s, _ in RunDir(run).checkpoints()] == [2]
    # what a SIGKILL (no cleanup at all) would leave: a hidden temporary folder
    (run / "checkpoints" / ".step-000004.deadbeef.tmp").mkdir()
    (run / "checkpoints" / ".step-000004.deadbeef.tmp" / "model.safetensors").write_bytes(b"partial")
    resumed = Trainer(small_config(feature_data, steps=4), run)
    assert resumed.resume() and resumed.step == 2
    assert not list((run / "checkpoints").glob(".*"))


def test_unreadable_newest_checkpoint_falls_back_with_a_warning(feature_data, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = small_config(feature_data, steps=4)
    cfg.train.save_every = 2
    Trainer(cfg, run).train(resume=False)
    newest = run / "checkpoints" / "step-000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    resumed = Trainer(small_config(feature_data, steps=4), run)
    assert resumed.resume() and resumed.step == 2
    assert str(newest) in caplog.text and "unreadable checkpoint" in caplog.text
    # set aside under a name that is neither listed nor pruned, with a warning naming it
    aside = run / "checkpoints" / "unreadable-step-000004"
    assert aside.is_dir() and str(aside) in caplog.text
    assert [s for s, _ in RunDir(run).checkpoints()] == [2]
    older = run / "checkpoints" / "step-000002" / "model.safetensors"
    older.write_bytes(b"")
    from diffcap.training.rundir import RunDirError

    with pytest.raises(RunDirError, match=r"no readable checkpoint.*step-000002"):
        Trainer(small_config(feature_data, steps=4), run).resume()
    assert older.parent.is_dir()  # with nothing readable, nothing is moved: the user decides


def test_nan_after_a_fallback_names_the_checkpoint_loaded(feature_data, tmp_path):
    run = tmp_path / "run"
    cfg = small_config(feature_data, steps=4)
    cfg.train.save_every, cfg.train.keep_checkpoints = 2, 2
    Trainer(cfg, run).train(resume=False)
    newest = run / "checkpoints" / "step-000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])
    cfg = small_config(feature_data, steps=6)
    cfg.train.save_every, cfg.train.keep_checkpoints = 100, 2
    trainer = Trainer(cfg, run)
    real = trainer.state.model.training_losses

    def poisoned(ids, feats, **kw):
        terms = real(ids, feats, **kw)
        return terms | {"loss": terms["loss"] * float("nan")}

    trainer.state.model.training_losses = poisoned
    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    message = str(info.value)
    assert "non-finite loss at step 3" in message
    assert f"the checkpoint of step 2 is intact ({run / 'checkpoints' / 'step-000002'})" in message


def test_atomic_directory_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    from diffcap import io

    target = tmp_path / "tokenizer"
    target.mkdir()
    (target / "vocab.txt").write_text("old")
    real, calls = os.replace, []

    def fails_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old folder is aside; renaming the new one in fails
            raise OSError("disk gone")
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", fails_second)
    with pytest.raises(OSError, match="disk gone"):
        with io.atomic_directory(target) as tmp:
            (tmp / "vocab.txt").write_text("new")
    monkeypatch.undo()
    assert (target / "vocab.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer"]


def test_remove_partial_renames_back_a_folder_left_aside(tmp_path):
    from diffcap.io import remove_partial

    # a kill between "old folder aside" and "new folder in": the aside folder is the only copy
    aside = tmp_path / ".tokenizer.0123abcd.old.tmp"
    aside.mkdir()
    (aside / "vocab.txt").write_text("only copy")
    (tmp_path / ".tokenizer.89ab.tmp").mkdir()  # the unfinished new folder
    # an aside folder whose replacement did land is garbage
    (tmp_path / "model").mkdir()
    (tmp_path / ".model.4567.old.tmp").mkdir()
    removed = remove_partial(tmp_path)
    assert (tmp_path / "tokenizer" / "vocab.txt").read_text() == "only copy"
    assert sorted(p.name for p in removed) == [".model.4567.old.tmp", ".tokenizer.89ab.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "tokenizer"]


def test_sigkilled_training_resumes_bit_identical(feature_data, tmp_path):
    """Kill a real `diffcap train` process with SIGKILL once a checkpoint exists, rerun the same
    command, and compare with an uninterrupted run: data order, RNG, EMA and LR schedule restored."""
    steps = 80
    cfg = small_config(feature_data, steps=steps)
    cfg.train.save_every, cfg.train.keep_checkpoints = 5, 2
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(cfg, tmp_path / "full").train(resume=False)
    finally:
        torch.set_num_threads(threads)

    run = tmp_path / "killed"
    command = [sys.executable, "-m", "diffcap.cli", "train", "--config", str(config), "--out", str(run)]
    proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not RunDir(run).checkpoints() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    killed_at = RunDir(run).checkpoints()[-1][0]
    assert killed_at < steps

    out = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["steps"] == steps
    for name in ("model.safetensors", "ema.safetensors"):
        tensors_equal(run / name, tmp_path / "full" / name)
    assert [s for s, _ in RunDir(run).checkpoints()] == [steps - 5, steps]
    # the optimizer and schedule states match too, so training could go on identically
    a = json.loads((run / "checkpoints" / f"step-{steps:06d}" / "trainer_state" / "state.json").read_text())
    b = json.loads(
        (tmp_path / "full" / "checkpoints" / f"step-{steps:06d}" / "trainer_state" / "state.json").read_text()
    )
    assert a["scheduler"] == b["scheduler"] and a["step"] == b["step"] == steps
