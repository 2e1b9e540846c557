"""A line chart as a PNG, drawn with Pillow (a core dependency), so that a diagnosis always comes with its
plot; matplotlib stays an optional extra (`diffcap[plot]`) that only `diffcap sweep` uses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..io import PathLike, atomic_output

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")
WIDTH, HEIGHT, MARGIN = 640, 400, 56


def line_chart(
    path: PathLike,
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    ylim: tuple[float, float] = (0.0, 1.0),
) -> Path:
    """Plot each of ``series`` (name -> y values, one per ``x``) as a coloured line with a legend."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    left, top, right, bottom = MARGIN, MARGIN // 2 + 10, WIDTH - MARGIN // 2, HEIGHT - MARGIN
    x0, x1 = min(x), max(x) if max(x) > min(x) else min(x) + 1
    y0, y1 = ylim

    def at(xv: float, yv: float) -> tuple[float, float]:
        return left + (xv - x0) / (x1 - x0) * (right - left), bottom - (yv - y0) / (y1 - y0) * (bottom - top)

    for k in range(5):  # grid and tick labels at quarters of each axis
        yv, xv = y0 + k * (y1 - y0) / 4, x0 + k * (x1 - x0) / 4
        draw.line((left, at(x0, yv)[1], right, at(x0, yv)[1]), fill="#e5e5e5")
        draw.text((left - 6, at(x0, yv)[1]), f"{yv:g}", fill="black", font=font, anchor="rm")
        draw.text(
            (at(xv, y0)[0], bottom + 6),
            f"{xv:.0f}" if x1 - x0 >= 8 else f"{xv:g}",
            fill="black",
            font=font,
            anchor="mt",
        )
    draw.rectangle((left, top, right, bottom), outline="black")
    for (name, ys), color in zip(series.items(), COLORS):
        draw.line([at(xv, yv) for xv, yv in zip(x, ys)], fill=color, width=2)
    for k, (name, color) in enumerate(zip(series, COLORS)):
        draw.line((right - 150, top + 12 + 14 * k, right - 130, top + 12 + 14 * k), fill=color, width=2)
        draw.text((right - 124, top + 12 + 14 * k), name, fill="black", font=font, anchor="lm")
    draw.text(((left + right) / 2, 8), title, fill="black", font=font, anchor="mt")
    draw.text(((left + right) / 2, HEIGHT - 14), xlabel, fill="black", font=font, anchor="mb")
    draw.text((6, top - 14), ylabel, fill="black", font=font, anchor="lt")
    path = Path(path)
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")
    return path
