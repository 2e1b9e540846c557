"""Captioning image files with a trained run: the run's own image encoder, then its pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.images import load_image
from .pipeline import CaptionPipeline


def caption_images(
    paths: list[str],
    run_dir: str | Path,
    *,
    device: str = "cpu",
    seed: int | None = None,
    batch_size: int = 64,
    encoder: str | None = None,
) -> list[tuple[str, str]]:
    """Caption image files: the run's image encoder (the demo's CNN, or the frozen CLIP the run's
    features came from), then its sampler. Every unreadable file is an error that names it.

    A run directory is input like any other file, so the encoder its config names is read only from
    this machine (a folder, or the Hugging Face cache), never downloaded; ``encoder`` is the caller's
    own choice of the same encoder (a folder or a hub id, which may be downloaded)."""
    pipe = CaptionPipeline.from_pretrained(run_dir, device=device)
    if pipe.cfg.model.image_encoder:
        size = pipe.feature_shape[-1]
        pixels = [torch.from_numpy(np.array(load_image(p, size))).permute(2, 0, 1) for p in paths]
        texts = pipe(torch.stack(pixels), seed=seed).texts
        return list(zip(paths, texts))
    data = pipe.cfg.data
    if data.encoder_kind not in ("clip-image", "clip-text") or not data.encoder:
        kind = f"{data.encoder_kind} features from {data.encoder}" if data.encoder else "features of unknown origin"
        raise ValueError(
            f"{run_dir}: this run was trained on {kind}, so it cannot encode images; "
            "extract features for the images and use `diffcap sample`"
        )
    from .data.encoders import ClipImageEncoder

    # A clip-text run (CapDec) captions images with the image tower of the same CLIP: the two towers
    # share one embedding space.
    patches = pipe.cfg.model.cond_tokens > 1
    if patches and data.encoder_kind == "clip-text":
        raise ValueError(f"{run_dir}: a text-conditioned run has pooled features only")
    try:
        clip = ClipImageEncoder(
            encoder or data.encoder, device=device, patch_tokens=patches, local_files_only=not encoder
        )
    except ValueError as exc:
        if encoder:
            raise
        raise ValueError(
            f"{run_dir}: the encoder its config names, {data.encoder!r}, is not on this machine, and what a run "
            f"directory names is not downloaded; pass --encoder {data.encoder} to fetch it ({exc})"
        ) from exc
    texts: list[str] = []
    for start in range(0, len(paths), batch_size):
        images = [load_image(p) for p in paths[start : start + batch_size]]
        features = clip.encode_images(images)["patches" if patches else "pooled"]
        texts += pipe(features, seed=seed).texts
    return list(zip(paths, texts))
