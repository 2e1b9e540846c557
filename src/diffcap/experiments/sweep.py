"""``diffcap sweep SWEEP.yaml``: train and evaluate a list (or grid) of settings on one data set.

A sweep file names the data set, a base config and the variants; see docs/experiments.md::

    name: seed_experiments
    data: ../runs/proxy_data          # a contract folder: captions.jsonl|csv + features.safetensors
    base: "{data}/proxy_diffusion.yaml"   # optional config file under every variant
    overrides: [data.val_split=dev, "text.tokenizer={data}/minilm"]
    budget_s: 90                      # equal wall time: steps are planned per variant (experiments/budget.py)
    eval: {max_images: 200, seed: 0, metrics: coco}    # or metrics: cider (no METEOR JVM)
    sampling_steps: [10, 20]
    speed: {batch: 64, batch1_captions: 5}
    variants:
      - {name: x0, config: ../configs/objective_x0.yaml}
      - name: guidance
        config: ../configs/guidance_free.yaml
        guidance: {linear: {kind: linear, steps: 300}}          # -> RUN/guidance-linear/
        samplers: {plain: {}, cfg2: {guidance_scale: 2.0},
                   clf: {classifier_scale: 1.0, classifier_path: guidance-linear}}
    grid: {diffusion.rounding_weight: [0.05, 0.5]}   # optional: one variant per combination

Relative paths are relative to the sweep file; ``{data}`` in paths and override values is replaced by
the data folder. Each variant is a normal run directory ``OUT/<name>/``; it is finished when
``OUT/<name>/result.json`` exists (written atomically, last), and a rerun skips finished variants.
Training that was stopped resumes from the run's newest checkpoint (``OUT/<name>/checkpoints/step-N/``,
see diffcap.training.rundir); a variant whose training finished (``trained.json``) is only re-evaluated.
A resumed variant is marked ``resumed: true`` (with ``resumed_at_step``) in trained.json and in the
results; its ``train_s`` (and ``wall_s``) then count only the training after the resume, not the time
spent before the stop, so its timings are not comparable with those of an uninterrupted variant
(its planned steps are: a budgeted run keeps its ``plan.json``). After every variant the table
``OUT/results.md`` and ``OUT/results.csv`` is rewritten (atomically), and with several sampling
steps and matplotlib installed, ``OUT/cider_vs_steps.png``.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, ConfigError, apply_dict, apply_override, validate
from ..io import atomic_output, write_json
from .budget import train_to_budget
from .timing import latency, throughput, tile

log = logging.getLogger(__name__)

TABLE = (
    "name",
    "sampler",
    "steps",
    "CIDEr",
    "BLEU-4",
    "METEOR",
    "ROUGE_L",
    "train_s",
    "train_steps",
    "resumed",
    "captions_per_s",
    "s_per_caption_b1",
    "settings",
)
_SWEEP_KEYS = {
    "name",
    "data",
    "base",
    "overrides",
    "budget_s",
    "eval",
    "sampling_steps",
    "speed",
    "variants",
    "grid",
    "out",
    "plot",
    "checkpoints",
}
_VARIANT_KEYS = {"name", "config", "overrides", "guidance", "samplers"}


@dataclass
class Variant:
    name: str
    config: Path | None = None
    overrides: list[str] = field(default_factory=list)
    guidance: dict[str, dict] = field(default_factory=dict)  # folder suffix -> train_guidance kwargs
    samplers: dict[str, dict] = field(default_factory=lambda: {"default": {}})  # row name -> sampler overrides


@dataclass
class Sweep:
    path: Path
    name: str
    data: Path
    base: Path | None
    overrides: list[str]
    variants: list[Variant]
    budget_s: float = 0.0
    sampling_steps: list[int] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    speed: dict = field(default_factory=dict)
    plot: bool = True
    checkpoints: int = 4  # checkpoints per run, so a stopped sweep resumes mid-run
    out: Path | None = None


def _err(path: Path, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise _err(path, f"not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise _err(path, f"expected a mapping, got {type(data).__name__}")
    return data


def _str_list(value: Any, path: Path, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _err(path, f"'{what}' must be a list of section.key=value strings")
    return list(value)


def load_sweep(path: str | Path, data: str | Path | None = None, out: str | Path | None = None) -> Sweep:
    """Read and check a sweep file (every variant's config is built once here, so errors come early)."""
    path = Path(path)
    raw = _read_yaml(path)
    unknown = set(raw) - _SWEEP_KEYS
    if unknown:
        raise _err(path, f"unknown keys {sorted(unknown)}; valid: {sorted(_SWEEP_KEYS)}")
    here = path.parent
    data_value = data if data is not None else raw.get("data")
    if not data_value:
        raise _err(path, "no 'data' folder (or pass --data)")
    data_dir = (Path(data_value) if data is not None else here / str(data_value)).resolve()

    def resolve(p: str | None) -> Path | None:
        if not p:
            return None
        p = str(p).replace("{data}", str(data_dir))
        return Path(p) if Path(p).is_absolute() else here / p

    variants = []
    for i, v in enumerate(raw.get("variants") or []):
        if not isinstance(v, dict) or "name" not in v:
            raise _err(path, f"variants[{i}] must be a mapping with a 'name'")
        bad = set(v) - _VARIANT_KEYS
        if bad:
            raise _err(path, f"variant {v['name']!r}: unknown keys {sorted(bad)}; valid: {sorted(_VARIANT_KEYS)}")
        samplers = v.get("samplers") or {"default": {}}
        guidance = v.get("guidance") or {}
        if not isinstance(samplers, dict) or not isinstance(guidance, dict):
            raise _err(path, f"variant {v['name']!r}: 'samplers' and 'guidance' must be mappings of names")
        variants.append(
            Variant(
                str(v["name"]),
                resolve(v.get("config")),
                _str_list(v.get("overrides"), path, f"{v['name']}.overrides"),
                guidance,
                samplers,
            )
        )
    grid = raw.get("grid") or {}
    if grid:
        if not isinstance(grid, dict) or not all(isinstance(vals, list) and vals for vals in grid.values()):
            raise _err(path, "'grid' must map section.key to a non-empty list of values")
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            items = [
                f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                for k, v in zip(keys, combo)
            ]
            variants.append(Variant(",".join(items), overrides=items))
    if not variants:
        raise _err(path, "no 'variants' and no 'grid'")
    names = [v.name for v in variants]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _err(path, f"duplicate variant names {dup}")
    for n in names:
        if not n or "/" in n or n.startswith("."):
            raise _err(path, f"variant name {n!r} must be a plain folder name")
    steps = raw.get("sampling_steps") or []
    if not isinstance(steps, list) or not all(isinstance(s, int) and s > 0 for s in steps):
        raise _err(path, "'sampling_steps' must be a list of positive integers")
    sweep = Sweep(
        path=path,
        name=str(raw.get("name") or path.stem),
        data=data_dir,
        base=resolve(raw.get("base")),
        overrides=_str_list(raw.get("overrides"), path, "overrides"),
        variants=variants,
        budget_s=float(raw.get("budget_s") or 0.0),
        sampling_steps=steps,
        eval=dict(raw.get("eval") or {}),
        speed=dict(raw.get("speed") or {}),
        plot=bool(raw.get("plot", True)),
        checkpoints=int(raw.get("checkpoints", 4)),
    )
    sweep.out = Path(out) if out else (resolve(raw["out"]) if raw.get("out") else Path("runs") / sweep.name)
    for v in variants:
        variant_config(sweep, v)  # fail now, not after hours of training
    return sweep


def variant_config(sweep: Sweep, variant: Variant) -> Config:
    """Defaults <- base file <- sweep overrides <- variant file <- variant overrides; data from the sweep."""
    cfg = Config()
    # a missing data folder is reported by run_sweep; loading alone (and the tests) need not have it
    captions, features = sweep.data / "captions.jsonl", sweep.data / "features.safetensors"
    if (sweep.data / "captions.csv").exists() and not captions.exists():
        captions = sweep.data / "captions.csv"
    cfg.data.captions, cfg.data.features = str(captions.resolve()), str(features.resolve())
    sub = lambda items: [s.replace("{data}", str(sweep.data.resolve())) for s in items]  # noqa: E731
    for file, overrides in ((sweep.base, sweep.overrides), (variant.config, variant.overrides)):
        if file is not None:
            if not file.is_file() and not sweep.data.is_dir():
                raise FileNotFoundError(
                    f"{sweep.data}: the data folder of {sweep.path} does not exist "
                    "(docs/experiments.md gives the command that prepares it)"
                )
            apply_dict(cfg, _read_yaml(file), str(file))
        for item in sub(overrides):
            apply_override(cfg, item)
    validate(cfg)
    bad = [s for s in sweep.sampling_steps if s > cfg.diffusion.num_timesteps]
    if bad:
        raise ConfigError(f"{sweep.path}: sampling_steps {bad} exceed diffusion.num_timesteps of {variant.name!r}")
    return cfg


# ---- one variant ---------------------------------------------------------------------------------


def _train(sweep: Sweep, variant: Variant, run_dir: Path) -> dict:
    """Plan (once), train or resume, and record the training; returns trained.json's content."""
    import json

    done = run_dir / "trained.json"
    if done.exists():
        return json.loads(done.read_text())
    trained = train_to_budget(
        variant_config(sweep, variant), sweep.budget_s, run_dir, resume=True, checkpoints=sweep.checkpoints
    )
    keys = (
        "planned_steps",
        "train_s",
        "wall_s",
        "resumed",
        "resumed_at_step",
        "final_loss",
        "params",
        "params_trainable",
    )
    record = {"train_steps": trained["steps"], **{k: trained[k] for k in keys}}
    for gname, opts in variant.guidance.items():
        from ..training.guidance import train_guidance

        record[f"guidance-{gname}"] = train_guidance(run_dir, out=f"guidance-{gname}", **opts)
    write_json(done, record)
    return record


def _evaluate(sweep: Sweep, variant: Variant, run_dir: Path, trained: dict) -> list[dict]:
    from ..evaluation.metrics import cider, coco_metrics, write_coco_results
    from ..pipeline import CaptionPipeline
    from ..training import load_training_data

    cfg = variant_config(sweep, variant)
    val = load_training_data(cfg).val
    if val is None:
        raise ConfigError(f"{cfg.data.captions}: no captions in the val split {cfg.data.val_split!r}")
    n = int(sweep.eval.get("max_images") or len(val.image_ids))
    images, feats = val.image_ids[:n], val.features[:n]
    refs = {i: val.references[i] for i in images}
    seed = int(sweep.eval.get("seed", 0))
    metric = str(sweep.eval.get("metrics", "coco"))
    batch = int(sweep.speed.get("batch", 64))
    n_b1 = int(sweep.speed.get("batch1_captions", 5))
    pipe = CaptionPipeline.from_pretrained(run_dir)
    steps_list = (sweep.sampling_steps or [pipe.cfg.sampler.steps]) if pipe.model.iterative else [None]
    settings = " ".join(variant.overrides) or (variant.config.stem if variant.config else "")
    rows = []
    for sname, sampler in variant.samplers.items():
        for steps in steps_list:
            kw = dict(sampler) | ({"steps": steps} if steps else {})
            t = time.perf_counter()
            texts = pipe(feats, seed=seed, batch_size=batch, **kw).texts
            caption_s = time.perf_counter() - t
            predictions = dict(zip(images, texts))
            write_coco_results(run_dir / "predictions" / f"{sname}_steps{steps}.json", predictions)
            if metric == "cider":
                scores = {"CIDEr": cider(predictions, refs)}
            else:
                scores = coco_metrics(predictions, refs, spice="off")
            speed = throughput(pipe, feats, batch, seed=seed, **kw)
            b1, _ = latency(pipe, tile(feats, n_b1), n_b1, seed=seed, **kw)
            rows.append(
                {
                    "name": variant.name,
                    "sampler": sname,
                    "steps": steps,
                    **{k: scores.get(k) for k in ("CIDEr", "BLEU-4", "METEOR", "ROUGE_L")},
                    "train_s": trained["train_s"],
                    "train_steps": trained["train_steps"],
                    "resumed": bool(trained.get("resumed", False)),
                    "captions_per_s": speed["captions_per_s"],
                    "s_per_caption_b1": b1,
                    "eval_images": len(images),
                    "eval_captioning_s": caption_s,
                    "speed_batch": batch,
                    "settings": (
                        settings + (" " + " ".join(f"{k}={v}" for k, v in sampler.items()) if sampler else "")
                    ).strip(),
                    "samples": [{"image_id": i, "caption": predictions[i]} for i in images[:3]],
                }
            )
    return rows


# ---- the table -----------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value).replace("|", "\\|")


def write_tables(sweep: Sweep, rows: list[dict], pending: list[str]) -> None:
    out = sweep.out
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(TABLE), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_output(out / "results.csv") as tmp:
        tmp.write_text(buf.getvalue())
    lines = [
        f"# Sweep `{sweep.name}`",
        "",
        f"Sweep file `{sweep.path}`, data `{sweep.data}`, training budget "
        f"{f'{sweep.budget_s:g} s per variant' if sweep.budget_s else 'train.steps per variant'}; "
        f"validation metrics on {rows[0]['eval_images'] if rows else '?'} images; "
        f"captions/s at batch {sweep.speed.get('batch', 64)}, s/caption at batch 1.",
        "",
        "| " + " | ".join(TABLE) + " |",
        "|---" * len(TABLE) + "|",
    ]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in TABLE) + " |" for r in rows]
    if pending:
        lines += ["", f"Not finished yet: {', '.join(pending)}"]
    with atomic_output(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    if sweep.plot and len(sweep.sampling_steps) > 1 and rows:
        plot_cider_vs_steps(rows, out / "cider_vs_steps.png")


def plot_cider_vs_steps(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if getattr(plot_cider_vs_steps, "warned", False):
            return False
        plot_cider_vs_steps.warned = True
        log.warning(
            "matplotlib is not installed: no %s (pip install 'diffcap[plot]'); the numbers are in results.csv",
            path.name,
        )
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys((r["name"], r["sampler"]) for r in rows if r["steps"]):
        pts = sorted((r["steps"], r["CIDEr"]) for r in rows if (r["name"], r["sampler"]) == key)
        label = key[0] if key[1] == "default" else f"{key[0]}/{key[1]}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("CIDEr (val)")
    ax.set_xscale("log")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


# ---- the sweep -----------------------------------------------------------------------------------


def run_sweep(
    path: str | Path, *, out: str | Path | None = None, data: str | Path | None = None, only: list[str] | None = None
) -> list[dict]:
    """Run (or resume) every variant of a sweep file; returns all result rows, in sweep order."""
    import json

    sweep = load_sweep(path, data=data, out=out)
    captions = variant_config(sweep, sweep.variants[0]).data.captions
    if not Path(captions).is_file():
        raise FileNotFoundError(
            f"{sweep.data}: no captions.jsonl or captions.csv in the data folder of {sweep.path} "
            "(docs/experiments.md gives the command that prepares it)"
        )
    if only:
        unknown = sorted(set(only) - {v.name for v in sweep.variants})
        if unknown:
            raise ConfigError(f"{sweep.path}: --only names unknown variants {unknown}")
    sweep.out.mkdir(parents=True, exist_ok=True)
    write_json(
        sweep.out / "sweep.json", {"sweep": str(sweep.path), "data": str(sweep.data), "command": " ".join(sys.argv)}
    )

    def collect() -> tuple[list[dict], list[str]]:
        rows, pending = [], []
        for v in sweep.variants:
            result = sweep.out / v.name / "result.json"
            if result.exists():
                rows += json.loads(result.read_text())["rows"]
            else:
                pending.append(v.name)
        return rows, pending

    for v in sweep.variants:
        if only and v.name not in only:
            continue
        run_dir = sweep.out / v.name
        if (run_dir / "result.json").exists():
            print(f"[sweep] {v.name}: finished, skipped", file=sys.stderr, flush=True)
            continue
        print(f"[sweep] {v.name}: training", file=sys.stderr, flush=True)
        trained = _train(sweep, v, run_dir)
        print(
            f"[sweep] {v.name}: {trained['train_steps']} steps in {trained['train_s']:.0f} s; evaluating",
            file=sys.stderr,
            flush=True,
        )
        rows = _evaluate(sweep, v, run_dir, trained)
        write_json(
            run_dir / "result.json",
            {"variant": v.name, "trained": trained, "rows": rows, "config": variant_config(sweep, v).to_dict()},
        )
        write_tables(sweep, *collect())
    rows, pending = collect()
    write_tables(sweep, rows, pending)
    print(f"[sweep] table: {sweep.out / 'results.md'} and results.csv", file=sys.stderr, flush=True)
    return rows
