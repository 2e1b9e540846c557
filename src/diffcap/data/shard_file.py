"""One safetensors file of features: written with the record of its checks, read by row.

A features file holds one tensor per image, named by its image id (:func:`write_features`); a sharded
store (:mod:`diffcap.data.store`) is a folder of such files, and a single file is a store by itself.

Items are read with ``os.preadv`` straight into their row of the batch tensor. Not
``safe_open``/``get_slice`` or a memory map of the file: those map the whole file, and every page a
process touches then counts in its resident memory until the map is dropped, so one epoch over a mapped
store shows the whole store in every training process (shared page cache, but indistinguishable from a
copy to a user or a scheduler watching RSS). A read copies from the OS page cache, which all processes
on the machine share, and keeps nothing mapped. The header this needs (8-byte length, then JSON of
name -> dtype, shape, byte range) is the documented safetensors format; the files are still written by
safetensors, which stores items of one dtype in name order, so an id's row in its file is its place in
the file's sorted ids.

Checks happen once, when a file is written: :func:`write_features` refuses NaN/inf and mixed shapes,
and records in the file's metadata (key ``diffcap.checks``) the item count, shape, dtype and a SHA-256
of the items' bytes. Opening a file trusts that record after a header-only shape check; a file of
floating-point items without it (another producer's) is scanned for NaN/inf, a chunk at a time, every
time it is opened, since nothing records that an earlier scan passed; writing it again with
:func:`write_features` does. :meth:`ShardFile.verify` rescans the items and compares the checksum.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..io import PathLike, atomic_output
from .errors import DataError, describe_ids

CHECKS_KEY = "diffcap.checks"
_SCAN_CHUNK = 1024  # items read at a time when a file is scanned or verified

DTYPES = {
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
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _raw(t: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's bytes, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy()


def shape_problem(first: tuple[str, tuple, torch.dtype], other: tuple[str, tuple, torch.dtype]) -> str:
    return (
        f"item {other[0]!r} has shape {other[1]} {other[2]} but item {first[0]!r} has shape {first[1]} "
        f"{first[2]}; all items must share one shape and dtype"
    )


def checks_record(items: Mapping[str, torch.Tensor]) -> dict:
    """What a writer vouches for: item count, shape, dtype, finiteness, SHA-256 of the bytes in id order."""
    digest = hashlib.sha256()
    for key in sorted(items):
        digest.update(_raw(items[key]))
    first = next(iter(items.values()))
    return {
        "n": len(items),
        "item_shape": list(first.shape),
        "dtype": DTYPE_NAMES[first.dtype],
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
    if first.dtype not in DTYPE_NAMES:
        raise DataError(f"{path}: dtype {first.dtype} is not one of {sorted(map(str, DTYPE_NAMES))}")
    for image_id, t in tensors.items():
        if t.shape != first.shape or t.dtype != first.dtype:
            problem = shape_problem((first_id, tuple(first.shape), first.dtype), (image_id, tuple(t.shape), t.dtype))
            raise DataError(f"{path}: {problem}")
    if first.is_floating_point() and (bad := [i for i, t in tensors.items() if not bool(torch.isfinite(t).all())]):
        raise DataError(f"{path}: NaN or infinite values in {describe_ids(bad)}")
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise DataError(f"{path}: metadata keys and values must all be strings")
    meta[CHECKS_KEY] = json.dumps(checks_record(tensors))
    with atomic_output(path) as tmp:
        save_file(_without_aliasing(tensors), str(tmp), metadata=meta)


def _read_header(path: Path) -> tuple[int, int, str, list[tuple], dict[str, str], dict | None]:
    """(file size, where the data starts, SHA-256 of the header, sorted (id, dtype, shape, begin, end)
    entries, metadata, record of checks)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            raw = f.read(n)
        header = json.loads(raw)
        metadata = dict(header.pop("__metadata__", None) or {})
        entries = sorted((key, DTYPES[e["dtype"]], tuple(e["shape"]), *e["data_offsets"]) for key, e in header.items())
        record = metadata.pop(CHECKS_KEY, None)
        digest = hashlib.sha256(prefix + raw).hexdigest()
        return size, 8 + n, digest, entries, metadata, json.loads(record) if record else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a readable safetensors file, possibly truncated or corrupt ({exc!r})") from exc


def describe_items(n: int, shape: tuple, dtype: torch.dtype) -> str:
    return f"{n} items of {shape} {dtype}"


class ShardFile:
    """One safetensors file of a store, its items read by row: the row of an id is its place in the file's
    sorted ids. Constructed, it parses the header (every id) and checks it; :meth:`indexed` opens a
    shard of a store as its index describes it, without parsing."""

    def __init__(self, path: Path, *, check: bool = True):
        size, start, self.header_sha256, entries, self.metadata, self.record = _read_header(path)
        if not entries:
            raise DataError(f"{path}: contains no features")
        first_id, dtype, item_shape = entries[0][0], entries[0][1], entries[0][2]
        self._setup(path, len(entries), item_shape, dtype, start)
        self.ids: list[str] | None = [entry[0] for entry in entries]
        end = start
        for key, dtype, shape, begin, stop in entries:
            if (dtype, shape) != (self.dtype, self.item_shape):
                raise DataError(
                    f"{path}: {shape_problem((first_id, self.item_shape, self.dtype), (key, shape, dtype))}"
                )
            if stop - begin != self.item_nbytes:
                raise DataError(f"{path}: not a readable safetensors file: item {key!r} has a wrong byte range")
            end = max(end, start + stop)
        if end != size:
            raise DataError(
                f"{path}: not a readable safetensors file, possibly truncated ({size} bytes, header says {end})"
            )
        begins = np.array([entry[3] for entry in entries], dtype=np.int64)
        self.in_id_order = bool((begins == np.arange(self.n) * self.item_nbytes).all())
        if not self.in_id_order:  # another writer's layout: every item's place is kept
            self._offsets = start + begins
        if not check:
            return
        if self.record is None:
            if self.dtype.is_floating_point:
                self.verify()  # another producer's file: checked at every open (integer pixels cannot be NaN)
        elif (self.record.get("n"), tuple(self.record.get("item_shape", ())), self.record.get("dtype")) != (
            self.n,
            self.item_shape,
            DTYPE_NAMES[self.dtype],
        ):
            raise DataError(f"{path}: its items differ from the record of its checks; the file changed after writing")

    def _setup(self, path: Path, n: int, item_shape: tuple, dtype: torch.dtype, data_start: int) -> None:
        self.path, self.n, self.item_shape, self.dtype, self.data_start = path, n, item_shape, dtype, data_start
        self.item_nbytes = math.prod(item_shape) * dtype.itemsize
        self.in_id_order, self._offsets = True, None
        self._open()

    @classmethod
    def indexed(cls, path: Path, entry: Mapping, item_shape: tuple, dtype: torch.dtype) -> ShardFile:
        """Open a shard as ``index.json`` describes it (``entry``): its size and the SHA-256 of its header
        must be those recorded when the index was written, so the index's rows are its rows."""
        if not path.is_file():
            raise DataError(f"{path.parent}: shard {path.name} is missing")
        shard = cls.__new__(cls)
        shard._setup(path, entry["items"], item_shape, dtype, entry["header_bytes"])
        shard.ids, shard.metadata, shard.record, shard.header_sha256 = None, {}, None, entry["header_sha256"]
        size = os.fstat(shard._fd).st_size
        header = os.pread(shard._fd, shard.data_start, 0)
        intact = hashlib.sha256(header).hexdigest() == entry["header_sha256"]
        if intact and size == shard.data_start + shard.n * shard.item_nbytes:
            return shard
        found = cls(path, check=False)  # what differs, for the message (a damaged file raises here)
        if (found.n, found.item_shape, found.dtype) != (shard.n, item_shape, dtype):
            raise DataError(
                f"{path}: holds {describe_items(found.n, found.item_shape, found.dtype)}, but the index says "
                f"{describe_items(shard.n, item_shape, dtype)}; the shard changed after the index was written"
            )
        raise DataError(
            f"{path}: its header differs from the one the index was written for (other ids, or another layout); "
            "the shard changed after the index was written"
        )

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    # A store goes to DataLoader workers by pickling where processes are spawned: reopen the file there.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_fd"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def read_into(self, row: int, out: np.ndarray) -> None:
        """Copy the item at ``row`` into ``out`` (a writable byte view of its place in a batch)."""
        if not 0 <= row < self.n:
            raise DataError(f"{self.path}: has no row {row}, it holds {self.n} items; the id index is damaged")
        offset = self.data_start + row * self.item_nbytes if self._offsets is None else int(self._offsets[row])
        if os.preadv(self._fd, [out], offset) != self.item_nbytes:
            raise DataError(f"{self.path}: short read of row {row}; the file changed after it was opened")

    def chunks(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        """Every item in id order, ``_SCAN_CHUNK`` at a time (of a parsed file)."""
        for start in range(0, self.n, _SCAN_CHUNK):
            part = self.ids[start : start + _SCAN_CHUNK]
            out = torch.empty((len(part), *self.item_shape), dtype=self.dtype)
            for row, buffer in enumerate(batch_rows(out), start):
                self.read_into(row, buffer)
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


def batch_rows(batch: torch.Tensor) -> np.ndarray:
    """Writable byte views of a fresh batch tensor's rows."""
    return batch.view(len(batch), -1).view(torch.uint8).numpy()
