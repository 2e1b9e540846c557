"""Reading user image files for captioning, with errors that name the file."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .pipeline import CaptionPipeline


class ImageError(ValueError):
    pass


def load_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Open and fully decode an image as RGB, optionally resized to size x size.

    Pillow raises DecompressionBombError for images far above its pixel limit and warns for those
    just above it; both become errors here, so a hostile file cannot exhaust memory.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = img.convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from exc
    except OSError as exc:  # truncated or corrupt data
        raise ImageError(f"{path}: corrupt image ({exc})") from exc
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


def caption_images(paths: list[str], run_dir: str | Path, *, device: str = "cpu",
                   seed: int | None = None, batch_size: int = 64) -> list[tuple[str, str]]:
    """Caption image files: the run's image encoder (the demo's CNN, or the frozen CLIP the run's
    features came from), then its sampler. Every unreadable file is an error that names it."""
    pipe = CaptionPipeline.from_pretrained(run_dir, device=device)
    if pipe.cfg.model.image_encoder:
        size = pipe.feature_shape[-1]
        pixels = [torch.from_numpy(np.array(load_image(p, size))).permute(2, 0, 1) for p in paths]
        texts = pipe(torch.stack(pixels), seed=seed).texts
        return list(zip(paths, texts))
    data = pipe.cfg.data
    if data.encoder_kind not in ("clip-image", "clip-text") or not data.encoder:
        kind = f"{data.encoder_kind} features from {data.encoder}" if data.encoder else "features of unknown origin"
        raise ValueError(f"{run_dir}: this run was trained on {kind}, so it cannot encode images; "
                         "extract features for the images and use `diffcap sample`")
    from .data.features import ClipImageEncoder

    # A clip-text run (CapDec) captions images with the image tower of the same CLIP: the two towers
    # share one embedding space.
    patches = pipe.cfg.model.cond_tokens > 1
    if patches and data.encoder_kind == "clip-text":
        raise ValueError(f"{run_dir}: a text-conditioned run has pooled features only")
    encoder = ClipImageEncoder(data.encoder, device=device, patch_tokens=patches)
    texts: list[str] = []
    for start in range(0, len(paths), batch_size):
        images = [load_image(p) for p in paths[start:start + batch_size]]
        features = encoder.encode_images(images)["patches" if patches else "pooled"]
        texts += pipe(features, seed=seed).texts
    return list(zip(paths, texts))
