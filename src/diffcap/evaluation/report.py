"""A self-contained HTML report: metrics table, then one card per example with its sampling trajectory.

The page has no external assets (images are inline base64 PNG data URIs, CSS is inline), so it can
be opened offline or attached anywhere. All text is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io import PathLike, atomic_output

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }
.metrics td.num { text-align: right; font-family: monospace; }
.item { display: flex; gap: 1em; border-top: 1px solid #ddd; padding: 0.8em 0; }
.item img { image-rendering: pixelated; width: 128px; height: auto; flex: none; }
.noimg { width: 128px; height: 128px; background: #eee; color: #888; flex: none;
         display: flex; align-items: center; justify-content: center; }
.caption { font-size: 1.1em; font-weight: 600; margin: 0 0 0.3em 0; }
.id { color: #888; font-family: monospace; font-size: 0.85em; }
ul.refs { margin: 0.2em 0; padding-left: 1.2em; color: #555; }
.traj td { font-family: monospace; font-size: 0.85em; }
"""


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested metric dicts become dotted keys so they fit one two-column table."""
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _format_value(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4f}"
    if value is None:
        return "n/a"
    return str(value)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 HWC (or HW) array as PNG."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise ValueError(f"png_bytes: expected a uint8 HW or HWC array, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _image_tag(image: Any, alt: str) -> str:
    if image is None:
        return '<div class="noimg">no image</div>'
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    else:
        arr = np.asarray(image)
        # Feature files store pixels CHW; accept that layout too so callers need not transpose.
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        data = png_bytes(arr)
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{html.escape(alt)}">'


def _trajectory(steps: Sequence[tuple[Any, str]]) -> str:
    if not steps:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(str(label))}</td><td>{html.escape(str(text))}</td></tr>" for label, text in steps
    )
    return (
        f"<details><summary>sampling trajectory ({len(steps)} steps)</summary>"
        f'<table class="traj"><tr><th>step</th><th>decoded</th></tr>{rows}</table></details>'
    )


def _item(item: Mapping[str, Any], index: int) -> str:
    try:
        image_id = str(item["image_id"])
    except KeyError:
        raise ValueError(f"write_report: item {index} has no 'image_id'") from None
    caption = str(item.get("caption", ""))
    refs = "".join(f"<li>{html.escape(str(r))}</li>" for r in item.get("references") or [])
    refs_html = f'<ul class="refs">{refs}</ul>' if refs else ""
    return (
        '<div class="item">'
        f"{_image_tag(item.get('image'), image_id)}"
        "<div>"
        f'<div class="id">{html.escape(image_id)}</div>'
        f'<p class="caption">{html.escape(caption)}</p>'
        f"{refs_html}{_trajectory(item.get('trajectory') or [])}"
        "</div></div>"
    )


def render_report(items: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any], title: str = "diffcap report") -> str:
    """The report page as a string (see :func:`write_report`)."""
    metric_rows = "".join(
        f'<tr><td>{html.escape(k)}</td><td class="num">{html.escape(_format_value(v))}</td></tr>'
        for k, v in _flatten(metrics)
    )
    body = "".join(_item(item, i) for i, item in enumerate(items))
    t = html.escape(title)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{t}</title><style>{_CSS}</style></head>'
        f"<body><h1>{t}</h1>"
        f'<h2>Metrics</h2><table class="metrics">{metric_rows}</table>'
        f"<h2>Examples ({len(items)})</h2>{body}"
        "</body></html>\n"
    )


def write_report(
    path: PathLike,
    items: Sequence[Mapping[str, Any]],
    metrics: Mapping[str, Any],
    title: str = "diffcap report",
) -> Path:
    """Write a self-contained HTML report to ``path`` atomically and return the path.

    Each item has ``image_id``, ``caption`` (generated), and optionally ``image`` (uint8 HWC or CHW
    array, PNG bytes, or None), ``references`` (list of str) and ``trajectory`` (list of
    ``(step_label, decoded_text)`` pairs, shown in a collapsible table). ``metrics`` may be nested;
    floats are shown to four decimals and None as "n/a".
    """
    path = Path(path)
    page = render_report(items, metrics, title)
    with atomic_output(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


def caption_items(
    image_ids: Sequence[str],
    captions: Sequence[str],
    trajectories: Sequence[Sequence[tuple[int, str]]] | None = None,
    references: Mapping[str, Sequence[str]] | None = None,
    images: Mapping[str, Any] | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Report items (see :func:`write_report`) for the first ``limit`` captions: their sampling trajectory
    (timestep, decoded x0 estimate) as a pipeline returns it, the references and the image when known."""
    trajectories = trajectories or [[]] * len(image_ids)
    rows = list(zip(image_ids, captions, trajectories))[:limit]
    return [
        {
            "image_id": i,
            "caption": caption,
            "image": (images or {}).get(i),
            "references": list((references or {}).get(i, [])),
            "trajectory": [(f"t={t}", text) for t, text in trajectory],
        }
        for i, caption, trajectory in rows
    ]
