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
from conftest import make_feature_data, small_config
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


def test_sigkilled_training_resumes_bit_identical(tmp_path):
    """Kill a real `diffcap train` process with SIGKILL once a checkpoint exists, rerun the same
    command, and compare with an uninterrupted run: data order, RNG, EMA and LR schedule restored.
    Every source of randomness is on (model dropout, condition dropout, CapDec noise), validation
    runs in the middle, and 10 captions in batches of 2 make passes of 5 micro-batches, which
    accumulations of 3 do not divide."""
    steps = 40
    cfg = small_config(make_feature_data(tmp_path / "data", n_train=10), steps=steps)
    cfg.model.dropout, cfg.diffusion.cond_dropout, cfg.data.feature_noise_std = 0.1, 0.1, 0.1
    cfg.train.batch_size, cfg.train.grad_accum = 2, 3
    # validation right after the checkpoints of steps 10, 20, ...: a resume from one of them must not need it
    cfg.train.save_every, cfg.train.keep_checkpoints, cfg.train.eval_every, cfg.train.eval_images = 5, 2, 10, 2
    cfg.train.log_every = 1
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
    while RunDir(run).checkpoints()[-1:] < [(10,)] and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    proc.stderr.close()
    killed_at = RunDir(run).checkpoints()[-1][0]
    assert 10 <= killed_at < steps

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
    # and the logs tell the same story: each step once, the same losses, validation included
    assert log_rows(run) == log_rows(tmp_path / "full")
    assert [row["step"] for row in log_rows(run) if "val/CIDEr" in row] == [10, 20, 30, 40]


def log_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


def trained(feature_data, run: Path, steps: int, save_every: int, **train) -> Trainer:
    cfg = small_config(feature_data, steps=steps)
    cfg.train.save_every, cfg.train.log_every = save_every, 1
    for key, value in train.items():
        setattr(cfg.train, key, value)
    trainer = Trainer(cfg, run)
    trainer.train()
    return trainer


def test_nan_gradient_with_a_finite_loss_stops_before_the_update(feature_data, tmp_path):
    """A gradient hook returns NaN at the 4th backward: the loss is finite, the gradient is not."""
    run = tmp_path / "run"
    cfg = small_config(feature_data, steps=8)
    cfg.train.save_every, cfg.train.batch_size = 2, 2
    trainer = Trainer(cfg, run)
    param = next(p for p in trainer.state.model.parameters() if p.requires_grad)
    backwards, batches = [], []
    losses = trainer.state.model.training_losses

    def recording(ids, feats, **kw):  # the features of each batch, to tell which images the 4th one held
        batches.append(feats.detach().clone())
        return losses(ids, feats, **kw)

    trainer.state.model.training_losses = recording

    def poison(grad):
        backwards.append(1)
        return grad * float("nan") if len(backwards) == 4 else grad

    param.register_hook(poison)
    before = {k: v.clone() for k, v in trainer.state.model.state_dict().items()}
    with pytest.raises(FloatingPointError) as info:
        trainer.train(resume=False)
    message = str(info.value)
    stored = load_file(str(feature_data / "features.safetensors"))
    poisoned = [next(i for i, v in stored.items() if torch.equal(v, row)) for row in batches[3]]
    named = ", ".join(repr(i) for i in dict.fromkeys(poisoned))
    assert f"non-finite gradient at step 4 from a finite loss (batch of {len(set(poisoned))} image(s)" in message
    assert f"id(s): {named})" in message
    assert f"the checkpoint of step 2 is intact ({run / 'checkpoints' / 'step-000002'})" in message
    assert [s for s, _ in RunDir(run).checkpoints()] == [2]
    weights = trainer.state.model.state_dict()  # the update of step 4 never happened
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], weights[k]) for k in before)  # steps 1-3 did train
    resumed = Trainer(cfg, run)
    assert resumed.resume() and resumed.step == 2


def test_weights_that_are_not_finite_are_never_written(feature_data, tmp_path):
    trainer = trained(feature_data, tmp_path / "run", steps=2, save_every=2)
    with torch.no_grad():
        next(iter(trainer.state.ema.module.parameters()))[0] = float("inf")
    trainer.state.step = 3
    with pytest.raises(FloatingPointError, match=r"step-000003: not written, the weights of step 3 .*ema\."):
        trainer.save()
    assert [s for s, _ in RunDir(tmp_path / "run").checkpoints()] == [2]


def rewrite_checksums(folder: Path) -> None:
    """What a writer of non-finite weights with valid checksums would leave (the checksums are not at fault)."""
    from diffcap.io import file_sha256
    from diffcap.training.rundir import CHECKSUMS

    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CHECKSUMS]
    sums = {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}
    (folder / CHECKSUMS).write_text(json.dumps({"sha256": sums}))


@pytest.mark.parametrize("file", ["model.safetensors", "trainer_state/optimizer.safetensors"])
def test_checkpoint_with_non_finite_values_is_passed_over_with_a_warning(feature_data, tmp_path, caplog, file):
    from diffcap.io import save_tensors

    run = tmp_path / "run"
    trained(feature_data, run, steps=4, save_every=2)
    newest = run / "checkpoints" / "step-000004"
    tensors = load_file(str(newest / file))
    name = next(iter(tensors))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_tensors(newest / file, tensors)
    rewrite_checksums(newest)
    resumed = Trainer(small_config(feature_data, steps=4), run)
    assert resumed.resume() and resumed.step == 2
    assert "tensors that are not finite" in caplog.text and name in caplog.text
    assert (run / "checkpoints" / "unreadable-step-000004").is_dir()
    tensors_equal(run / "model.safetensors", run / "checkpoints" / "step-000002" / "model.safetensors")


def test_a_flipped_byte_is_found_by_its_checksum(feature_data, tmp_path, caplog):
    from diffcap.training.rundir import DamagedCheckpoint

    run = tmp_path / "run"
    trained(feature_data, run, steps=4, save_every=2)
    damaged = run / "checkpoints" / "step-000004" / "ema.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x01  # a low bit of the last weight: still a finite float, and still valid safetensors
    damaged.write_bytes(bytes(data))  # in place: the top-level ema.safetensors is the same file (a hard link)
    with pytest.raises(DamagedCheckpoint, match=r"ema\.safetensors: contents differ from the checksum"):
        CaptionPipeline.from_pretrained(run)
    resumed = Trainer(small_config(feature_data, steps=4), run)
    assert resumed.resume() and resumed.step == 2
    assert f"{damaged}: contents differ from the SHA-256" in caplog.text
    CaptionPipeline.from_pretrained(run)  # re-published from step 2


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_accumulation_resumes_exactly_when_the_passes_do_not_divide(tmp_path, dropout):
    """10 captions in batches of 2 make passes of 5 micro-batches; with grad_accum 3 Accelerate ends an
    accumulation at the end of each pass, so step k has not consumed 3k micro-batches."""
    data = make_feature_data(tmp_path / "data", n_train=10)

    def config(steps):
        cfg = small_config(data, steps=steps)
        cfg.train.batch_size, cfg.train.grad_accum, cfg.train.save_every = 2, 3, 4
        cfg.model.dropout, cfg.diffusion.cond_dropout = dropout, 0.1
        return cfg

    Trainer(config(8), tmp_path / "full").train(resume=False)
    Trainer(config(4), tmp_path / "resumed").train(resume=False)
    state = json.loads(
        (tmp_path / "resumed" / "checkpoints" / "step-000004" / "trainer_state" / "state.json").read_text()
    )
    assert state["micro_batches"] == 10  # 3 + 2 (end of the first pass) + 3 + 2
    Trainer(config(8), tmp_path / "resumed").train()
    for name in ("model.safetensors", "ema.safetensors"):
        tensors_equal(tmp_path / "resumed" / name, tmp_path / "full" / name)


def lr_at(run: Path, step: int) -> float:
    rows = [json.loads(line) for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    return next(r["lr"] for r in rows if r["step"] == step and "lr" in r)


def test_resume_applies_a_new_learning_rate_and_step_count(feature_data, tmp_path):
    from diffcap.training.trainer import lr_lambda

    run = tmp_path / "run"
    trained(feature_data, run, steps=4, save_every=4, lr=0.001)
    trainer = trained(feature_data, run, steps=8, save_every=4, lr=0.1)
    assert trainer.step == 8
    assert lr_at(run, 4) == pytest.approx(0.001 * lr_lambda(trainer.cfg.train)(4))
    assert lr_at(run, 8) == pytest.approx(0.1 * lr_lambda(trainer.cfg.train)(8))
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 0.1  # what was used, so no lie


def test_resume_refuses_settings_it_cannot_apply_naming_them(feature_data, tmp_path):
    from diffcap.config import ConfigError

    run = tmp_path / "run"
    trained(feature_data, run, steps=2, save_every=2)
    cfg = small_config(feature_data, steps=4)
    cfg.model.n_layers, cfg.train.seed = 3, 5
    with pytest.raises(ConfigError) as info:
        Trainer(cfg, run).train()
    message = str(info.value)
    assert "model.n_layers was 2, now 3" in message and "train.seed was 0, now 5" in message
    assert "--no-resume" in message and "a new --out" in message
    Trainer(cfg, run).train(resume=False)  # starting afresh is what the message offers


def test_resume_at_or_past_the_planned_steps_says_so(feature_data, tmp_path, caplog):
    run = tmp_path / "run"
    trained(feature_data, run, steps=4, save_every=4)
    trainer = trained(feature_data, run, steps=3, save_every=4)
    assert trainer.step == 4
    assert f"{run}: already trained to step 4, so train.steps=3 trains nothing" in caplog.text


def test_logs_after_a_resume_hold_each_step_once(feature_data, tmp_path):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    trained(feature_data, run, steps=6, save_every=4)
    shutil.rmtree(run / "checkpoints" / "step-000006")  # as if killed after logging steps 5 and 6
    trained(feature_data, run, steps=8, save_every=4)
    steps = [json.loads(line)["step"] for line in (run / "logs" / "train.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    events = EventAccumulator(str(run / "logs" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))


def test_a_log_line_torn_by_a_kill_is_dropped_on_resume(feature_data, tmp_path, caplog):
    from diffcap.model_card import last_validation

    run = tmp_path / "run"
    trained(feature_data, run, steps=2, save_every=2, eval_every=2, eval_images=2)
    log = run / "logs" / "train.jsonl"
    with log.open("a") as f:
        f.write('{"step": 3, "train/lo')  # killed mid-write: no closing brace, no newline
    assert last_validation(run)["step"] == 2
    trained(feature_data, run, steps=4, save_every=2)
    assert "train.jsonl: dropped its last line, cut short by an interrupted write" in caplog.text
    assert [row["step"] for row in log_rows(run) if "train/loss" in row] == [1, 2, 3, 4]
    log.write_text(log.read_text().replace('"step": 2', '"step": 2,,', 1))  # a bad line that is not the last
    with pytest.raises(ValueError, match=r"train.jsonl:\d+: not a JSON record"):
        last_validation(run)


def test_a_rerun_after_a_kill_before_the_first_checkpoint_starts_its_logs_afresh(feature_data, tmp_path):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    trained(feature_data, run, steps=2, save_every=2)
    shutil.rmtree(run / "checkpoints")  # as if killed after logging steps 1 and 2, before any checkpoint
    trained(feature_data, run, steps=2, save_every=2)  # finds no checkpoint, so trains from step 0
    assert [row["step"] for row in log_rows(run)] == [1, 2]
    events = EventAccumulator(str(run / "logs" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]  # the killed run's events are hidden

    shutil.rmtree(run / "checkpoints")
    cfg = small_config(feature_data, steps=2)
    cfg.train.log_every = 1
    Trainer(cfg, run).train(resume=False)  # starting over keeps the old logs aside
    aside = list(tmp_path.glob("run/logs.replaced-*"))
    assert len(aside) == 1 and len((aside[0] / "train.jsonl").read_text().splitlines()) == 2
    assert [row["step"] for row in log_rows(run)] == [1, 2]


def test_a_second_trainer_on_the_same_directory_is_refused(feature_data, tmp_path):
    from diffcap.training.rundir import RunDirError

    run = tmp_path / "run"
    holder = RunDir(run)
    holder.lock()
    try:
        with pytest.raises(RunDirError, match=rf"another training run is using this directory \(pid {os.getpid()} on"):
            Trainer(small_config(feature_data, steps=2), run).train()
    finally:
        holder.unlock()
    Trainer(small_config(feature_data, steps=2), run).train()  # free again


def test_a_validation_cut_short_by_a_kill_is_redone_on_resume(feature_data, tmp_path):
    run = tmp_path / "run"
    trained(feature_data, run, steps=4, save_every=4, eval_every=4, eval_images=2)
    log = run / "logs" / "train.jsonl"
    rows = log.read_text().splitlines()
    log.write_text("".join(line + "\n" for line in rows if "val/CIDEr" not in line))  # killed while validating
    trained(feature_data, run, steps=6, save_every=4, eval_every=4, eval_images=2)
    assert [row["step"] for row in log_rows(run) if "val/CIDEr" in row] == [4, 6]


def test_resume_with_another_number_of_processes_is_refused(feature_data, tmp_path):
    from diffcap.config import ConfigError

    run = tmp_path / "run"
    trained(feature_data, run, steps=2, save_every=2)
    trainer = Trainer(small_config(feature_data, steps=4), run)
    trainer.state.processes = 2  # as under `accelerate launch --num_processes 2`
    with pytest.raises(ConfigError, match=r"step-000002: trained by 1 process\(es\), resumed by 2"):
        trainer.resume()


def test_a_run_directory_is_validated_when_loaded(feature_data, tmp_path):
    from diffcap.config import ConfigError

    run = tmp_path / "run"
    trained(feature_data, run, steps=2, save_every=2)
    saved = json.loads((run / "config.json").read_text())
    for section, key, value in [("sampler", "mbr", 1000000), ("sampler", "method", "bogus")]:
        (run / "config.json").unlink()  # a hard link to the checkpoint's: replace it, do not write through it
        (run / "config.json").write_text(json.dumps(saved | {section: saved[section] | {key: value}}))
        with pytest.raises(ConfigError, match=rf"config.json: .*sampler.{key}"):
            RunDir(run).load_model()
