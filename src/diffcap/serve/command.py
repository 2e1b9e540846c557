"""The flags of `diffcap serve` and the call they make (kept here so cli.py needs no serve imports)."""

from __future__ import annotations

import argparse

from PIL import Image

from .limits import DEFAULT_FORMATS, Limits


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = Limits()
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.add_argument("--run", required=True, default=argparse.SUPPRESS, help="trained run directory (e.g. demo_out/run)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--max-batch", type=int, default=16, help="most requests captioned in one call; 1 = no batching")
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=5.0,
        help="how long the first request of a batch waits for others to join it",
    )
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting at most; past it 503")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds a request may take; past it 503")
    p.add_argument("--max-upload-mb", type=float, default=d.max_bytes / 2**20, help="largest upload in MiB")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, help="largest image (width x height)")
    p.add_argument("--max-side", type=int, default=d.max_side, help="longest image side in pixels")
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help="accepted image formats (PIL names)")
    p.add_argument(
        "--max-text-chars", type=int, default=d.max_text_chars, help="longest sentence for a text-conditioned run"
    )
    p.add_argument("--no-page", action="store_true", help="serve the HTTP API only, without the web page")


def run(args: argparse.Namespace) -> None:
    if args.max_batch < 1 or args.max_queue < 1 or args.batch_wait_ms < 0 or args.timeout <= 0:
        raise ValueError("--max-batch and --max-queue must be >= 1, --batch-wait-ms >= 0, --timeout > 0")
    formats = tuple(f.strip().upper() for f in args.formats.split(",") if f.strip())
    Image.init()
    if not formats or (unknown := [f for f in formats if f not in Image.ID]):
        raise ValueError(
            f"--formats: unknown to PIL: {', '.join(unknown or ['(none given)'])}; "
            f"for example {','.join(DEFAULT_FORMATS)}"
        )
    limits = Limits(
        max_bytes=int(args.max_upload_mb * 2**20),
        max_pixels=args.max_pixels,
        max_side=args.max_side,
        formats=formats,
        max_text_chars=args.max_text_chars,
        timeout_s=args.timeout,
        max_queue=args.max_queue,
    )
    try:
        from .app import serve
    except ImportError as exc:
        raise ValueError(f'diffcap serve needs the serve extra: pip install -e ".[serve]" ({exc})') from None
    serve(
        args.run,
        host=args.host,
        port=args.port,
        device=args.device,
        limits=limits,
        max_batch=args.max_batch,
        max_wait_ms=args.batch_wait_ms,
        page=not args.no_page,
    )
