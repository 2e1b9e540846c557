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

Features
    A safetensors file with one tensor per image, named by its image id, or
    a folder of such files (shards) with an ``index.json`` and an id index
    ``ids.npy``: see
    :mod:`diffcap.data.store`, which reads and writes both, lazily. All
    tensors share one *item shape* and one dtype: a pooled vector ``(D,)``, a
    token grid ``(N, D)``, or raw pixels such as ``(3, 64, 64)`` uint8.
    Floating-point values must be finite. The header's free-form metadata
    (string to string, e.g. the encoder name) travels with the file; a store
    joined from several condition sources (:mod:`diffcap.data.sources`)
    records each source's token count there as ``segments`` ("1,1").
    safetensors stores names sorted, so ``FeatureStore.ids`` is in sorted
    order (within each shard), not the order the writer used.

Every problem found in these files raises :class:`DataError`, whose message
starts with the file name (and ``:line`` where one applies) and names the
offending ids, at most five of them plus a count.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from ..io import PathLike, atomic_output
from .errors import DataError, describe_ids
from .shard_file import write_features
from .store import FeatureSpec, FeatureStore

__all__ = [
    "CaptionRecord",
    "DataError",
    "FeatureSpec",
    "FeatureStore",
    "check_ids",
    "describe_ids",
    "read_captions",
    "write_captions",
    "write_features",
]

CAPTION_FIELDS = ("image_id", "caption", "split")
_JSONL_SUFFIXES = frozenset({".jsonl"})
_CSV_SUFFIXES = frozenset({".csv", ".txt"})


@dataclass(frozen=True)
class CaptionRecord:
    """One caption of one image."""

    image_id: str
    caption: str
    split: str = ""


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


# ------------------------------------------------------------- features (read and written in store.py, shard_file.py)


def check_ids(records: Iterable[CaptionRecord], store: FeatureStore, captions_path: PathLike) -> None:
    """Raise DataError if any captioned image has no features in ``store``."""
    missing = store.missing([r.image_id for r in records])
    if missing:
        raise DataError(f"{captions_path}: {describe_ids(missing)} have captions but no features in {store.path}")
