"""The demo's synthetic scenes: determinism, caption/ground-truth agreement, splits, scoring, files."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest
from safetensors import safe_open

from diffcap.data.contract import CaptionRecord
from diffcap.demo.captions import MAX_CAPTION_WORDS, describe
from diffcap.demo.dataset import make_demo_dataset, write_demo_dataset
from diffcap.demo.render import render
from diffcap.demo.scenes import (
    COLOURS,
    HELD_OUT_PAIRS,
    INVERSE_RELATION,
    SIZE_RADIUS,
    Obj,
    Scene,
    contains_unseen,
    generate_scenes,
    load_scenes,
    relation_of,
)
from diffcap.demo.scoring import attribute_accuracy, parse_objects, parse_relation


@pytest.fixture(scope="module")
def demo():
    return make_demo_dataset(200, 50, 100, seed=7)


@pytest.fixture(scope="module")
def many_scenes():
    return generate_scenes(300, seed=11)


def test_same_seed_same_data_different_seed_different():
    a, b, c = (make_demo_dataset(20, 5, 10, seed=s) for s in (3, 3, 4))
    assert a.captions == b.captions
    assert a.scenes() == b.scenes()
    assert list(a.images) == list(b.images)
    assert all(a.images[i].tobytes() == b.images[i].tobytes() for i in a.images)
    assert a.captions != c.captions
    assert any(a.images[i].tobytes() != c.images[i].tobytes() for i in a.images)


def test_images_are_uint8_hwc(demo):
    assert len(demo.images) == 350
    for image in demo.images.values():
        assert image.shape == (64, 64, 3)
        assert image.dtype == np.uint8


def test_every_caption_parses_to_the_scene_objects(many_scenes):
    rng = random.Random(0)
    counts = Counter(len(s.objects) for s in many_scenes)
    assert set(counts) == {1, 2, 3}
    for scene in many_scenes:
        captions = describe(scene, rng)
        assert len(captions) == 5
        assert len(set(captions)) == 5
        for caption in captions:
            assert Counter(parse_objects(caption)) == Counter(scene.pairs), caption
            assert 1 <= len(caption.split()) <= MAX_CAPTION_WORDS, caption


def test_objects_do_not_overlap_and_stay_on_canvas(many_scenes):
    for scene in many_scenes:
        objs = scene.objects
        for o in objs:
            r = SIZE_RADIUS[o.size]
            assert r <= o.x <= 1 - r and r <= o.y <= 1 - r
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                a, b = objs[i], objs[j]
                reach = SIZE_RADIUS[a.size] + SIZE_RADIUS[b.size]
                assert abs(a.x - b.x) > reach or abs(a.y - b.y) > reach


def test_relations_match_positions_and_captions(many_scenes):
    rng = random.Random(1)
    two = [s for s in many_scenes if len(s.objects) == 2]
    assert len(two) > 50
    assert {s.relation for s in two} == {"left of", "right of", "above", "below"}
    assert all(s.relation is None for s in many_scenes if len(s.objects) != 2)
    for scene in two:
        a, b = scene.objects
        assert scene.relation == relation_of(a, b)
        dx, dy = abs(a.x - b.x), abs(a.y - b.y)
        # Unambiguous: the other axis' offset is at most half the dominant one.
        assert min(dx, dy) <= 0.5 * max(dx, dy)
        truth = {(a.pair, scene.relation, b.pair), (b.pair, INVERSE_RELATION[scene.relation], a.pair)}
        for caption in describe(scene, rng):
            assert parse_relation(caption) in truth, caption


def test_relation_of_uses_image_coordinates():
    left, right = Obj("circle", "red", "small", 0.2, 0.5), Obj("square", "blue", "small", 0.8, 0.55)
    top, bottom = Obj("circle", "red", "small", 0.5, 0.1), Obj("square", "blue", "small", 0.45, 0.9)
    assert relation_of(left, right) == "left of"
    assert relation_of(right, left) == "right of"
    assert relation_of(top, bottom) == "above"
    assert relation_of(bottom, top) == "below"


def test_object_centres_have_their_exact_colour(many_scenes):
    for scene in many_scenes[:60]:
        image = render(scene)
        for o in scene.objects:
            pixel = image[int(o.y * 64), int(o.x * 64)]
            assert tuple(pixel) == COLOURS[o.colour], (scene.image_id, o)


def test_background_texture_is_faint(many_scenes):
    textured = [s for s in many_scenes if s.texture != "none"]
    assert {s.texture for s in textured} == {"noise", "stripes"}
    for scene in textured[:20]:
        empty = Scene(scene.image_id, [], None, scene.texture, scene.texture_seed)
        image = render(empty).astype(int)
        assert image.min() >= 42 - 7 and image.max() <= 42 + 7
        assert image.max() - image.min() >= 4  # the texture is really there


def test_held_out_pairs_only_in_test(demo):
    for split in ("train", "val"):
        for scene in demo.splits[split]:
            assert not set(scene.pairs) & set(HELD_OUT_PAIRS)
            assert scene.unseen is False
    test = demo.splits["test"]
    assert len(test) == 100
    assert sum(s.unseen for s in test) == 30
    assert all(s.unseen == contains_unseen(s) for s in test)
    test_pairs = {p for s in test for p in s.pairs}
    assert set(HELD_OUT_PAIRS) <= test_pairs
    # Shuffled: unseen scenes are not all at the end of the split.
    assert any(s.unseen for s in test[:50])


def test_splits_ids_and_captions(demo):
    assert [len(demo.splits[s]) for s in ("train", "val", "test")] == [200, 50, 100]
    assert demo.splits["val"][3].image_id == "val_00003"
    assert all(s.split == name for name, scenes in demo.splits.items() for s in scenes)
    refs = demo.references()
    assert len(refs) == 350 and all(len(r) == 5 for r in refs.values())
    split_of = {i: s.split for i, s in demo.scenes().items()}
    assert all(rec.split == split_of[rec.image_id] for rec in demo.captions)


def test_parse_objects_ignores_size_case_and_punctuation():
    assert parse_objects("A Tiny RED circle, and a big blue square.") == [("red", "circle"), ("blue", "square")]
    assert parse_objects("a red small circle") == [("red", "circle")]
    assert parse_objects("a circle that is red") == []
    assert parse_objects("red red circle circle") == [("red", "circle")]


def test_parse_relation_forms():
    rc, bs = ("red", "circle"), ("blue", "square")
    assert parse_relation("a small red circle to the left of a big blue square") == (rc, "left of", bs)
    assert parse_relation("a blue square with a tiny red circle to its left") == (rc, "left of", bs)
    assert parse_relation("a blue square and above it a red circle") == (rc, "above", bs)
    assert parse_relation("a blue square beneath a red circle") == (bs, "below", rc)
    assert parse_relation("a red circle and a blue square") is None
    assert parse_relation("a red circle left of a blue square above it") is None
    assert parse_relation("a red circle left of a blue square and a green cross") is None


def _scenes_for_metric() -> dict[str, Scene]:
    return {
        "s1": Scene(
            "s1", [Obj("circle", "red", "small", 0.2, 0.5), Obj("square", "blue", "large", 0.7, 0.5)], "left of"
        ),
        "s2": Scene("s2", [Obj("triangle", "red", "large", 0.5, 0.5)]),
        "s3": Scene(
            "s3",
            [
                Obj("circle", "blue", "small", 0.2, 0.2),
                Obj("cross", "white", "small", 0.8, 0.2),
                Obj("circle", "blue", "large", 0.5, 0.7),
            ],
        ),
    }


def test_attribute_accuracy_exact_fractions():
    predictions = {
        "s1": "a red circle right of a blue square",  # both objects right, relation wrong
        "s2": "a green triangle",  # wrong colour on a held-out pair
        "s3": "a blue circle and a white cross",  # one of the two blue circles named
    }
    result = attribute_accuracy(predictions, _scenes_for_metric())
    assert result == {
        "attribute_accuracy": 4 / 6,
        "attribute_accuracy_unseen": 1 / 3,  # red triangle missed, one of two blue circles named
        "relation_accuracy": 0.0,
        "n_objects": 6,
        "n_objects_unseen": 3,
        "n_relations": 1,
    }


def test_attribute_accuracy_counts_repeats_once_per_object():
    scenes = _scenes_for_metric()
    result = attribute_accuracy({"s3": "a blue circle a blue circle a blue circle"}, scenes)
    assert result["attribute_accuracy"] == 2 / 3
    assert result["attribute_accuracy_unseen"] == 1.0
    assert result["relation_accuracy"] is None
    only_seen = attribute_accuracy({"s1": "a blue square right of a red circle"}, scenes)
    assert only_seen["attribute_accuracy"] == 1.0
    assert only_seen["relation_accuracy"] == 1.0
    assert only_seen["attribute_accuracy_unseen"] is None and only_seen["n_objects_unseen"] == 0


def test_attribute_accuracy_of_references_is_perfect(demo):
    scenes = demo.scenes()
    test_ids = {s.image_id for s in demo.splits["test"]}
    refs = demo.references()
    for k in range(5):
        result = attribute_accuracy({i: refs[i][k] for i in test_ids}, scenes)
        assert result["attribute_accuracy"] == 1.0
        assert result["attribute_accuracy_unseen"] == 1.0
        assert result["relation_accuracy"] == 1.0
        assert result["n_objects"] == sum(len(scenes[i].objects) for i in test_ids)
        held = set(HELD_OUT_PAIRS)
        assert result["n_objects_unseen"] == sum(p in held for i in test_ids for p in scenes[i].pairs)


def test_attribute_accuracy_unknown_image_raises():
    with pytest.raises(KeyError, match="nope"):
        attribute_accuracy({"nope": "a red circle"}, _scenes_for_metric())


def test_write_demo_dataset_round_trip(tmp_path):
    data = make_demo_dataset(6, 2, 4, seed=5)
    paths = write_demo_dataset(tmp_path / "demo", data)
    names = sorted(p.name for p in (tmp_path / "demo").iterdir())
    assert names == ["captions.jsonl", "features.safetensors", "scenes.json"]

    with safe_open(str(paths["features"]), framework="pt") as f:
        metadata = f.metadata()
        assert metadata.pop("diffcap.checks") and metadata == {"kind": "pixels"}  # and what write_features checked
        assert sorted(f.keys()) == sorted(data.images)
        for image_id, image in data.images.items():
            tensor = f.get_tensor(image_id)
            assert tuple(tensor.shape) == (3, 64, 64)
            assert str(tensor.dtype) == "torch.uint8"
            assert np.array_equal(tensor.numpy().transpose(1, 2, 0), image)

    lines = paths["captions"].read_text(encoding="utf-8").splitlines()
    assert [CaptionRecord(**json.loads(line)) for line in lines] == data.captions
    assert len(lines) == 12 * 5

    loaded = load_scenes(paths["scenes"])
    assert loaded == data.scenes()
    assert {i for i, s in loaded.items() if s.unseen} == {i for i, s in data.scenes().items() if s.unseen}


def test_load_scenes_names_the_file(tmp_path):
    bad = tmp_path / "scenes.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="scenes.json"):
        load_scenes(bad)
    bad.write_text('{"x": {"objects": [{"shape": "circle"}]}}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"scenes\.json: bad scene 'x'"):
        load_scenes(bad)
