"""Score one trained proxy run (benchmarks/flickr8k_proxy.py) under several sampler settings.

Sampling settings need no retraining, so they are compared on one run: each ``--variant`` is a list of
``key=value`` sampler overrides (steps, method, clamp, guidance_scale, mbr, time_offset,
collapse_repeats, ...), and every variant captions the same images with the same seed. Prints one JSON
line per variant and writes them all to ``--out``::

    python benchmarks/proxy_sampler_options.py --run WORK/runs/diffusion --data /path/to/flickr8k \\
        --work WORK --split dev --max-images 300 --out sampler_options.json \\
        --variant steps=5 --variant steps=5 collapse_repeats=true --variant steps=20 method=ddpm

The features come from the benchmark's cache in ``--work`` (the same folder the benchmark used); the data
and the scoring are diffcap.experiments.proxy's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from diffcap.config import Config, ConfigError, apply_override, validate
from diffcap.experiments import proxy
from diffcap.io import write_json
from diffcap.pipeline import CaptionPipeline


def parse_variant(items: list[str]) -> dict:
    """``key=value`` sampler overrides, parsed and checked by the config's own rules (unknown keys and
    bad values are errors) -> {field: value}."""
    cfg = Config()
    try:
        for item in items:
            apply_override(cfg, f"sampler.{item}")
        validate(cfg)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from exc
    return {item.split("=", 1)[0]: getattr(cfg.sampler, item.split("=", 1)[0]) for item in items}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="a diffusion run directory of the proxy benchmark")
    p.add_argument("--data", required=True, type=Path, help="the Flickr8k folder the benchmark read")
    p.add_argument("--work", required=True, type=Path, help="the benchmark's --work folder (feature cache)")
    p.add_argument("--split", default="dev")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--variant", nargs="+", action="append", required=True, metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    ev = proxy.load_split_set(args.data, args.split, args.work, args.max_images)
    pipe = CaptionPipeline.from_pretrained(args.run)
    rows = []
    for items in args.variant:
        overrides = parse_variant(items)
        start = time.perf_counter()
        texts = pipe(ev.features, batch_size=proxy.THROUGHPUT_BATCH, **overrides).texts
        seconds = time.perf_counter() - start
        predictions = dict(zip(ev.image_ids, texts))
        metrics = proxy.score(predictions, ev.references)
        row = {
            "sampler": overrides,
            **{k: metrics[k] for k in ("CIDEr", "BLEU-4", "METEOR", "ROUGE_L")},
            "n_images": len(texts),
            "mean_words": sum(len(text.split()) for text in texts) / max(len(texts), 1),
            "captioning_s": seconds,
            "samples": texts[:3],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        write_json(args.out, {"run": str(args.run), "split": args.split, "variants": rows})
    return rows


if __name__ == "__main__":
    main()
