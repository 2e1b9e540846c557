"""Scoring generated captions against a scene's ground truth: which objects and which relation they name.

The parser reads every common phrasing, not only the generator's, so a model that words a scene its
own way is still scored fairly.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from .scenes import (
    COLOURS,
    HELD_OUT_PAIRS,
    INVERSE_RELATION,
    SHAPES,
    SIZE_WORDS,
    Pair,
    Scene,
)


def _words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption.lower())


_SIZE_VOCAB = frozenset(w for words in SIZE_WORDS.values() for w in words)


def parse_objects(caption: str) -> list[Pair]:
    """The (colour, shape) pairs a caption names, in order.

    Punctuation and case are ignored and size words are dropped first, so "a tiny red circle"
    and "a red, small circle" both yield ("red", "circle"); a colour counts only when the next
    remaining word is a shape.
    """
    words = [w for w in _words(caption) if w not in _SIZE_VOCAB]
    return [(w, nxt) for w, nxt in zip(words, words[1:]) if w in COLOURS and nxt in SHAPES]


# The parser reads every common phrasing, not only the generator's, so a model that says "a blue
# square with a red circle to its left" is still scored. "Its" phrases make the second object the subject.
_DIRECT_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_ITS_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to its left", "on its left"),
    "right of": ("to its right", "on its right"),
    "above": ("above it",),
    "below": ("below it", "under it", "beneath it"),
}


def _phrase_pattern(phrases: dict[str, tuple[str, ...]]) -> list[tuple[re.Pattern[str], str]]:
    items = sorted(((p, rel) for rel, ps in phrases.items() for p in ps), key=lambda t: -len(t[0]))
    return [(re.compile(rf"\b{re.escape(p)}\b"), rel) for p, rel in items]


_ITS_PATTERNS = _phrase_pattern(_ITS_PHRASES)
_DIRECT_PATTERNS = _phrase_pattern(_DIRECT_PHRASES)


def parse_relation(caption: str) -> tuple[Pair, str, Pair] | None:
    """``(subject, relation, reference)`` stated by a two-object caption, or None.

    None unless the caption names exactly two objects and one relation phrase. With an "its"
    phrase ("a blue square with a red circle to its left") the subject is the object named second.
    """
    pairs = parse_objects(caption)
    if len(pairs) != 2:
        return None
    text = " ".join(w for w in _words(caption) if w not in _SIZE_VOCAB)
    found: list[tuple[str, bool]] = []  # (relation, subject is the object named first)
    for patterns, subject_first in ((_ITS_PATTERNS, False), (_DIRECT_PATTERNS, True)):
        for pattern, rel in patterns:
            if pattern.search(text):
                found.append((rel, subject_first))
                text = pattern.sub(" ", text)  # "above it" must not count again as "above"
    if len(found) != 1:
        return None
    rel, subject_first = found[0]
    return (pairs[0], rel, pairs[1]) if subject_first else (pairs[1], rel, pairs[0])


def attribute_accuracy(
    predictions: dict[str, str],
    scenes: dict[str, Scene],
    held_out: Iterable[Pair] = HELD_OUT_PAIRS,
) -> dict[str, float | int | None]:
    """Score generated captions against scene ground truth.

    For every image in ``predictions`` the objects' (colour, shape) pairs and the pairs the caption
    names (:func:`parse_objects`) are compared as multisets: each pair scores
    ``min(count in scene, count in caption)`` hits, so naming an object twice earns nothing extra and
    a scene with two red circles needs "red circle" twice. Size is not scored.

    - ``attribute_accuracy``: hits / number of objects over all given images.
    - ``attribute_accuracy_unseen``: the same restricted to objects whose pair is in ``held_out``
      (None when there are none).
    - ``relation_accuracy``: fraction of two-object scenes whose caption states the true relation
      (:func:`parse_relation`, either direction, e.g. "a blue square right of a red circle" for a
      red circle left of a blue square; None when there are none).
    - ``n_objects``, ``n_objects_unseen``, ``n_relations``: the denominators.
    """
    unseen_pairs = set(held_out)
    hits = total = hits_unseen = total_unseen = rel_hits = rel_total = 0
    for image_id, caption in predictions.items():
        scene = scenes.get(image_id)
        if scene is None:
            raise KeyError(f"attribute_accuracy: no scene for image id {image_id!r}")
        truth, named = Counter(scene.pairs), Counter(parse_objects(caption))
        for pair, count in truth.items():
            matched = min(count, named[pair])
            hits += matched
            total += count
            if pair in unseen_pairs:
                hits_unseen += matched
                total_unseen += count
        if scene.relation is not None:
            rel_total += 1
            rel_hits += _relation_correct(caption, scene)
    return {
        "attribute_accuracy": hits / total if total else None,
        "attribute_accuracy_unseen": hits_unseen / total_unseen if total_unseen else None,
        "relation_accuracy": rel_hits / rel_total if rel_total else None,
        "n_objects": total,
        "n_objects_unseen": total_unseen,
        "n_relations": rel_total,
    }


def _relation_correct(caption: str, scene: Scene) -> bool:
    stated = parse_relation(caption)
    if stated is None or scene.relation is None:
        return False
    a, b = scene.objects[0].pair, scene.objects[1].pair
    truth = {(a, scene.relation, b), (b, INVERSE_RELATION[scene.relation], a)}
    return stated in truth
