"""Feature stores of the data contract, read lazily: one safetensors file, or a folder of shards.

A store is either

* one safetensors file with one tensor per image, named by its image id (:func:`write_features`), or
* a folder of such files, ``shard-00000.safetensors``, ..., with ``index.json`` listing the ids each
  shard holds (id -> shard); ``diffcap prepare`` writes this (:func:`write_store`, :func:`write_index`).

Opening reads the index (or the single file's header), never the items: a store opens in the same
time at 1,000 items as at 100,000, and a process's memory grows with the batch it reads, not with the
store. Items are read with ``os.preadv`` straight into their row of the batch tensor. Not
``safe_open``/``get_slice`` or a memory map: those map the whole file, and every page a process
touches then counts in its resident memory until the map is dropped, so one epoch over a mapped store
shows the whole store in every training process (shared page cache, but indistinguishable from a copy
to a user or a scheduler watching RSS). A read copies from the OS page cache, which all processes on
the machine share, and keeps nothing mapped. The header this needs (8-byte length, then JSON of
name -> dtype, shape, byte range) is the documented safetensors format; the files are still written
by safetensors.

Checks happen once, when a file is written: :func:`write_features` refuses NaN/inf and mixed shapes,
and records in the file's metadata (key ``diffcap.checks``) the item count, shape, dtype and a SHA-256
of the items' bytes. Opening a file trusts that record after a header-only shape check; a file of floating-point
items without it (another producer's) is scanned for NaN/inf, a chunk at a time, every time it is opened,
since nothing records that an earlier scan passed; writing it again with :func:`write_features` does.
:meth:`FeatureStore.verify` (``diffcap check-data``) rescans everything and compares the checksums.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..io import PathLike, atomic_output, write_json
from .errors import DataError, describe_ids

CHECKS_KEY = "diffcap.checks"
INDEX_FILE = "index.json"
INDEX_FORMAT = "diffcap-feature-shards/1"
_SCAN_CHUNK = 1024  # items read at a time when a file is scanned or verified

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _raw(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's bytes, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _shape_problem(first: tuple[str, tuple, torch.dtype], other: tuple[str, tuple, torch.dtype]) -> str:
    return (
        f"item {other[0]!r} has shape {other[1]} {other[2]} but item {first[0]!r} has shape {first[1]} "
        f"{first[2]}; all items must share one shape and dtype"
    )


# ---------------------------------------------------------------- writing


def checks_record(items: Mapping[str, torch.Tensor]) -> dict:
    """What a writer vouches for: item count, shape, dtype, finiteness, SHA-256 of the bytes in id order."""
    digest = hashlib.sha256()
    for key in sorted(items):
        digest.update(_raw(items[key]))
    first = next(iter(items.values()))
    return {
        "n": len(items),
        "item_shape": list(first.shape),
        "dtype": _DTYPE_NAMES[first.dtype],
        "finite": True,
        "sha256": digest.hexdigest(),
    }


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
    """Write per-image features to a safetensors file, atomically, with the record of its checks.

    Args:
        path: destination ``.safetensors`` file; replaced only once fully written.
        features: image id -> tensor; all tensors must share shape and dtype,
            and floating-point values must be finite.
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
    first_id, first = next(iter(tensors.items()))
    if first.dtype not in _DTYPE_NAMES:
        raise DataError(f"{path}: dtype {first.dtype} is not one of {sorted(map(str, _DTYPE_NAMES))}")
    for image_id, t in tensors.items():
        if t.shape != first.shape or t.dtype != first.dtype:
            problem = _shape_problem((first_id, tuple(first.shape), first.dtype), (image_id, tuple(t.shape), t.dtype))
            raise DataError(f"{path}: {problem}")
    if first.is_floating_point() and (bad := [i for i, t in tensors.items() if not bool(torch.isfinite(t).all())]):
        raise DataError(f"{path}: NaN or infinite values in {describe_ids(bad)}")
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise DataError(f"{path}: metadata keys and values must all be strings")
    meta[CHECKS_KEY] = json.dumps(checks_record(tensors))
    with atomic_output(path) as tmp:
        save_file(_without_aliasing(tensors), str(tmp), metadata=meta)


def write_index(folder: PathLike, files: list[Path], metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``folder/index.json`` for the shard ``files`` (in that order), read from their headers only."""
    folder = Path(folder)
    shards, first, seen = [], None, set()
    for path in files:
        shard = ShardFile(path)
        this = (shard.ids[0], shard.item_shape, shard.dtype)
        if first is not None and this[1:] != first[1:]:
            raise DataError(f"{folder}: {path.name}: {_shape_problem(first, this)}")
        first = first or this
        if dupes := [i for i in shard.ids if i in seen]:
            raise DataError(f"{folder}: {path.name} repeats {describe_ids(dupes)} of an earlier shard")
        seen.update(shard.ids)
        shards.append({"file": path.relative_to(folder).as_posix(), "ids": shard.ids})
    if first is None:
        raise DataError(f"{folder}: no shards to index")
    index = {
        "format": INDEX_FORMAT,
        "item_shape": list(first[1]),
        "dtype": _DTYPE_NAMES[first[2]],
        "metadata": dict(metadata or {}),
        "shards": shards,
    }
    write_json(folder / INDEX_FILE, index)
    return folder / INDEX_FILE


def write_store(
    folder: PathLike,
    features: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    shard_size: int = 4096,
) -> Path:
    """Write ``features`` as a sharded store: ids in sorted order, ``shard_size`` per shard, then the index."""
    folder = Path(folder)
    ids = sorted(features)
    if not ids:
        raise DataError(f"{folder}: no features to write")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_FILE).unlink(missing_ok=True)  # a half-rewritten store must not open
    files = []
    for k, start in enumerate(range(0, len(ids), shard_size)):
        files.append(folder / shard_name(k))
        write_features(files[-1], {i: features[i] for i in ids[start : start + shard_size]}, metadata)
    for stale in set(folder.glob("shard-*.safetensors")) - set(files):
        stale.unlink()
    return write_index(folder, files, metadata)


# ---------------------------------------------------------------- reading


def _read_header(path: Path) -> tuple[int, int, list[tuple], dict[str, str], dict | None]:
    """(file size, where the data starts, sorted (id, dtype, shape, begin, end) entries, metadata, record)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(f.read(n))
        metadata = dict(header.pop("__metadata__", None) or {})
        entries = sorted((key, _DTYPES[e["dtype"]], tuple(e["shape"]), *e["data_offsets"]) for key, e in header.items())
        record = metadata.pop(CHECKS_KEY, None)
        return size, 8 + n, entries, metadata, json.loads(record) if record else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a readable safetensors file, possibly truncated or corrupt ({exc!r})") from exc


class ShardFile:
    """One safetensors file of a store: its header parsed, its checks done, its items read on demand."""

    def __init__(self, path: Path, *, check: bool = True):
        self.path = path
        size, start, entries, self.metadata, self.record = _read_header(path)
        if not entries:
            raise DataError(f"{path}: contains no features")
        first_id, self.dtype, self.item_shape = entries[0][0], entries[0][1], entries[0][2]
        self.item_nbytes = math.prod(self.item_shape) * self.dtype.itemsize
        end = start
        self.offsets: dict[str, int] = {}
        for key, dtype, shape, begin, stop in entries:
            if (dtype, shape) != (self.dtype, self.item_shape):
                raise DataError(
                    f"{path}: {_shape_problem((first_id, self.item_shape, self.dtype), (key, shape, dtype))}"
                )
            if stop - begin != self.item_nbytes:
                raise DataError(f"{path}: not a readable safetensors file: item {key!r} has a wrong byte range")
            self.offsets[key] = start + begin
            end = max(end, start + stop)
        if end != size:
            raise DataError(
                f"{path}: not a readable safetensors file, possibly truncated ({size} bytes, header says {end})"
            )
        self._open()
        if not check:
            return
        if self.record is None:
            if self.dtype.is_floating_point:
                self.verify()  # another producer's file: checked at every open (integer pixels cannot be NaN)
        elif (self.record.get("n"), tuple(self.record.get("item_shape", ())), self.record.get("dtype")) != (
            len(self.offsets),
            self.item_shape,
            _DTYPE_NAMES[self.dtype],
        ):
            raise DataError(f"{path}: its items differ from the record of its checks; the file changed after writing")

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    # A store goes to DataLoader workers by pickling where processes are spawned: reopen the file there.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_fd"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    @property
    def ids(self) -> list[str]:
        return list(self.offsets)

    def read_into(self, image_id: str, row: np.ndarray) -> None:
        """Copy one item's bytes into ``row`` (a writable byte view of its place in a batch)."""
        if os.preadv(self._fd, [row], self.offsets[image_id]) != self.item_nbytes:
            raise DataError(f"{self.path}: short read of {image_id!r}; the file changed after it was opened")

    def chunks(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Every item in id order, ``_SCAN_CHUNK`` at a time."""
        ids = self.ids
        for start in range(0, len(ids), _SCAN_CHUNK):
            part = ids[start : start + _SCAN_CHUNK]
            out = torch.empty((len(part), *self.item_shape), dtype=self.dtype)
            for image_id, row in zip(part, _rows(out)):
                self.read_into(image_id, row)
            yield part, out

    def verify(self) -> None:
        """Read every item: finite values and, where a record of checks exists, its checksum."""
        digest, bad = hashlib.sha256(), []
        for part, values in self.chunks():
            if values.is_floating_point():
                finite = torch.isfinite(values.reshape(len(part), -1)).all(dim=1)
                bad += [i for i, ok in zip(part, finite.tolist()) if not ok]
            digest.update(_raw(values))
        if bad:
            raise DataError(f"{self.path}: NaN or infinite values in {describe_ids(bad)}")
        if self.record is not None and self.record.get("sha256") != digest.hexdigest():
            raise DataError(f"{self.path}: checksum mismatch: the items changed after the file was written")


def _rows(batch: torch.Tensor) -> np.ndarray:
    """Writable byte views of a fresh batch tensor's rows."""
    return batch.view(len(batch), -1).view(torch.uint8).numpy()


@dataclass(frozen=True)
class FeatureSpec:
    """What a store says about its items, without the items: enough to configure a model."""

    path: Path
    item_shape: tuple[int, ...]
    dtype: torch.dtype
    metadata: dict[str, str]

    @property
    def is_pixels(self) -> bool:
        return self.metadata.get("kind") == "pixels" or self.dtype == torch.uint8


class FeatureStore:
    """An opened feature store (a safetensors file or a folder of shards); items are read on demand.

    Open with :meth:`open`. ``ids`` are in store order: sorted within each shard, shards in index order.
    """

    def __init__(self, path: Path, files: list[Path], index: list[list[str]], spec: tuple, metadata: dict[str, str]):
        self.path = path
        self.metadata = metadata
        self.item_shape: tuple[int, ...] = spec[0]
        self.dtype: torch.dtype = spec[1]
        self._files = files
        self._where = {image_id: k for k, ids in enumerate(index) for image_id in ids}
        if len(self._where) != sum(map(len, index)):
            raise DataError(f"{path}: the index lists some ids in more than one shard")
        self._counts = [len(ids) for ids in index]
        self._opened: dict[int, ShardFile] = {}

    @classmethod
    def open(cls, path: PathLike) -> FeatureStore:
        """Open a features file (:func:`write_features`) or a sharded store folder (:func:`write_store`)."""
        path = Path(path)
        if path.is_dir():
            return cls._open_folder(path)
        if not path.is_file():
            raise DataError(f"{path}: features file not found")
        shard = ShardFile(path)
        store = cls(path, [path], [shard.ids], (shard.item_shape, shard.dtype), shard.metadata)
        store._opened[0] = shard
        return store

    @classmethod
    def _open_folder(cls, folder: Path) -> FeatureStore:
        index_path = folder / INDEX_FILE
        if not index_path.is_file():
            raise DataError(
                f"{folder}: no {INDEX_FILE}, so not a feature store (an interrupted `diffcap prepare`? run it again)"
            )
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
            spec = (tuple(index["item_shape"]), _DTYPES[index["dtype"]])
            files = [folder / s["file"] for s in index["shards"]]
            ids = [list(s["ids"]) for s in index["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{index_path}: not a readable store index ({exc!r})") from exc
        if not files or not any(ids):
            raise DataError(f"{folder}: contains no features")
        return cls(folder, files, ids, spec, dict(index.get("metadata") or {}))

    def _shard(self, k: int) -> ShardFile:
        shard = self._opened.get(k)
        if shard is None:
            if not self._files[k].is_file():
                raise DataError(f"{self.path}: shard {self._files[k].name} is missing")
            shard = ShardFile(self._files[k])
            if (shard.item_shape, shard.dtype) != (self.item_shape, self.dtype) or len(shard.ids) != self._counts[k]:
                raise DataError(
                    f"{shard.path}: holds {len(shard.ids)} items of {shard.item_shape} {shard.dtype}, "
                    f"but the index says {self._counts[k]} of {self.item_shape} {self.dtype}"
                )
            self._opened[k] = shard
        return shard

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(self.path, self.item_shape, self.dtype, dict(self.metadata))

    @property
    def ids(self) -> list[str]:
        return list(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._where

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, n={len(self)}, item_shape={self.item_shape}, dtype={self.dtype})"

    def get(self, ids: list[str]) -> torch.Tensor:
        """Read the features of ``ids`` into a new tensor of shape ``(len(ids), *item_shape)``."""
        if isinstance(ids, str):
            raise TypeError("FeatureStore.get takes a list of ids, not a single string")
        missing = [i for i in dict.fromkeys(ids) if i not in self._where]
        if missing:
            raise DataError(f"{self.path}: no features for {describe_ids(missing)}")
        out = torch.empty((len(ids), *self.item_shape), dtype=self.dtype)
        if not ids:
            return out
        for image_id, row in zip(ids, _rows(out)):
            shard = self._shard(self._where[image_id])
            if image_id not in shard.offsets:
                raise DataError(f"{shard.path}: has no item {image_id!r}, which the index puts there")
            shard.read_into(image_id, row)
        return out

    def all(self) -> dict[str, torch.Tensor]:
        """All items as a new dict, id -> tensor, in store order (reads the whole store into memory)."""
        ids = self.ids
        return dict(zip(ids, self.get(ids)))

    def verify(self) -> dict:
        """Rescan every item: finite values, checksums against the records, the index against the shards."""
        listed: list[list[str]] = [[] for _ in self._files]
        for image_id, k in self._where.items():
            listed[k].append(image_id)
        checked = 0
        for path, expected in zip(self._files, listed):
            if not path.is_file():
                raise DataError(f"{self.path}: shard {path.name} is missing")
            shard = ShardFile(path, check=False)
            if sorted(expected) != shard.ids:
                raise DataError(f"{path}: its ids differ from those the index lists for it")
            shard.verify()
            checked += shard.record is not None
        return {"path": str(self.path), "items": len(self), "shards": len(self._files), "with_checksum": checked}
