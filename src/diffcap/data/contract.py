"""The data contract between feature producers and the captioner.

Two files describe a dataset: a captions file and a features file.

Captions file
    ``.jsonl``: one JSON object per line,
    ``{"image_id": "123", "caption": "a dog runs", "split": "train"}``.
    ``image_id`` is a string (an integer such as a COCO id is accepted and
    converted to its decimal string); ``split`` is optional and defaults to
    ``""``. Blank lines are skipped.

    ``.csv`` (or ``.txt``, as Flickr8k's ``captions.txt``): comma-separated,
    UTF-8 (a BOM is allowed), with a header row naming the columns
    ``image_id`` (or ``image``), ``caption`` and optionally ``split``; other
    columns are ignored. Captions containing commas must be quoted.

    In both formats ids and captions are stripped of surrounding whitespace;
    ids are never converted to numbers ("007" stays "007"); an empty caption
    is an error. An image normally has several records, one per caption.

Features file
    A safetensors file with one tensor per image, named by its image id. All
    tensors share one *item shape* and one dtype: a pooled vector ``(D,)``, a
    token grid ``(N, D)``, or raw pixels such as ``(3, 64, 64)`` uint8.
    Floating-point values must be finite. The header's free-form metadata
    (string to string, e.g. the encoder name) travels with the file.
    safetensors stores names sorted, so ``FeatureStore.ids`` is in sorted
    order, not the order the writer used.

Every problem found in these files raises :class:`DataError`, whose message
starts with the file name (and ``:line`` where one applies) and names the
offending ids, at most five of them plus a count.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..io import PathLike, atomic_output

CAPTION_FIELDS = ("image_id", "caption", "split")
_JSONL_SUFFIXES = frozenset({".jsonl"})
_CSV_SUFFIXES = frozenset({".csv", ".txt"})
_MAX_NAMED = 5


class DataError(ValueError):
    """Bad input data; the message names the file, and the line or item where known."""


@dataclass(frozen=True)
class CaptionRecord:
    """One caption of one image."""

    image_id: str
    caption: str
    split: str = ""


def describe_ids(ids: list[str]) -> str:
    """Name at most five ids plus the total, for error messages about many items."""
    shown = ", ".join(repr(i) for i in ids[:_MAX_NAMED])
    more = f" and {len(ids) - _MAX_NAMED} more" if len(ids) > _MAX_NAMED else ""
    return f"{len(ids)} id(s): {shown}{more}"


# ---------------------------------------------------------------- captions


def _caption_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _JSONL_SUFFIXES:
        return "jsonl"
    if suffix in _CSV_SUFFIXES:
        return "csv"
    raise DataError(f"{path}: unsupported captions format {suffix!r}; use .jsonl or .csv")


def _make_record(where: str, image_id: Any, caption: Any, split: Any) -> CaptionRecord:
    """Validate one raw record; ``where`` is the ``file:line`` prefix for errors."""
    # COCO ids are JSON integers; bool is an int subclass but never an id.
    if isinstance(image_id, int) and not isinstance(image_id, bool):
        image_id = str(image_id)
    if not isinstance(image_id, str) or not image_id.strip():
        raise DataError(f"{where}: image_id must be a non-empty string, got {image_id!r}")
    if not isinstance(caption, str):
        raise DataError(f"{where}: caption must be a string, got {caption!r}")
    if not caption.strip():
        raise DataError(f"{where}: empty caption for image {image_id.strip()!r}")
    if not isinstance(split, str):
        raise DataError(f"{where}: split must be a string, got {split!r}")
    return CaptionRecord(image_id.strip(), caption.strip(), split.strip())


def _parse_jsonl(f: IO[str], path: Path) -> Iterator[CaptionRecord]:
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("image_id", "caption"):
            if key not in obj:
                raise DataError(f"{where}: missing key {key!r}")
        yield _make_record(where, obj["image_id"], obj["caption"], obj.get("split", ""))


def _parse_csv(f: IO[str], path: Path) -> Iterator[CaptionRecord]:
    reader = csv.DictReader(f)
    if reader.fieldnames is None:
        raise DataError(f"{path}: empty file; expected a header row 'image_id,caption,split'")
    header = [name.strip() for name in reader.fieldnames]
    reader.fieldnames = header
    where = f"{path}:{reader.line_num}"
    # Flickr8k's captions.txt calls the id column "image".
    id_column = next((c for c in ("image_id", "image") if c in header), None)
    if id_column is None:
        raise DataError(f"{where}: header {header} has no 'image_id' (or 'image') column")
    if "caption" not in header:
        raise DataError(f"{where}: header {header} has no 'caption' column")
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:  # DictReader files surplus fields under the key None
            raise DataError(
                f"{where}: {len(header) + len(row[None])} fields but the header has "
                f"{len(header)}; quote captions that contain commas"
            )
        if any(value is None for value in row.values()):
            present = sum(value is not None for value in row.values())
            raise DataError(f"{where}: {present} fields but the header has {len(header)}")
        yield _make_record(where, row[id_column], row["caption"], row.get("split", ""))


def read_captions(path: PathLike) -> list[CaptionRecord]:
    """Read a ``.jsonl`` or ``.csv`` captions file (format in the module docstring)."""
    path = Path(path)
    fmt = _caption_format(path)
    if not path.is_file():
        raise DataError(f"{path}: captions file not found")
    parse = _parse_jsonl if fmt == "jsonl" else _parse_csv
    try:
        # newline="" lets csv handle newlines inside quoted captions.
        with path.open(encoding="utf-8-sig", newline="") as f:
            records = list(parse(f, path))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from exc
    if not records:
        raise DataError(f"{path}: no captions in file")
    return records


def write_captions(records: Iterable[CaptionRecord], path: PathLike) -> None:
    """Write captions atomically as JSONL or CSV, chosen by the file extension."""
    path = Path(path)
    fmt = _caption_format(path)
    checked = [_make_record(f"{path}: record {i}", r.image_id, r.caption, r.split) for i, r in enumerate(records)]
    with atomic_output(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for record in checked:
                f.write(json.dumps(asdict(record), ensure_ascii=False) + "\n")
        else:
            writer = csv.writer(f)
            writer.writerow(CAPTION_FIELDS)
            writer.writerows((r.image_id, r.caption, r.split) for r in checked)


# ---------------------------------------------------------------- features


def _non_finite_ids(items: Mapping[str, torch.Tensor]) -> list[str]:
    return [
        image_id
        for image_id, t in items.items()
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    ]


def _first_mismatch(items: Mapping[str, torch.Tensor]) -> str | None:
    """Describe the first item whose shape or dtype differs from the first item's, if any."""
    iterator = iter(items.items())
    first_id, first = next(iterator)
    for image_id, t in iterator:
        if t.shape != first.shape or t.dtype != first.dtype:
            return (
                f"item {image_id!r} has shape {tuple(t.shape)} {t.dtype} but item "
                f"{first_id!r} has shape {tuple(first.shape)} {first.dtype}; "
                "all items must share one shape and dtype"
            )
    return None


def _without_aliasing(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy only the tensors whose bytes overlap another item's.

    safetensors refuses aliased memory (e.g. one tensor stored under two ids),
    while disjoint rows of one batch tensor are accepted; copying only the
    overlapping ones avoids doubling memory for the common ``batch[i]`` case.
    """
    out = dict(tensors)
    covered_until = -1
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes, key) for key, t in tensors.items() if t.nbytes)
    for start, stop, key in spans:
        if start < covered_until:
            out[key] = tensors[key].clone()
        else:
            covered_until = stop
    return out


def write_features(
    path: PathLike,
    features: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write per-image features to a safetensors file, atomically.

    Args:
        path: destination ``.safetensors`` file; replaced only once fully written.
        features: image id -> tensor; all tensors must share shape and dtype,
            and floating-point values must be finite (the reader enforces the
            same rules, so a file that is written can always be opened).
        metadata: optional string-to-string header metadata.
    """
    path = Path(path)
    if not features:
        raise DataError(f"{path}: no features to write")
    tensors: dict[str, torch.Tensor] = {}
    for image_id, value in features.items():
        if not isinstance(image_id, str) or not image_id:
            raise DataError(f"{path}: image ids must be non-empty strings, got {image_id!r}")
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{path}: feature for {image_id!r} is a {type(value).__name__}, not a torch.Tensor")
        tensors[image_id] = value.detach().cpu().contiguous()
    if (problem := _first_mismatch(tensors)) is not None:
        raise DataError(f"{path}: {problem}")
    if bad := _non_finite_ids(tensors):
        raise DataError(f"{path}: NaN or infinite values in {describe_ids(bad)}")
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise DataError(f"{path}: metadata keys and values must all be strings")
    with atomic_output(path) as tmp:
        save_file(_without_aliasing(tensors), str(tmp), metadata=meta or None)


@dataclass(frozen=True)
class FeatureSpec:
    """What a features file says about its items, without the items: enough to configure a model."""

    path: Path
    item_shape: tuple[int, ...]
    dtype: torch.dtype
    metadata: dict[str, str]

    @property
    def is_pixels(self) -> bool:
        return self.metadata.get("kind") == "pixels" or self.dtype == torch.uint8


class FeatureStore:
    """An opened, validated features file, held in memory.

    Tensors returned by :meth:`all` are the store's own; treat them as read-only.
    """

    def __init__(self, path: Path, items: dict[str, torch.Tensor], metadata: dict[str, str]):
        self.path = path
        self._items = items
        self.metadata = metadata
        first = next(iter(items.values()))
        self.item_shape: tuple[int, ...] = tuple(first.shape)
        self.dtype: torch.dtype = first.dtype

    @classmethod
    def open(cls, path: PathLike) -> FeatureStore:
        """Load and validate a features file written by :func:`write_features` (or any producer)."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: features file not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                items = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{path}: not a readable safetensors file, possibly truncated or corrupt ({exc})") from exc
        if not items:
            raise DataError(f"{path}: contains no features")
        if (problem := _first_mismatch(items)) is not None:
            raise DataError(f"{path}: {problem}")
        if bad := _non_finite_ids(items):
            raise DataError(f"{path}: NaN or infinite values in {describe_ids(bad)}")
        return cls(path, items, metadata)

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(self.path, self.item_shape, self.dtype, dict(self.metadata))

    @property
    def ids(self) -> list[str]:
        """Image ids in file order (safetensors sorts them)."""
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._items

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, n={len(self)}, item_shape={self.item_shape}, dtype={self.dtype})"

    def get(self, ids: list[str]) -> torch.Tensor:
        """Stack the features of ``ids`` into a tensor of shape ``(len(ids), *item_shape)``."""
        if isinstance(ids, str):
            raise TypeError("FeatureStore.get takes a list of ids, not a single string")
        missing = [i for i in dict.fromkeys(ids) if i not in self._items]
        if missing:
            raise DataError(f"{self.path}: no features for {describe_ids(missing)}")
        if not ids:
            return torch.empty((0, *self.item_shape), dtype=self.dtype)
        return torch.stack([self._items[i] for i in ids])

    def all(self) -> dict[str, torch.Tensor]:
        """All items as a new dict, id -> tensor, in file order."""
        return dict(self._items)


def check_ids(records: Iterable[CaptionRecord], store: FeatureStore, captions_path: PathLike) -> None:
    """Raise DataError if any captioned image has no features in ``store``."""
    missing = list(dict.fromkeys(r.image_id for r in records if r.image_id not in store))
    if missing:
        raise DataError(f"{captions_path}: {describe_ids(missing)} have captions but no features in {store.path}")
