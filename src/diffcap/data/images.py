"""Reading image files, with errors that name the file (used by feature extraction and `diffcap caption`)."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    pass


# The formats photos come in. Pillow would otherwise try every plugin it has, EPS among them, whose
# decoder runs Ghostscript on the file.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Bounds checked from the header, before decoding. Pillow's pixel limit bounds the area only; a
# 1 x 300000 strip is small, but an encoder that resizes the short side to 224 would make it
# 224 x 67 million. A panorama is about 10:1.
MAX_SIDE = 20000
MAX_ASPECT = 20


def load_image(path: str | Path, size: int | None = None) -> Image.Image:
    """Open and fully decode an image as RGB, upright (its EXIF orientation applied, as phones record
    it), optionally resized to size x size.

    Pillow raises DecompressionBombError for images far above its pixel limit and warns for those
    just above it; both become errors here, so a hostile file cannot exhaust memory, and so does a
    side over MAX_SIDE or an aspect ratio over MAX_ASPECT.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as img:
                _check_shape(path, *img.size)
                img.load()
                img = ImageOps.exif_transpose(img).convert("RGB")
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{path}: not a readable image ({exc})") from exc
    except OSError as exc:  # truncated or corrupt data
        raise ImageError(f"{path}: corrupt image ({exc})") from exc
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    return img


def _check_shape(path: Path, width: int, height: int) -> None:
    if min(width, height) < 1 or max(width, height) > MAX_SIDE or max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageError(
            f"{path}: {width} x {height} pixels is outside what can be captioned "
            f"(sides up to {MAX_SIDE}, aspect ratio up to {MAX_ASPECT}:1)"
        )
