"""Reference captions of a scene: paraphrases that always name an object as ``size colour shape``.

That fixed noun phrase is what demo/scoring.py relies on to score generated captions.
"""

from __future__ import annotations

import random

from .scenes import RELATIONS, SIZE_WORDS, Obj, Scene, relation_of

MAX_CAPTION_WORDS = 16


# Caption design. A continuous diffusion captioner decodes every position at once, so a caption
# whose content words move around between paraphrases ("a red circle" / "there is a red circle" /
# "a blue square with a red circle to its left") is many modes at each position, which a CPU-sized
# training budget cannot teach it to resolve (BENCHMARKS.md has the measurement). The paraphrases here
# therefore keep the object phrases in place: objects are named in reading order (left to right, or
# top to bottom), every object gets a size word, synonyms have equal length, and the templates differ
# in their articles and in how they end.
_RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "on the left of"),
    "above": ("above", "over"),
}
_ONE_TEMPLATES = (
    "a {a}",
    "a {a} in the image",
    "the {a} on a dark background",
)
_TWO_TEMPLATES = (
    "a {a} {rel} a {b}",
    "a {a} {rel} a {b} in the image",
    "the {a} {rel} the {b} on a dark background",
)
_THREE_TEMPLATES = (  # no room for an ending within MAX_CAPTION_WORDS
    "a {a} and a {b} and a {c}",
    "the {a} and the {b} and the {c}",
    "one {a} and one {b} and one {c}",
)


def _noun_phrase(obj: Obj, rng: random.Random) -> str:
    return f"{rng.choice(SIZE_WORDS[obj.size])} {obj.colour} {obj.shape}"


def reading_order(objects: list[Obj]) -> list[Obj]:
    """Left to right, or top to bottom where the dominant offset is vertical (as relation_of decides)."""
    if len(objects) == 2 and relation_of(objects[0], objects[1]) in ("above", "below"):
        return sorted(objects, key=lambda o: o.y)
    return sorted(objects, key=lambda o: o.x)


def _fill(template: str, scene: Scene, rng: random.Random) -> str:
    objs = reading_order(scene.objects)
    phrases = {k: _noun_phrase(o, rng) for k, o in zip("abc", objs)}
    if len(objs) == 2:
        if scene.relation not in RELATIONS:
            raise ValueError(f"describe: two-object scene {scene.image_id} has relation {scene.relation!r}")
        phrases["rel"] = rng.choice(_RELATION_PHRASES[relation_of(objs[0], objs[1])])
    return template.format(**phrases)


def describe(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` distinct paraphrased captions, each from a different template while templates last.

    Every caption names each object as ``[size] colour shape``; two-object captions state the
    scene's relation, three-object captions list the objects joined by "and"/"with".
    """
    templates = {1: _ONE_TEMPLATES, 2: _TWO_TEMPLATES, 3: _THREE_TEMPLATES}.get(len(scene.objects))
    if templates is None:
        raise ValueError(f"describe: scene {scene.image_id} has {len(scene.objects)} objects; 1 to 3 supported")
    order = rng.sample(templates, len(templates))
    captions: list[str] = []
    for i in range(50 * n):
        caption = _fill(order[i % len(order)], scene, rng)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == n:
                return captions
    raise ValueError(f"describe: could not find {n} distinct captions for scene {scene.image_id}")
