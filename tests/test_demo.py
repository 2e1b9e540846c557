"""A reduced `diffcap demo` runs end to end and writes both files; `diffcap caption` reads image files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from diffcap.cli import main
from diffcap.demo.run import QUICK, run_demo


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, QUICK)
    return out


def test_demo_writes_metrics_and_report(demo_dir):
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    for key in ("CIDEr", "BLEU-4", "METEOR", "ROUGE_L", "attribute_accuracy", "attribute_accuracy_unseen"):
        assert key in metrics
    assert 0.0 <= metrics["attribute_accuracy"] <= 1.0 and metrics["n_objects_unseen"] > 0
    html = (demo_dir / "report.html").read_text()
    results = json.loads((demo_dir / "test_results.json").read_text())
    assert html.count("data:image/png;base64,") >= QUICK.report_images
    assert "t=999" in html  # the first sampling step of the trajectory
    first = results[0]
    assert first["image_id"] in html


def test_caption_command_on_image_files(demo_dir, tmp_path, capsys):
    img = tmp_path / "scene.png"
    Image.fromarray(np.zeros((100, 80, 3), dtype=np.uint8) + 40).save(img)  # resized to 64x64 on load
    assert main(["caption", str(img), "--run", str(demo_dir / "run")]) == 0
    assert capsys.readouterr().out.startswith(str(img) + "\t")

    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    assert main(["caption", str(bad), "--run", str(demo_dir / "run")]) == 2
    assert "notes.png" in capsys.readouterr().err

    truncated = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    assert main(["caption", str(truncated), "--run", str(demo_dir / "run")]) == 2
    assert "cut.jpg" in capsys.readouterr().err
