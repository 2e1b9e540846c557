"""The demo's world: scenes of one to three coloured shapes, drawn at random from a seed.

The vocabulary is small and every scene renders unambiguously at 64x64 (demo/render.py), so a small
CNN plus a diffusion captioner can learn it in minutes on a CPU. Some colour-shape pairs
(:data:`HELD_OUT_PAIRS`) are kept out of train and val entirely; test scenes that contain them measure
compositional generalisation (``attribute_accuracy_unseen``, demo/scoring.py).

Everything is deterministic per seed: only ``random.Random`` instances are used, never global RNGs.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

Pair = tuple[str, str]  # (colour, shape)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Far apart in RGB and all bright against the dark background, so no pair is confusable.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 195, 60),
    "blue": (45, 95, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 215),
    "white": (240, 240, 240),
}
SIZES: tuple[str, ...] = ("small", "large")
# Half-extent of an object's bounding box as a fraction of the canvas (6.4 px / 10.9 px at 64x64).
SIZE_RADIUS: dict[str, float] = {"small": 0.10, "large": 0.17}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "tiny", "little"), "large": ("large", "big")}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TEXTURES: tuple[str, ...] = ("none", "noise", "stripes")

# Never seen in train or val. Each colour and each shape still occurs in training with other
# partners, so the pairs are new combinations of known attributes.
HELD_OUT_PAIRS: tuple[Pair, ...] = (("red", "triangle"), ("blue", "circle"), ("green", "square"))

SPLITS: tuple[str, ...] = ("train", "val", "test")

_MARGIN = 0.03  # keeps objects off the image border
_GAP = 0.04  # minimum free space between the bounding boxes of two objects
_COUNT_WEIGHTS = {1: 0.25, 2: 0.45, 3: 0.30}


@dataclass
class Obj:
    """One shape. ``x`` and ``y`` are the centre as fractions of the canvas (y grows downwards)."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def pair(self) -> Pair:
        return (self.colour, self.shape)


@dataclass
class Scene:
    """A synthetic image's ground truth.

    ``relation`` is set for two-object scenes only and relates ``objects[0]`` to ``objects[1]``
    (e.g. ``"left of"``: the first object is left of the second). ``texture`` and ``texture_seed``
    fix the background so :func:`render` is a pure function of the scene. ``split`` and ``unseen``
    (contains a held-out colour-shape pair) are filled in by :func:`make_demo_dataset`.
    """

    image_id: str
    objects: list[Obj]
    relation: str | None = None
    texture: str = "none"
    texture_seed: int = 0
    split: str = ""
    unseen: bool = False

    @property
    def pairs(self) -> list[Pair]:
        return [o.pair for o in self.objects]


def _allowed_pairs(exclude: Iterable[Pair]) -> list[Pair]:
    excluded = set(exclude)
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in excluded]


def _separated(a: Obj, b: Obj) -> bool:
    """True when the two bounding boxes are at least ``_GAP`` apart on some axis."""
    reach = SIZE_RADIUS[a.size] + SIZE_RADIUS[b.size] + _GAP
    return abs(a.x - b.x) >= reach or abs(a.y - b.y) >= reach


def relation_of(a: Obj, b: Obj) -> str:
    """The relation of ``a`` to ``b`` along the axis where their centres differ most."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _clearly_related(a: Obj, b: Obj) -> bool:
    """True when the dominant axis is unambiguous: boxes apart on it and the other offset at most half."""
    dx, dy = abs(a.x - b.x), abs(a.y - b.y)
    dominant, other = max(dx, dy), min(dx, dy)
    return dominant >= SIZE_RADIUS[a.size] + SIZE_RADIUS[b.size] + _GAP and other <= 0.5 * dominant


def _place(rng: random.Random, attrs: list[tuple[str, str, str]]) -> list[Obj] | None:
    """Place objects (colour, shape, size) without overlap; None when a try fails (caller retries)."""
    placed: list[Obj] = []
    for colour, shape, size in attrs:
        lo = SIZE_RADIUS[size] + _MARGIN
        for _ in range(100):
            obj = Obj(shape, colour, size, round(rng.uniform(lo, 1 - lo), 4), round(rng.uniform(lo, 1 - lo), 4))
            if all(_separated(obj, other) for other in placed):
                if len(attrs) == 2 and placed and not _clearly_related(placed[0], obj):
                    continue
                placed.append(obj)
                break
        else:
            return None
    return placed


def _sample_scene(
    rng: random.Random,
    image_id: str,
    allowed: list[Pair],
    required: list[Pair] | None,
) -> Scene:
    counts, weights = zip(*_COUNT_WEIGHTS.items())
    while True:
        n = rng.choices(counts, weights)[0]
        pairs = [rng.choice(allowed) for _ in range(n)]
        if required:
            pairs[rng.randrange(n)] = rng.choice(required)
        attrs = [(c, s, rng.choice(SIZES)) for c, s in pairs]
        objects = _place(rng, attrs)
        if objects is not None:
            break
    relation = relation_of(objects[0], objects[1]) if n == 2 else None
    texture = rng.choice(TEXTURES)
    return Scene(image_id, objects, relation, texture, rng.getrandbits(32))


def generate_scenes(
    n: int,
    seed: int,
    *,
    exclude_pairs: Iterable[Pair] = (),
    require_pairs: Iterable[Pair] = (),
    id_prefix: str = "img",
) -> list[Scene]:
    """Generate ``n`` random scenes, deterministically for a given ``seed``.

    No object uses a pair from ``exclude_pairs``. When ``require_pairs`` is given, every scene
    contains at least one of them; scene ``i`` gets ``require_pairs[i % len]`` so that all required
    pairs appear once ``n >= len(require_pairs)``. Image ids are ``f"{id_prefix}_{i:05d}"``.
    """
    rng = random.Random(seed)
    allowed = _allowed_pairs(exclude_pairs)
    required = list(require_pairs)
    if not allowed:
        raise ValueError("generate_scenes: exclude_pairs leaves no colour-shape pair to draw from")
    scenes = []
    for i in range(n):
        need = [required[i % len(required)]] if required else None
        scenes.append(_sample_scene(rng, f"{id_prefix}_{i:05d}", allowed, need))
    return scenes


def contains_unseen(scene: Scene, held_out: Iterable[Pair] = HELD_OUT_PAIRS) -> bool:
    """True when any object's (colour, shape) pair is held out."""
    pairs = set(held_out)
    return any(p in pairs for p in scene.pairs)


def scene_to_dict(scene: Scene) -> dict:
    """JSON-ready form of a scene (the ``scenes.json`` entry, without the id)."""
    record = asdict(scene)
    record.pop("image_id")
    return record


def scene_from_dict(image_id: str, record: dict) -> Scene:
    """Inverse of :func:`scene_to_dict`."""
    objects = [Obj(o["shape"], o["colour"], o["size"], float(o["x"]), float(o["y"])) for o in record["objects"]]
    return Scene(
        image_id,
        objects,
        record.get("relation"),
        record.get("texture", "none"),
        int(record.get("texture_seed", 0)),
        record.get("split", ""),
        bool(record.get("unseen", False)),
    )


def load_scenes(path: str | os.PathLike) -> dict[str, Scene]:
    """Read ``scenes.json`` written by :func:`write_demo_dataset`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read scenes: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by image id, got {type(raw).__name__}")
    scenes = {}
    for image_id, record in raw.items():
        try:
            scenes[image_id] = scene_from_dict(image_id, record)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad scene {image_id!r}: {exc!r}") from exc
    return scenes
