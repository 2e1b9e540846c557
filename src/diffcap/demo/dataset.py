"""The demo data set: scenes per split, their rendered images and reference captions, and its files.

The files follow the data contract (diffcap.data.contract): ``captions.jsonl`` and
``features.safetensors`` (raw pixels, which the run's CNN encodes), plus the demo's own ``scenes.json``
(the ground truth the scoring needs).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.contract import CaptionRecord, write_captions, write_features
from ..io import atomic_output
from .captions import describe
from .render import render
from .scenes import (
    HELD_OUT_PAIRS,
    SPLITS,
    Pair,
    Scene,
    contains_unseen,
    generate_scenes,
    scene_to_dict,
)


@dataclass
class DemoData:
    """A generated demo data set.

    ``splits`` maps "train"/"val"/"test" to scenes; ``captions`` holds one record per reference
    caption; ``images`` maps image id to a uint8 HWC array.
    """

    splits: dict[str, list[Scene]]
    captions: list[CaptionRecord]
    images: dict[str, np.ndarray]
    held_out: tuple[Pair, ...] = HELD_OUT_PAIRS

    def scenes(self) -> dict[str, Scene]:
        """All scenes keyed by image id."""
        return {s.image_id: s for split in self.splits.values() for s in split}

    def references(self) -> dict[str, list[str]]:
        """Reference captions per image id, in generation order."""
        refs: dict[str, list[str]] = {}
        for rec in self.captions:
            refs.setdefault(rec.image_id, []).append(rec.caption)
        return refs


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
    captions: list[CaptionRecord] = []
    images: dict[str, np.ndarray] = {}
    for split in SPLITS:
        for i, scene in enumerate(splits[split]):
            scene.image_id = f"{split}_{i:05d}"
            scene.split = split
            scene.unseen = contains_unseen(scene, held_out)
            images[scene.image_id] = render(scene, image_size)
            for caption in describe(scene, caption_rng, captions_per_image):
                captions.append(CaptionRecord(scene.image_id, caption, split))
    return DemoData(splits, captions, images, tuple(held_out))


def write_demo_dataset(out_dir: str | os.PathLike, data: DemoData) -> dict[str, Path]:
    """Write ``features.safetensors``, ``captions.jsonl`` and ``scenes.json`` into ``out_dir``.

    Features are the raw pixels as uint8 tensors (3, H, W) keyed by image id, with safetensors
    metadata ``{"kind": "pixels"}``. Returns the three paths by name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "features": out / "features.safetensors",
        "captions": out / "captions.jsonl",
        "scenes": out / "scenes.json",
    }

    tensors = {i: torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))) for i, img in data.images.items()}
    write_features(paths["features"], tensors, {"kind": "pixels"})
    write_captions(data.captions, paths["captions"])
    scenes = {s.image_id: scene_to_dict(s) for split in SPLITS for s in data.splits.get(split, [])}
    with atomic_output(paths["scenes"]) as tmp:
        tmp.write_text(json.dumps(scenes, indent=1) + "\n", encoding="utf-8")
    return paths
