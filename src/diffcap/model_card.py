"""The model card (README.md) of a run directory or a saved pipeline: what the model is, what it was trained
on, how well it captions, and its full config, in the Hugging Face hub's format (YAML metadata, then
Markdown), so a run pushed to the hub as it is shows up as a documented model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from .config import Config
from .io import PathLike, atomic_output, read_jsonl_log

METRICS = ("BLEU-4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def evaluations(run_dir: Path) -> dict[str, dict]:
    """The metrics `diffcap eval` wrote into the run (RUN/eval-SPLIT/metrics.json), by folder name."""
    found = {p.parent.name: _read_json(p) for p in sorted(run_dir.glob("eval-*/metrics.json"))}
    return {name: m for name, m in found.items() if isinstance(m, dict)}


def last_validation(run_dir: Path) -> dict[str, float]:
    """The scalars of the last validation during training (val/* of logs/train.jsonl)."""
    log = run_dir / "logs" / "train.jsonl"
    records = read_jsonl_log(log) if log.is_file() else []
    for record in reversed(records):
        scores = {k: v for k, v in record.items() if k.startswith("val/") and isinstance(v, (int, float))}
        if scores:
            return {"step": record.get("step"), **scores}
    return {}


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("n/a" if value is None else str(value))


def render_model_card(cfg: Config, name: str, source: PathLike | None = None) -> str:
    """The card of a model with config ``cfg``, published as ``name``; training logs and evaluations are
    read from the run directory ``source`` when there is one."""
    m, d, t = cfg.model, cfg.data, cfg.train
    run = Path(source) if source is not None else None
    checkpoint = (_read_json(run / "checkpoint.json") or {}) if run else {}
    evals = evaluations(run) if run else {}
    validation = last_validation(run) if run else {}
    meta = ModelCardData(library_name="diffcap", pipeline_tag="image-to-text", tags=["image-captioning", m.kind])
    kind = "continuous diffusion (Diffusion-LM over word embeddings)" if m.kind == "diffusion" else "autoregressive"
    condition = f"{m.cond_tokens} x {m.cond_dim}" + (
        f" from a {m.image_encoder} on raw pixels" if m.image_encoder else ""
    )
    lines = [
        f"# {name}",
        "",
        f"An image captioner trained with diffcap: a {kind} transformer, "
        f"{m.n_layers} layers of width {m.d_model}, conditioned on {condition} features.",
        "",
        "```python",
        "from diffcap.pipeline import CaptionPipeline",
        "",
        f'pipe = CaptionPipeline.from_pretrained("{name}")',
        "texts = pipe(features).texts  # features: the encoder's output below, one item per image",
        "```",
        "",
        "## Data",
        "",
        "| | |",
        "|---|---|",
        f"| captions | `{d.captions}` (splits {d.train_split} / {d.val_split}) |",
        f"| features | `{d.features}` |",
        f"| encoder | {f'`{d.encoder}` ({d.encoder_kind})' if d.encoder else 'not recorded'} |",
        f"| caption length | {cfg.text.max_length} tokens, tokenizer {cfg.text.tokenizer} |",
        "",
        "## Training",
        "",
        f"{checkpoint.get('step', t.steps)} steps of batch {t.batch_size} (learning rate {t.lr:g} -> {t.final_lr:g}, "
        f"{t.lr_schedule}), mixed precision {t.mixed_precision}, EMA decay {t.ema_decay:g}.",
    ]
    if validation:
        scores = ", ".join(f"{k} {_number(v)}" for k, v in validation.items() if k != "step")
        lines += ["", f"Last validation (step {validation.get('step')}): {scores}."]
    lines += ["", "## Metrics", ""]
    if evals:
        lines += ["| evaluation | step | images | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 3) + "|"]
        for folder, metrics in evals.items():
            cells = [str(metrics.get("train_step", "n/a")), str(metrics.get("n_images", "n/a"))]
            cells += [_number(metrics.get(k)) for k in METRICS]
            lines.append(f"| {folder} | " + " | ".join(cells) + " |")
    else:
        lines.append("Not evaluated yet: `diffcap eval --run RUN --data DATA --split test` adds a row here.")
    s = cfg.sampler
    lines += [
        "",
        f"Captions are sampled with {s.method}, {s.steps} steps, guidance {s.guidance_scale:g}."
        if m.kind == "diffusion"
        else f"Captions are decoded with beam size {s.beam_size}.",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(cfg.to_dict(), indent=2),
        "```",
        "",
    ]
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines)).content


def write_model_card(folder: PathLike, cfg: Config, source: PathLike | None = None, name: str | None = None) -> Path:
    """Write FOLDER/README.md (atomically) and return its path; ``source`` is the run directory whose logs and
    evaluations it reports (``folder`` itself by default)."""
    folder = Path(folder)
    text = render_model_card(cfg, name or folder.name, folder if source is None else source)
    path = folder / "README.md"
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_run_card(run_dir: PathLike) -> Path:
    """(Re)write RUN/README.md from the run's config.json, training log and evaluations."""
    run_dir = Path(run_dir)
    config = run_dir / "config.json"
    return write_model_card(run_dir, Config.from_dict(json.loads(config.read_text()), str(config)))
