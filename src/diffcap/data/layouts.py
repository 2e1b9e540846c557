"""Readers for the data set layouts users have on disk: Flickr8k, Karpathy's split files, a folder.

Each reader returns a :class:`Layout`: the caption records of the data contract (split by image) and
the path of every image. Readers never open an image: the feature extractor does, and it names every
file that is missing or unreadable. Split names follow the contract's defaults: ``train``, ``val``,
``test`` (Flickr8k's official ``dev`` list and Karpathy's ``val`` become ``val``; Karpathy's ``restval``,
the part of COCO val2014 not held out, becomes ``train`` as in Karpathy & Fei-Fei, arXiv 1412.2306).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from .contract import CaptionRecord, DataError, describe_ids, read_captions

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
FLICKR8K_IMAGE_DIRS = ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset")  # "Flicker" is the official typo
FLICKR8K_SPLITS = {"train": "train", "dev": "val", "test": "test"}
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
LAYOUTS = ("flickr8k", "flickr30k", "coco", "folder")


@dataclass
class Layout:
    """A data set as found on disk: caption records (several per image) and image paths by image id."""

    records: list[CaptionRecord]
    images: dict[str, Path]
    captions_file: Path | None = None  # the file the captions were read from

    def captions_by_image(self) -> dict[str, list[CaptionRecord]]:
        """image id -> its records, in file order (caption #k of an image is the k-th)."""
        grouped: dict[str, list[CaptionRecord]] = {}
        for r in self.records:
            grouped.setdefault(r.image_id, []).append(r)
        return grouped


def read_layout(name: str, root: str | Path, *, captions: str | Path | None = None) -> Layout:
    """Read data set ``name`` (one of :data:`LAYOUTS`) from ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data set folder not found")
    if name == "flickr8k":
        return read_flickr8k(root)
    if name in ("flickr30k", "coco"):
        return read_karpathy(root, name)
    if name == "folder":
        return read_folder(root, captions=captions)
    raise DataError(f"unknown layout {name!r}; choose one of {list(LAYOUTS)}")


def _first(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).exists()), None)


def _check_one_split_per_image(records: list[CaptionRecord], source: Path) -> None:
    splits: dict[str, set[str]] = {}
    for r in records:
        splits.setdefault(r.image_id, set()).add(r.split)
    mixed = [i for i, s in splits.items() if len(s) > 1]
    if mixed:
        raise DataError(
            f"{source}: {describe_ids(mixed)} have captions in more than one split; splits must be by image"
        )


# ------------------------------------------------------------------------------------------------ Flickr8k


def _read_flickr8k_token(path: Path) -> list[tuple[str, str]]:
    """``Flickr8k.token.txt``: lines ``name.jpg#k<TAB>caption``."""
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        name = key.rsplit("#", 1)[0].strip()
        if not sep or not name or not caption.strip():
            raise DataError(f"{path}:{lineno}: expected 'name.jpg#k<TAB>caption', got {line[:80]!r}")
        pairs.append((name, caption.strip()))
    return pairs


def read_flickr8k(root: Path) -> Layout:
    """Flickr8k: ``captions.txt`` (CSV ``image,caption``) or ``Flickr8k.token.txt``, the official split
    lists ``Flickr_8k.{train,dev,test}Images.txt``, images in ``Images/`` or ``Flicker8k_Dataset/``.

    Images in no split list are left out; split lists that are absent are skipped (some copies hold no
    test split), but at least one must be there. Without split lists, Karpathy's
    ``dataset_flickr8k.json`` is used if present. ``images`` follows the split lists' order (train, dev,
    test), so the first N images of a split are the first N of its list; records keep the captions' order.
    """
    captions_file = _first(root, ("captions.txt", "Flickr8k.token.txt", "Flickr8k_text/Flickr8k.token.txt"))
    # The official Flickr8k_text.zip holds the token file and the split lists side by side.
    split_dirs = list(dict.fromkeys([root] + ([captions_file.parent] if captions_file is not None else [])))
    split_files: dict[str, Path] = {}
    for folder in split_dirs:
        split_files = {s: folder / f"Flickr_8k.{s}Images.txt" for s in FLICKR8K_SPLITS}
        if any(p.is_file() for p in split_files.values()):
            break
    else:
        if (root / "dataset_flickr8k.json").is_file():
            return read_karpathy(root, "flickr8k")
        raise DataError(
            f"{' or '.join(map(str, split_dirs))}: no split lists Flickr_8k.{{train,dev,test}}Images.txt "
            f"(nor Karpathy's dataset_flickr8k.json in {root})"
        )
    if captions_file is None:
        raise DataError(f"{root}: no captions.txt or Flickr8k.token.txt")
    if captions_file.name == "captions.txt":
        pairs = [(r.image_id, r.caption) for r in read_captions(captions_file)]
    else:
        pairs = _read_flickr8k_token(captions_file)
    split_of: dict[str, str] = {}
    for official, split in FLICKR8K_SPLITS.items():
        path = split_files[official]
        if not path.is_file():
            continue
        for name in (line.strip() for line in path.read_text(encoding="utf-8").splitlines()):
            if name and split_of.setdefault(name, split) != split:
                raise DataError(f"{path}: image {name!r} is also in the {split_of[name]!r} split list")
    records = [CaptionRecord(name, caption, split_of[name]) for name, caption in pairs if name in split_of]
    listed_without_captions = sorted(set(split_of) - {name for name, _ in pairs})
    if listed_without_captions:
        raise DataError(
            f"{captions_file}: no captions for {describe_ids(listed_without_captions)} named in the split lists"
        )
    image_dir = _first(root, FLICKR8K_IMAGE_DIRS) or root / FLICKR8K_IMAGE_DIRS[0]
    images = {name: image_dir / name for name in split_of}
    return Layout(records, images, captions_file)


# ------------------------------------------------------------------------------------------------ Karpathy


KARPATHY_IMAGE_DIRS = {
    "flickr8k": ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset"),
    "flickr30k": ("flickr30k-images", "Images", "images"),
    "coco": ("images", "."),
}


def read_karpathy(root: Path, name: str) -> Layout:
    """Karpathy's ``dataset_{name}.json`` (``images[].filename, filepath, split, sentences[].raw``).

    Image ids are file names for Flickr and COCO's integer ids (as strings) for COCO, the ids the
    official evaluation files use. Images live in ``root/<image dir>/<filepath>/<filename>``.
    """
    path = _first(root, (f"dataset_{name}.json", f"karpathy/dataset_{name}.json", f"annotations/dataset_{name}.json"))
    if path is None:
        raise DataError(f"{root}: Karpathy split file dataset_{name}.json not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a Karpathy split file (expected {{'images': [...]}}): {exc}") from exc
    image_dir = _first(root, KARPATHY_IMAGE_DIRS[name]) or root
    records: list[CaptionRecord] = []
    images: dict[str, Path] = {}
    for n, entry in enumerate(entries):
        try:
            filename, split = entry["filename"], KARPATHY_SPLITS[entry["split"]]
            sentences = [s["raw"] for s in entry["sentences"]]
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path}: images[{n}] lacks filename, a known split or sentences[].raw ({exc!r})") from exc
        image_id = str(entry["cocoid"]) if name == "coco" and "cocoid" in entry else filename
        if image_id in images:
            raise DataError(f"{path}: image {image_id!r} is listed twice")
        images[image_id] = image_dir / entry.get("filepath", "") / filename
        records += [CaptionRecord(image_id, s.strip(), split) for s in sentences if s.strip()]
    if not records:
        raise DataError(f"{path}: no captions")
    return Layout(records, images, path)


# ------------------------------------------------------------------------------------------------ folder


def _hash_split(image_id: str, val_fraction: float) -> str:
    # A stable hash (not Python's salted hash()) so the split is the same on every run and machine.
    return "val" if zlib.crc32(image_id.encode()) % 1000 < val_fraction * 1000 else "train"


def read_folder(root: Path, *, captions: str | Path | None = None, val_fraction: float = 0.1) -> Layout:
    """A folder of images and a captions file of the contract (``captions.jsonl`` or ``captions.csv`` in
    the folder unless ``captions`` names one); ``image_id`` is the image's path relative to the folder.

    Images without a split get ``train`` or ``val`` (about ``val_fraction`` of them) from a stable hash
    of their id, so the split is by image and reproducible.
    """
    if captions is None:
        captions = _first(root, ("captions.jsonl", "captions.csv"))
        if captions is None:
            raise DataError(f"{root}: no captions.jsonl or captions.csv (or pass the captions file)")
    captions = Path(captions)
    records = read_captions(captions)
    _check_one_split_per_image(records, captions)
    records = [
        r if r.split else CaptionRecord(r.image_id, r.caption, _hash_split(r.image_id, val_fraction)) for r in records
    ]
    images = {i: root / i for i in dict.fromkeys(r.image_id for r in records)}
    return Layout(records, images, captions)
