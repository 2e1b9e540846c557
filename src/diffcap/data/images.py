"""Reading image files, with errors that name the file (used by feature extraction and `diffcap caption`)."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError


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
