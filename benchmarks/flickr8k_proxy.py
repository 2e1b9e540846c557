"""Flickr8k proxy benchmark: diffusion vs autoregressive captioning, conditioned on a sentence embedding.

Each Flickr8k image is represented by the all-MiniLM-L6-v2 embedding of its caption #0 (what
``diffcap prepare flickr8k --condition text`` writes); the captioners learn captions #1-#4 of the
official train split and are scored against captions #1-#4 of ``--split``. Methods: ``human`` (caption
#0 itself), ``retrieval`` (nearest training image), ``autoregressive`` and ``diffusion`` (trained by
sequence-level distillation from an autoregressive teacher), the neural ones for the same wall-time
budget. The library code, and why it is built this way, is diffcap.experiments.proxy.

Usage::

    python benchmarks/flickr8k_proxy.py --data /path/to/flickr8k --split dev --out results.json

writes ``results.json`` and ``results.md`` (the Markdown table that is also printed). See ``--help``
for the budget, cache folder, method subset and config overrides.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from diffcap.config import ConfigError  # noqa: E402
from diffcap.data.contract import DataError  # noqa: E402
from diffcap.experiments.proxy import (  # noqa: E402
    DISTILL_BEAM,
    DISTILL_CAPTIONS,
    DISTILL_CONDITION_NOISE,
    DISTILL_SHARE,
    METHODS,
    TEACHER_SETTINGS,
    ProxyOptions,
    run_proxy,
)


def _split_list(values: Sequence[str]) -> list[str]:
    return [v for item in values for v in item.split(",") if v]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", required=True, type=Path, help="Flickr8k folder: captions.txt, Flickr_8k.*Images.txt")
    p.add_argument("--split", default="dev", help="split to score: Flickr_8k.{SPLIT}Images.txt (default dev)")
    p.add_argument("--eval-data", type=Path, default=None, help="score this folder's split instead (default --data)")
    p.add_argument("--out", type=Path, help="results.json to write (results.md goes next to it)")
    p.add_argument(
        "--prepare-only",
        type=Path,
        default=None,
        metavar="DIR",
        help="only write the proxy data set (train + --split) to DIR for `diffcap sweep`, then stop",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="cache: prepared data (captions.jsonl, features.safetensors) and run dirs "
        "(default: a 'work' folder next to --out)",
    )
    p.add_argument("--budget-min", type=float, default=12.0, help="training wall time per model, minutes")
    p.add_argument("--methods", nargs="+", default=[",".join(METHODS)], help=f"subset of {','.join(METHODS)}")
    p.add_argument("--max-eval-images", type=int, default=None, help="score the first N images of the split")
    p.add_argument(
        "--diffusion-set",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for the diffusion captioner, e.g. model.n_layers=6",
    )
    p.add_argument(
        "--ar-set",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for the autoregressive captioner (and the distillation teacher)",
    )
    p.add_argument(
        "--teacher-set",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for the distillation teacher only, after --ar-set and the teacher's defaults "
        f"({' '.join(TEACHER_SETTINGS)} up to 24 minutes of --budget-min, none beyond)",
    )
    p.add_argument(
        "--distill-share",
        type=float,
        default=DISTILL_SHARE,
        help="share of the diffusion budget that trains an autoregressive teacher, whose captions of "
        "the training images the diffusion captioner then learns (0: train on the references)",
    )
    p.add_argument("--distill-beam", type=int, default=DISTILL_BEAM, help="beam size of the teacher's captions")
    p.add_argument(
        "--distill-captions",
        type=int,
        default=DISTILL_CAPTIONS,
        help="teacher captions per training image: the best k distinct hypotheses of its beam (k <= beam)",
    )
    p.add_argument(
        "--distill-noisy-copies",
        type=int,
        default=None,
        help="the teacher also captions this many noise-perturbed copies of each training condition "
        "(default: one per 12 minutes of --budget-min beyond the first 12: none at 12, 2 at 36)",
    )
    p.add_argument(
        "--distill-condition-noise",
        type=float,
        default=DISTILL_CONDITION_NOISE,
        help="noise std per feature of those copies (the conditions are unit-norm MiniLM embeddings)",
    )
    p.add_argument(
        "--validate-images",
        type=int,
        default=None,
        help="hold out the last N training images; each method (and the teacher) validates on them every tenth of "
        "its planned steps and keeps its best weights (default: none up to 24 minutes of --budget-min, 300 beyond)",
    )
    p.add_argument("--steps-list", nargs="+", default=["1,2,3,5,10,20,50"], help="diffusion sampling steps to sweep")
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
    if not 1 <= args.distill_captions <= args.distill_beam:
        p.error("--distill-captions must be in 1..--distill-beam")
    if (args.distill_noisy_copies or 0) < 0 or args.distill_condition_noise <= 0:
        p.error("--distill-noisy-copies must be >= 0 and --distill-condition-noise positive")
    if (args.validate_images or 0) < 0:
        p.error("--validate-images must be >= 0")
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
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/flickr8k_proxy.py", *(sys.argv[1:] if argv is None else argv)])
    return run_proxy(
        ProxyOptions(
            data=args.data,
            out=args.out,
            work=args.work,
            split=args.split,
            eval_data=args.eval_data,
            prepare_only=args.prepare_only,
            budget_min=args.budget_min,
            methods=args.methods,
            max_eval_images=args.max_eval_images,
            diffusion_set=args.diffusion_set,
            ar_set=args.ar_set,
            teacher_set=args.teacher_set,
            distill_share=args.distill_share,
            distill_beam=args.distill_beam,
            distill_captions=args.distill_captions,
            distill_noisy_copies=args.distill_noisy_copies,
            distill_condition_noise=args.distill_condition_noise,
            validate_images=args.validate_images,
            steps_list=args.steps_list,
            command=command,
        )
    )


if __name__ == "__main__":
    try:
        main()
    except (DataError, ConfigError) as exc:
        sys.exit(f"error: {exc}")
