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
                   seed: int | None = None) -> list[tuple[str, str]]:
    pipe = CaptionPipeline.from_pretrained(run_dir, device=device)
    if not pipe.cfg.model.image_encoder:
        raise ValueError(f"{run_dir}: this run conditions on precomputed features, not on images; "
                         "extract features for the images and use `diffcap sample`")
    size = pipe.feature_shape[-1]
    pixels = [torch.from_numpy(np.array(load_image(p, size))).permute(2, 0, 1) for p in paths]
    texts = pipe(torch.stack(pixels), seed=seed).texts
    return list(zip(paths, texts))
