"""Tests for the COCO caption metrics and the results file format.

The two ``coco_metrics`` calls start Java (PTB tokenizer and METEOR) and take
a few seconds each; ``cider`` starts only the PTB tokenizer (under a second);
everything else here is fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from diffcap.data.contract import DataError
from diffcap.evaluation.metrics import (
    cider,
    coco_metrics,
    read_coco_results,
    spice_unavailable_reason,
    write_coco_results,
)

REFERENCES = {
    "1": ["a man is riding a brown horse on the beach", "a person rides a horse near the sea"],
    "2": ["two dogs are playing with a red ball", "dogs chase a ball in the grass"],
    "3": ["a plate of pasta with tomato sauce and basil", "a bowl of spaghetti on a wooden table"],
}
# The carriage return must not split the caption: PTBTokenizer pairs lines
# with images by position, so a split would shift every later image.
IDENTICAL = {"1": "A man is riding a brown\rhorse on the beach.", "2": REFERENCES["2"][0], "3": REFERENCES["3"][0]}
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr")


def _child_processes() -> list[str]:
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    return children.read_text().split() if children.exists() else []


@pytest.fixture(scope="module")
def identical() -> dict:
    return coco_metrics(IDENTICAL, REFERENCES)


@pytest.fixture(scope="module")
def disjoint() -> dict:
    predictions = {i: "purple elephants juggle oranges quietly" for i in REFERENCES}
    return coco_metrics(predictions, REFERENCES, spice="off")


def test_identical_predictions_score_perfectly(identical):
    for key in ("BLEU-1", "BLEU-4", "ROUGE_L"):
        assert identical[key] == pytest.approx(1.0, abs=1e-6)
    assert identical["METEOR"] > 0.9
    assert identical["n_images"] == 3
    assert all(type(identical[key]) is float for key in METRICS)


def test_disjoint_predictions_score_zero(identical, disjoint):
    assert disjoint["BLEU-4"] == pytest.approx(0.0, abs=1e-6)
    assert disjoint["ROUGE_L"] == 0.0
    assert disjoint["CIDEr"] == 0.0 < identical["CIDEr"]
    assert disjoint["METEOR"] < 0.05


def test_cider_alone_matches_coco_metrics(identical):
    assert cider(IDENTICAL, REFERENCES) == identical["CIDEr"]


def test_spice_skipped_with_reason(identical, disjoint):
    assert disjoint["SPICE"] is None
    assert disjoint["skipped"] == {"SPICE": "disabled (spice='off')"}
    reason = spice_unavailable_reason()
    if reason is None:
        assert isinstance(identical["SPICE"], float)
    else:
        assert identical["SPICE"] is None
        assert identical["skipped"] == {"SPICE": reason}
        assert "stanford-corenlp-3.6.0" in reason


def test_no_java_process_is_left_running(identical, disjoint):
    assert _child_processes() == []


def test_spice_on_without_models_raises_before_running_java():
    if spice_unavailable_reason() is None:
        pytest.skip("SPICE models are installed")
    with pytest.raises(RuntimeError, match="SPICE requested but unavailable"):
        coco_metrics({"1": "a horse"}, REFERENCES, spice="on")


def test_predictions_without_references_are_listed():
    with pytest.raises(ValueError, match=r"without references for 2 id\(s\): '9', '8'"):
        coco_metrics({"1": "a horse", "9": "a cat", "8": "a dog"}, REFERENCES)
    with pytest.raises(ValueError, match="spice must be"):
        coco_metrics({"1": "a horse"}, REFERENCES, spice="yes")


def test_results_file_round_trip(tmp_path):
    path = tmp_path / "results.json"
    predictions = {"391895": "a man on a bike", "007": "zwei Hunde – im Schnee", "x": ""}
    write_coco_results(path, predictions)
    assert read_coco_results(path) == predictions


def test_results_file_accepts_integer_ids(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('[{"image_id": 42, "caption": "a cat"}]', encoding="utf-8")
    assert read_coco_results(path) == {"42": "a cat"}


@pytest.mark.parametrize(
    ("predictions", "written"),
    [
        ({"391895": "a", "42": "b"}, [391895, 42]),  # COCO: integer ids, as the evaluation server needs
        ({"391895": "a", "1000268201_693b08cb0e": "b"}, ["391895", "1000268201_693b08cb0e"]),  # not all integers
        ({"007": "a", "8": "b"}, ["007", "8"]),  # "007" would not survive int()
    ],
)
def test_results_file_writes_integer_ids_as_integers(tmp_path, predictions, written):
    path = tmp_path / "results.json"
    write_coco_results(path, predictions)
    assert [e["image_id"] for e in json.loads(path.read_text())] == written
    assert read_coco_results(path) == predictions


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"image_id": 1, "caption": "a"},', r"results.json:1: invalid JSON"),
        ('{"image_id": 1, "caption": "a"}', r"results.json: expected a JSON list"),
        ('[{"image_id": 1}]', r"results.json: entry 0: expected an object with 'image_id' and 'caption'"),
        ('[{"image_id": 1, "caption": "a"}, {"image_id": "1", "caption": "b"}]', r"entry 1: duplicate image_id '1'"),
        ('[{"image_id": 1, "caption": 5}]', r"entry 0: caption must be a string"),
    ],
)
def test_bad_results_file(tmp_path, content, message):
    path = tmp_path / "results.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_coco_results(path)


def test_missing_results_file(tmp_path):
    with pytest.raises(DataError, match=r"results.json: results file not found"):
        read_coco_results(tmp_path / "results.json")
