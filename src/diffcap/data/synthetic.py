"""Seeded synthetic scenes for the offline demo: images, reference captions and ground truth.

Each scene holds one to three coloured shapes on a dark, faintly textured background. The
vocabulary is small and every rendering is unambiguous at 64x64, so a small CNN plus a diffusion
captioner can learn it in minutes on a CPU. Some colour-shape pairs (:data:`HELD_OUT_PAIRS`) are
kept out of train and val entirely; test scenes that contain them measure compositional
generalisation (``attribute_accuracy_unseen``).

Captions always name an object as ``[size] colour shape`` (the size word is optional), which is
what :func:`parse_objects` relies on to score generated captions. Everything is deterministic per
seed: only ``random.Random`` and ``numpy.random.Generator`` instances are used, never global RNGs.
"""
from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from ..io import atomic_output

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
MAX_CAPTION_WORDS = 16

_BACKGROUND_LEVEL = 42
_TEXTURE_AMPLITUDE = 7  # grey levels; far below the contrast of any object colour
_MARGIN = 0.03  # keeps objects off the image border
_GAP = 0.04  # minimum free space between the bounding boxes of two objects
_COUNT_WEIGHTS = {1: 0.25, 2: 0.45, 3: 0.30}
_SUPERSAMPLE = 4  # draw large and downsample, so edges are anti-aliased and shapes read clearly

# Caption design. A continuous diffusion captioner decodes every position at once, so a caption
# whose content words move around between paraphrases ("a red circle" / "there is a red circle" /
# "a blue square with a red circle to its left") is many modes at each position, which a CPU-sized
# training budget cannot teach it to resolve (measured: attribute accuracy 0.13 after 1,500 steps with
# such captions, against 0.84 for the autoregressive model; see BENCHMARKS.md). The paraphrases here
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


@dataclass
class DemoData:
    """A generated demo data set.

    ``splits`` maps "train"/"val"/"test" to scenes; ``captions`` holds one record per reference
    caption (``{"image_id", "caption", "split"}``); ``images`` maps image id to a uint8 HWC array.
    """

    splits: dict[str, list[Scene]]
    captions: list[dict[str, str]]
    images: dict[str, np.ndarray]
    held_out: tuple[Pair, ...] = HELD_OUT_PAIRS

    def scenes(self) -> dict[str, Scene]:
        """All scenes keyed by image id."""
        return {s.image_id: s for split in self.splits.values() for s in split}

    def references(self) -> dict[str, list[str]]:
        """Reference captions per image id, in generation order."""
        refs: dict[str, list[str]] = {}
        for rec in self.captions:
            refs.setdefault(rec["image_id"], []).append(rec["caption"])
        return refs


# --------------------------------------------------------------------------- generation


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


# --------------------------------------------------------------------------- rendering


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


# --------------------------------------------------------------------------- captions


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


# --------------------------------------------------------------------------- metrics


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


# --------------------------------------------------------------------------- data set


def contains_unseen(scene: Scene, held_out: Iterable[Pair] = HELD_OUT_PAIRS) -> bool:
    """True when any object's (colour, shape) pair is held out."""
    pairs = set(held_out)
    return any(p in pairs for p in scene.pairs)


def make_demo_dataset(
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    *,
    held_out: tuple[Pair, ...] = HELD_OUT_PAIRS,
    unseen_fraction: float = 0.3,
    captions_per_image: int = 5,
    image_size: int = 64,
) -> DemoData:
    """Build train/val/test scenes, their captions and rendered images.

    Train, val and the ordinary part of test never contain a ``held_out`` pair. A further
    ``round(unseen_fraction * n_test)`` test scenes each contain at least one held-out pair (cycling
    through the pairs); the test split is shuffled so the two kinds are interleaved. Image ids are
    ``"{split}_{index:05d}"``.
    """
    rng = random.Random(seed)
    n_unseen = round(unseen_fraction * n_test)
    plain = {"train": n_train, "val": n_val, "test": n_test - n_unseen}
    splits: dict[str, list[Scene]] = {}
    for split in SPLITS:
        splits[split] = generate_scenes(plain[split], rng.getrandbits(32), exclude_pairs=held_out, id_prefix=split)
    unseen = generate_scenes(n_unseen, rng.getrandbits(32), require_pairs=held_out, id_prefix="unseen")
    test = splits["test"] + unseen
    rng.shuffle(test)
    splits["test"] = test

    caption_rng = random.Random(rng.getrandbits(32))
    captions: list[dict[str, str]] = []
    images: dict[str, np.ndarray] = {}
    for split in SPLITS:
        for i, scene in enumerate(splits[split]):
            scene.image_id = f"{split}_{i:05d}"
            scene.split = split
            scene.unseen = contains_unseen(scene, held_out)
            images[scene.image_id] = render(scene, image_size)
            for caption in describe(scene, caption_rng, captions_per_image):
                captions.append({"image_id": scene.image_id, "caption": caption, "split": split})
    return DemoData(splits, captions, images, tuple(held_out))


def _write_text(path: Path, text: str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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


def write_demo_dataset(out_dir: str | os.PathLike, data: DemoData) -> dict[str, Path]:
    """Write ``features.safetensors``, ``captions.jsonl`` and ``scenes.json`` into ``out_dir``.

    Features are the raw pixels as uint8 tensors (3, H, W) keyed by image id, with safetensors
    metadata ``{"kind": "pixels"}``. Returns the three paths by name.
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "features": out / "features.safetensors",
        "captions": out / "captions.jsonl",
        "scenes": out / "scenes.json",
    }

    tensors = {i: torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))) for i, img in data.images.items()}
    with atomic_output(paths["features"]) as tmp:
        save_file(tensors, str(tmp), metadata={"kind": "pixels"})
    lines = "".join(json.dumps(rec) + "\n" for rec in data.captions)
    _write_text(paths["captions"], lines)
    scenes = {s.image_id: scene_to_dict(s) for split in SPLITS for s in data.splits.get(split, [])}
    _write_text(paths["scenes"], json.dumps(scenes, indent=1) + "\n")
    return paths


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
