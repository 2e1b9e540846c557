"""Rendering a scene: a dark, faintly textured background and anti-aliased shapes, as a uint8 array.

A pure function of the scene: the texture's randomness comes from the scene's own ``texture_seed``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .scenes import COLOURS, SIZE_RADIUS, Obj, Scene

_BACKGROUND_LEVEL = 42
_TEXTURE_AMPLITUDE = 7  # grey levels; far below the contrast of any object colour
_SUPERSAMPLE = 4  # draw large and downsample, so edges are anti-aliased and shapes read clearly


def _background(scene: Scene, size: int) -> np.ndarray:
    """A dark grey canvas with the scene's faint texture (float HxW, grey levels)."""
    rng = np.random.default_rng(scene.texture_seed)
    base = np.full((size, size), float(_BACKGROUND_LEVEL))
    if scene.texture == "noise":
        base += rng.uniform(-_TEXTURE_AMPLITUDE, _TEXTURE_AMPLITUDE, (size, size))
    elif scene.texture == "stripes":
        period = rng.uniform(5.0, 12.0)
        angle = rng.choice([0.0, 0.25, 0.5, 0.75]) * np.pi
        yy, xx = np.mgrid[0:size, 0:size]
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period
        base += _TEXTURE_AMPLITUDE * np.sin(phase + rng.uniform(0, 2 * np.pi))
    elif scene.texture != "none":
        raise ValueError(f"render: scene {scene.image_id} has unknown texture {scene.texture!r}")
    return base


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, canvas: int) -> None:
    cx, cy, r = obj.x * canvas, obj.y * canvas, SIZE_RADIUS[obj.size] * canvas
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif obj.shape == "cross":
        t = 0.34 * r  # arm half-width: thick enough to survive downsampling of small crosses
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        raise ValueError(f"render: unknown shape {obj.shape!r}")


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """Render a scene as a uint8 array of shape (size, size, 3)."""
    big = size * _SUPERSAMPLE
    grey = np.clip(np.rint(_background(scene, size)), 0, 255).astype(np.uint8)
    # Nearest upsampling then box downsampling returns the texture unchanged.
    canvas = Image.fromarray(grey).resize((big, big), Image.Resampling.NEAREST).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        _draw(draw, obj, big)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.uint8).copy()
