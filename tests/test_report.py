"""HTML report: self-contained, escaped, one inline PNG per image, atomic write."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
from PIL import Image

from diffcap.evaluation.report import png_bytes, write_report


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _items():
    return [
        {
            "image_id": "test_00000",
            "image": _image(0),
            "caption": "a red circle <b>&</b> a blue square",
            "references": ["a small red circle left of a big blue square", 'ref with "quotes" & <tags>'],
            "trajectory": [("t=1000", "[MASK] <x> square"), ("t=0", "a red circle left of a blue square")],
        },
        {
            "image_id": "test_00001",
            "image": png_bytes(_image(1)),
            "caption": "a green cross",
            "references": [],
            "trajectory": [],
        },
        {"image_id": "test_00002", "image": None, "caption": "no picture here", "references": ["x"], "trajectory": []},
        {"image_id": "test_00003", "image": _image(3).transpose(2, 0, 1), "caption": "chw image"},
    ]


def _decoded_pngs(page: str) -> list[np.ndarray]:
    blobs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in blobs]


def test_report_contents(tmp_path):
    metrics = {"attribute_accuracy": 0.951234, "attribute_accuracy_unseen": None, "n_objects": 12, "bleu": {"4": 0.5}}
    path = write_report(tmp_path / "out" / "report.html", _items(), metrics, title="demo <run>")
    page = path.read_text(encoding="utf-8")

    assert page.count("data:image/png;base64,") == 3
    images = _decoded_pngs(page)
    assert [img.shape for img in images] == [(64, 64, 3)] * 3
    assert np.array_equal(images[0], _image(0))
    assert np.array_equal(images[1], _image(1))
    assert np.array_equal(images[2], _image(3))
    assert "no image" in page

    assert "a red circle &lt;b&gt;&amp;&lt;/b&gt; a blue square" in page
    assert "<b>&</b>" not in page
    assert "ref with &quot;quotes&quot; &amp; &lt;tags&gt;" in page
    assert "a small red circle left of a big blue square" in page
    assert "[MASK] &lt;x&gt; square" in page
    assert "<td>t=1000</td>" in page and "sampling trajectory (2 steps)" in page
    assert "<title>demo &lt;run&gt;</title>" in page

    assert '<td>attribute_accuracy</td><td class="num">0.9512</td>' in page
    assert '<td>attribute_accuracy_unseen</td><td class="num">n/a</td>' in page
    assert '<td>n_objects</td><td class="num">12</td>' in page
    assert '<td>bleu.4</td><td class="num">0.5000</td>' in page
    assert page.index("attribute_accuracy") < page.index("test_00000")

    assert "image-rendering: pixelated" in page and "width: 128px" in page
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # no external assets


def test_report_write_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "report.html"
    path.write_text("old", encoding="utf-8")
    write_report(path, [], {"attribute_accuracy": 1.0})
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert "<h1>diffcap report</h1>" in page and "Examples (0)" in page
