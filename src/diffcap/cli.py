"""The `diffcap` command: each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path


def _data_files(data: str, run: str, features: str | None = None) -> tuple[Path, Path]:
    """A data directory of the contract: its captions.jsonl (or .csv), and the feature file ``features`` or,
    by default, the file of the name the run was trained on (DATA/patch_features.safetensors for a run
    trained on a patch grid), so the features have the shape the run expects."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data directory not found")
    captions = next((root / n for n in ("captions.jsonl", "captions.csv") if (root / n).exists()), None)
    if captions is None:
        raise FileNotFoundError(f"{root}: no captions.jsonl or captions.csv")
    if features is not None:
        path = Path(features)
        if not path.exists():
            raise FileNotFoundError(f"{path}: feature file not found")
        return captions, path
    trained_on = _trained_features(run)
    default = "features" if (root / "features").is_dir() else "features.safetensors"  # prepare's store, or one file
    path = root / (Path(trained_on).name if trained_on else default)
    if not path.exists():
        why = f" (the run was trained on {trained_on})" if trained_on else ""
        raise FileNotFoundError(f"{path}: feature file not found{why}; name the file with --features")
    return captions, path


def _trained_features(run: str) -> str:
    """The feature file a run was trained on (data.features of RUN/config.json), or "" if unknown."""
    config = Path(run) / "config.json"
    if not config.is_file():
        return ""  # loading the run reports what is missing
    try:
        return json.loads(config.read_text()).get("data", {}).get("features", "") or ""
    except (json.JSONDecodeError, AttributeError):
        return ""


def cmd_train(args) -> None:
    from .config import Config
    from .model_card import write_run_card
    from .training import Trainer

    cfg = Config.load(args.config, args.overrides)
    stats = Trainer(cfg, args.out).train(resume=not args.no_resume)
    if os.environ.get("RANK", "0") == "0":  # one process of a multi-process run writes the card
        write_run_card(args.out)
    print(json.dumps(stats))


def cmd_sample(args) -> None:
    from .data.contract import FeatureStore
    from .evaluation.metrics import write_coco_results
    from .pipeline import CaptionPipeline

    pipe = CaptionPipeline.from_pretrained(args.run, device=args.device)
    store = FeatureStore.open(args.features)
    ids = args.ids or store.ids
    features, overrides = store.get(ids), _sampler_overrides(args)
    # Only an iterative (diffusion) model has intermediate estimates; an autoregressive report shows captions alone.
    result = pipe(features, trajectory=bool(args.report) and pipe.model.iterative, **overrides)
    for image_id, text in zip(ids, result.texts):
        print(f"{image_id}\t{text}")
    if args.out:
        write_coco_results(args.out, dict(zip(ids, result.texts)))
    if args.report:
        from .evaluation.report import caption_items, write_report

        pixels = dict(zip(ids, features)) if store.spec.is_pixels else None
        items = caption_items(ids, result.texts, result.trajectories, images=pixels, limit=args.report_images)
        settings = dataclasses.asdict(pipe.sampler_config(**overrides))
        summary = {"run": str(args.run), "features": str(args.features), "images": len(ids), "sampler": settings}
        write_report(args.report, items, summary, title=f"diffcap sample: {args.run}")


def cmd_eval(args) -> None:
    from .evaluation.metrics import evaluate_run
    from .model_card import write_run_card

    captions, features = _data_files(args.data, args.run, args.features)
    out = Path(args.out) if args.out else Path(args.run) / f"eval-{args.split}"
    report = args.report_images if args.report else 0
    metrics = evaluate_run(
        args.run,
        captions,
        features,
        args.split,
        out,
        device=args.device,
        report_images=report,
        **_sampler_overrides(args),
    )
    if (Path(args.run) / "config.json").is_file():  # a run directory here (not a hub id): its card lists the result
        write_run_card(args.run)
    print(json.dumps(metrics, indent=2))


def cmd_demo(args) -> None:
    from .demo.run import QUICK, DemoSize, run_demo

    metrics = run_demo(args.out, QUICK if args.quick else DemoSize(), overrides=args.overrides)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'report.html'}")


def cmd_caption(args) -> None:
    from .captioning import caption_images

    for path, text in caption_images(args.images, args.run, device=args.device, seed=args.seed, encoder=args.encoder):
        print(f"{path}\t{text}")


def cmd_serve(args) -> None:
    from .serve.command import run

    run(args)


def cmd_prepare(args) -> None:
    from .data.prepare import fetch_from_hub, prepare

    root = args.root
    if args.from_hub:
        if args.layout != "folder":
            raise ValueError("--from-hub writes the folder layout: use `diffcap prepare folder --from-hub NAME`")
        root = fetch_from_hub(args.from_hub, root or Path(args.out) / "hub", progress=not args.no_progress)
    elif root is None:
        raise ValueError("--root is required (the folder that holds the data set)")
    summary = prepare(
        args.layout,
        root,
        args.out,
        encoder=args.encoder,
        captions=args.captions,
        condition=args.condition,
        text_encoder=args.text_encoder,
        condition_caption=args.condition_caption,
        patch_tokens=args.patch_tokens,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        device=args.device,
        dtype=args.dtype,
        workers=4 if args.workers is None and args.condition == "image" else args.workers,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
    )
    print(json.dumps(summary, indent=2))


def cmd_check_data(args) -> None:
    from .data.contract import FeatureStore

    for path in args.features:
        print(json.dumps(FeatureStore.open(path).verify()))


def cmd_join_features(args) -> None:
    from .data.sources import join_features

    index = join_features(args.sources, args.out)
    print(f"wrote {index.parent}; train on it with data.features={index.parent}")


def cmd_train_guidance(args) -> None:
    from .training.guidance import train_guidance

    record = train_guidance(
        args.run,
        kind=args.kind,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        out=args.name,
        seed=args.seed,
        d_model=args.d_model,
        n_layers=args.n_layers,
    )
    print(json.dumps(record, indent=2))
    print(
        f"wrote {Path(args.run) / args.name}; sample with sampler.classifier_scale>0 "
        f"(diffcap sample/eval --classifier-scale S --classifier-path {args.name})"
    )


def cmd_distill(args) -> None:
    from .training.distill import distill_captions

    captions, features = _data_files(args.data, args.teacher, args.features)
    overrides = {"beam_size": args.beam} if args.beam else {}
    summary = distill_captions(
        args.teacher,
        captions,
        features,
        args.out,
        split=args.split,
        keep_references=args.keep_references,
        batch_size=args.batch_size,
        device=args.device,
        captions_per_image=args.captions_per_image,
        noisy_copies=args.noisy_copies,
        condition_noise=args.condition_noise,
        seed=args.seed,
        **overrides,
    )
    print(json.dumps(summary, indent=2))
    print(f"train on it with data.captions={args.out} data.features={summary['features']}")


def cmd_diagnose(args) -> None:
    from .evaluation.diagnose import diagnose_run, markdown_table

    captions, features = _data_files(args.data, args.run, args.features)
    out = Path(args.out) if args.out else Path(args.run) / f"diagnose-{args.split}"
    rows = diagnose_run(
        args.run,
        captions,
        features,
        out,
        split=args.split,
        max_captions=args.captions,
        points=args.points,
        seed=args.seed,
        device=args.device,
    )
    print(markdown_table(rows), end="")
    print(f"wrote {out / 'recovery.json'}, recovery.md and recovery.png")


def cmd_sweep(args) -> None:
    from .experiments.sweep import run_sweep

    rows = run_sweep(args.sweep, out=args.out, data=args.data, only=args.only)
    print(f"{len(rows)} result rows")


def _sampler_overrides(args) -> dict:
    """The sampler settings given on the command line (the run's own settings hold for the rest)."""
    from .config import SamplerConfig

    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(SamplerConfig)
        if getattr(args, f.name, None) is not None
    }


def _add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """One flag per SamplerConfig field (``--time-offset`` for sampler.time_offset), defaulting to the run's."""
    from .config import CHOICES, SamplerConfig

    for f in dataclasses.fields(SamplerConfig):
        flags = [f"--{f.name.replace('_', '-')}"] + ([f.metadata["flag"]] if "flag" in f.metadata else [])
        kind = type(f.default)
        text = f"sampler.{f.name} (default: the run's)"
        if kind is bool:
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(*flags, dest=f.name, type=kind, choices=CHOICES.get(("sampler", f.name)), help=text)
    p.add_argument("--device", default="cpu")


REPORT_IMAGES = 50  # examples in an HTML report: each shows every sampling step
FEATURES_HELP = "feature file (default: DATA/ + the name of the file the run was trained on)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffcap", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a captioner")
    p.add_argument("--config", default=None, help="YAML file of overrides (defaults live in code)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run directory has a checkpoint")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=500")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="caption the items of a feature file")
    p.add_argument("--run", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--ids", nargs="*", help="image ids (default: all)")
    p.add_argument("--out", help="write COCO-format results JSON here")
    p.add_argument("--report", metavar="HTML", help="write an HTML report of how the captions formed, step by step")
    p.add_argument("--report-images", type=int, default=REPORT_IMAGES, help=f"images in it (default {REPORT_IMAGES})")
    _add_sampler_flags(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="coco-caption metrics of a run on one split")
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True, help="directory with captions.jsonl|csv and the feature file")
    p.add_argument("--features", help=FEATURES_HELP)
    p.add_argument("--split", required=True)
    p.add_argument("--out", help="output directory (default RUN/eval-SPLIT)")
    p.add_argument("--report", action="store_true", help="also OUT/report.html: metrics, and how captions formed")
    p.add_argument("--report-images", type=int, default=REPORT_IMAGES, help=f"images in it (default {REPORT_IMAGES})")
    _add_sampler_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("diagnose", help="token recovery of the x0 estimate per timestep, from x_t of true captions")
    p.add_argument("--run", required=True)
    p.add_argument("--data", required=True, help="directory with captions.jsonl|csv and the feature file")
    p.add_argument("--features", help=FEATURES_HELP)
    p.add_argument("--split", default="val")
    p.add_argument("--out", help="output directory (default RUN/diagnose-SPLIT)")
    p.add_argument("--captions", type=int, default=200, help="captions of the split measured (default 200)")
    p.add_argument("--points", type=int, default=21, help="timesteps measured, evenly from 0 to T-1 (default 21)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("demo", help="synthetic scenes, trained and captioned end to end")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--quick", action="store_true", help="a tiny run that only checks the plumbing")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the demo config")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("prepare", help="a data set on disk -> captions.jsonl + the store features/ (CLIP or text)")
    p.add_argument("layout", choices=["flickr8k", "flickr30k", "coco", "folder"])
    p.add_argument("--root", help="the data set folder (images, captions, split files)")
    p.add_argument("--out", required=True, help="data directory to write")
    p.add_argument("--encoder", default="openai/clip-vit-base-patch32", help="CLIP model id or local path")
    p.add_argument("--captions", help="folder layout: the captions file (default ROOT/captions.jsonl|csv)")
    p.add_argument("--patch-tokens", action="store_true", help="also write the patch grid to the store patch_features/")
    p.add_argument(
        "--condition",
        choices=["image", "text"],
        default="image",
        help="text: encode caption #k instead of the image (CapDec-style text-only training)",
    )
    p.add_argument("--text-encoder", help="CLIP (text tower) or sentence-transformers folder (default --encoder)")
    p.add_argument("--condition-caption", type=int, default=0, help="k: caption #k is the condition, not a target")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=None, help="images per resumable shard (default 2048)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"], help="auto: bf16/fp16 on GPU")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes (default 4)")
    p.add_argument("--skip-bad", action="store_true", help="leave out unreadable images (counted) instead of failing")
    p.add_argument("--from-hub", metavar="NAME", help="online: fetch a data set with `datasets` into ROOT first")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("check-data", help="rescan feature stores: NaN/inf, shapes, the checksums recorded at writing")
    p.add_argument("features", nargs="+", help="a features .safetensors file or a sharded store folder")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser(
        "join-features", help="several condition sources (e.g. CLIP image and text features) as one store"
    )
    p.add_argument("sources", nargs="+", help="feature stores keyed by the same image ids, equally wide")
    p.add_argument("--out", required=True, help="the joined store (a folder of shards)")
    p.set_defaults(func=cmd_join_features)

    p = sub.add_parser("train-guidance", help="train a classifier-guidance model for a diffusion run")
    p.add_argument("--run", required=True, help="trained diffusion run directory (its data files are reused)")
    p.add_argument(
        "--kind",
        choices=["linear", "transformer"],
        default="linear",
        help="linear per position, or a small transformer (the seed's two plans)",
    )
    p.add_argument("--name", default="guidance", help="folder inside the run to write (default guidance)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--d-model", type=int, default=128, help="transformer width")
    p.add_argument("--n-layers", type=int, default=2, help="transformer layers")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_guidance)

    p = sub.add_parser("distill", help="sequence-level distillation: re-caption a split with a teacher run")
    p.add_argument("--teacher", required=True, help="trained run (usually autoregressive) that writes the captions")
    p.add_argument("--data", required=True, help="directory with captions.jsonl|csv and the feature file")
    p.add_argument("--features", help=FEATURES_HELP)
    p.add_argument("--out", required=True, help="captions file to write (.jsonl or .csv)")
    p.add_argument("--split", default="train", help="split whose images get the teacher's captions")
    p.add_argument("--keep-references", action="store_true", help="keep the split's own captions as well")
    p.add_argument("--beam", type=int, help="teacher beam size (default: the teacher run's)")
    p.add_argument(
        "--captions-per-image",
        type=int,
        default=1,
        help="the best k distinct hypotheses of the teacher's beam search per image (needs --beam >= k)",
    )
    p.add_argument(
        "--noisy-copies",
        type=int,
        default=0,
        help="also caption this many noise-perturbed copies of each image's condition (needs --condition-noise); "
        "writes OUT's stem + _features.safetensors with the copies",
    )
    p.add_argument("--condition-noise", type=float, default=0.0, help="noise std per feature of the noisy copies")
    p.add_argument("--seed", type=int, default=0, help="seed of the noisy copies")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("sweep", help="run a grid of configs on one data set and tabulate the results")
    p.add_argument(
        "sweep", help="SWEEP.yaml: base config, data set, variants, sampling steps (see docs/experiments.md)"
    )
    p.add_argument("--out", help="output folder (default: the sweep file's 'out', else runs/<sweep name>)")
    p.add_argument("--data", help="data folder (default: the sweep file's 'data')")
    p.add_argument("--only", nargs="*", help="run only these variant names")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("caption", help="caption image files with a trained run")
    p.add_argument("images", nargs="+")
    p.add_argument("--run", required=True)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--encoder", help="the run's image encoder (folder or hub id; default: the run's own, from this machine only)"
    )
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("serve", help="a web page and an HTTP API that caption uploaded images with a run")
    from .serve.command import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from .config import ConfigError
    from .data.contract import DataError
    from .training.rundir import RunDirError

    try:
        args.func(args)
    except (ConfigError, DataError, RunDirError, FileNotFoundError, ValueError, FloatingPointError) as exc:
        if args.verbose:
            raise
        print(f"diffcap {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
