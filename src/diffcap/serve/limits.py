"""What an upload may be: size in bytes and pixels, image formats, text length. Every check raises
:class:`InputError` with the HTTP status the API answers and a message that names the problem.

Pixels are checked on the header alone (PIL's lazy open reads the size without decoding), so a small
file that declares a huge image never gets its pixels allocated.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

DEFAULT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class InputError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status of the answer."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    max_bytes: int = 10 * 2**20  # an upload's size (the whole request body of the API)
    max_pixels: int = 40_000_000  # width x height, read from the header before decoding
    max_side: int = 10_000  # the longer side: a 1 x 300000 strip is small in pixels but no photo
    formats: tuple[str, ...] = DEFAULT_FORMATS  # PIL format names
    max_text_chars: int = 2000  # a condition sentence for a text-conditioned run
    timeout_s: float = 60.0  # from arrival to answer; past it the answer is 503
    max_queue: int = 256  # requests waiting for the network; past it the answer is 503

    def describe(self) -> dict:
        return {
            "max_bytes": self.max_bytes,
            "max_pixels": self.max_pixels,
            "max_side": self.max_side,
            "formats": list(self.formats),
            "max_text_chars": self.max_text_chars,
            "timeout_s": self.timeout_s,
            "max_queue": self.max_queue,
        }


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Bytes of an uploaded file -> an RGB image, or InputError saying what is wrong with them."""
    if not data:
        raise InputError("the uploaded image file is empty")
    if len(data) > limits.max_bytes:
        raise InputError(
            f"the upload is larger than the upload limit of {limits.max_bytes} bytes (--max-upload-mb)", 413
        )
    accepted = ", ".join(limits.formats)
    # Pillow warns above its own pixel limit and raises far above it; both are refusals here.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=list(limits.formats))
        except UnidentifiedImageError:
            raise InputError(f"the upload is not an image in an accepted format ({accepted})", 415) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning, OSError, ValueError) as exc:
            raise InputError(f"the image header cannot be read ({exc})") from None
        width, height = img.size
        if width < 1 or height < 1:
            raise InputError(f"the image is {width} x {height} pixels: it has no pixels")
        if max(width, height) > limits.max_side:
            raise InputError(
                f"the image is {width} x {height} pixels: a side is longer than the limit of "
                f"{limits.max_side} (--max-side)",
                413,
            )
        if width * height > limits.max_pixels:
            raise InputError(
                f"the image is {width} x {height} = {width * height} pixels, more than the limit "
                f"of {limits.max_pixels} (--max-pixels)",
                413,
            )
        try:
            img.load()
            return img.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"the image is too large to decode ({exc})", 413) from None
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data (SyntaxError: PIL's parsers)
            raise InputError(f"the image data is truncated or corrupt ({exc})") from None


def check_text(text: object, limits: Limits) -> str:
    if not isinstance(text, str):
        raise InputError(f"'text' must be a string, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise InputError("the text is empty: send the sentence to caption from")
    if len(text) > limits.max_text_chars:
        raise InputError(
            f"the text has {len(text)} characters, more than the limit of {limits.max_text_chars} (--max-text-chars)",
            413,
        )
    return text
