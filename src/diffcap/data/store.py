"""Feature stores of the data contract, read lazily: one safetensors file, or a folder of shards.

A store is either

* one safetensors file with one tensor per image, named by its image id (:func:`write_features`), or
* a folder of such files, ``shard-00000.safetensors``, ..., with ``index.json`` (the shards, their item
  counts, the item shape and dtype, the metadata) and ``ids.npy``, the id index: every id's key, sorted,
  with the shard and row that hold it. ``diffcap prepare`` writes this (:func:`write_store`,
  :func:`write_index`).

Opening a folder reads ``index.json`` and maps ``ids.npy`` (a NumPy file of fixed-width records, read
with ``mmap_mode="r"``): no id list is parsed, so a store opens in the same time at 1,000 items as at
100,000. An id is found by binary search in the mapped keys, touching a few pages of the file. A shard
is opened when an item of it is first read, by checking its size and the SHA-256 of its header against
``index.json``, without parsing the header's id list either. A process's memory thus grows with the
batch it reads, not with the store; the full id list is built only when :attr:`FeatureStore.ids` is
asked for (the training path does not ask).

Items are read with ``os.preadv`` straight into their row of the batch tensor. Not
``safe_open``/``get_slice`` or a memory map of the shards: those map the whole file, and every page a
process touches then counts in its resident memory until the map is dropped, so one epoch over a mapped
store shows the whole store in every training process (shared page cache, but indistinguishable from a
copy to a user or a scheduler watching RSS). A read copies from the OS page cache, which all processes
on the machine share, and keeps nothing mapped. The id index is the exception: it is a few tens of
bytes per item, and mapping it is what lets opening skip it. The shard header this needs (8-byte length,
then JSON of name -> dtype, shape, byte range) is the documented safetensors format; the files are still
written by safetensors, which stores items of one dtype in name order, so an id's row in its shard is
its place in the shard's sorted ids.

Checks happen once, when a file is written: :func:`write_features` refuses NaN/inf and mixed shapes,
and records in the file's metadata (key ``diffcap.checks``) the item count, shape, dtype and a SHA-256
of the items' bytes; :func:`write_index` refuses an id held by two shards and records the SHA-256 of
``ids.npy`` and of each shard's header. Opening a file trusts that record after a header-only shape
check; a file of floating-point items without it (another producer's) is scanned for NaN/inf, a chunk
at a time, every time it is opened, since nothing records that an earlier scan passed; writing it
again with :func:`write_features` does. :meth:`FeatureStore.verify` (``diffcap check-data``) rescans
everything and compares the checksums.

Stores written before the id index (``index.json`` format ``diffcap-feature-shards/1``, which lists
every id) still open: their index is built in memory from that list, as it is for a single file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..io import PathLike, atomic_output, write_json
from .errors import DataError, describe_ids

CHECKS_KEY = "diffcap.checks"
INDEX_FILE = "index.json"
ID_INDEX_FILE = "ids.npy"
INDEX_FORMAT = "diffcap-feature-shards/2"
_INDEX_FORMAT_LISTING_IDS = "diffcap-feature-shards/1"  # index.json with every id in it
_SCAN_CHUNK = 1024  # items read at a time when a file is scanned or verified
# An id is its own key in the id index when its UTF-8 fits in this many bytes; a longer one is keyed by
# its first 32 bytes and its SHA-256, so one long path does not widen every record of the index.
KEY_BYTES = 64

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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------- the id index


def _id_key(image_id: str) -> bytes:
    """An id's key in the id index: its UTF-8, or for an id longer than ``KEY_BYTES``, its first 32 bytes
    and its SHA-256 (two long ids share a key only if their hashes collide)."""
    raw = image_id.encode("utf-8", "surrogatepass")  # a lone surrogate (from a JSON escape) matches nothing
    return raw if len(raw) <= KEY_BYTES else raw[: KEY_BYTES - 32] + hashlib.sha256(raw).digest()


def _index_dtype(key_bytes: int) -> np.dtype:
    """One record per id: its key (NUL-padded), the shard holding it, its row there (its place in the shard's
    sorted ids). The key comes first so that the mapped ``id`` column is searched in place: NumPy's
    searchsorted reads a strided, aligned column without copying it (while the ids searched for are
    fewer than the records)."""
    return np.dtype([("id", f"S{key_bytes}"), ("shard", "<u4"), ("row", "<u4")])


def _keys(ids: list[str], where: object) -> np.ndarray:
    """The keys of a shard's ids as a NumPy bytes array, refusing ids that no fixed-width key can hold."""
    keys = [_id_key(i) for i in ids]
    # NumPy drops trailing NUL bytes, so an id ending in NUL would share the key of the id without it.
    if bad := [i for i, k in zip(ids, keys) if b"\0" in k]:
        raise DataError(f"{where}: {describe_ids(bad)} contain a NUL character, which an image id may not")
    return np.array(keys, dtype=bytes)


def _build_id_index(
    shard_keys: list[np.ndarray], names: list[str], id_at: Callable[[int, int], str], where: object
) -> np.ndarray:
    """The sorted id index of the shards ``names`` whose sorted ids have the keys ``shard_keys``; an id in two
    shards raises, naming it (found with ``id_at(shard, row)``) and both shards."""
    width = -(-max(keys.dtype.itemsize for keys in shard_keys) // 8) * 8  # whole words: aligned records
    index = np.empty(sum(map(len, shard_keys)), dtype=_index_dtype(width))
    start = 0
    for k, keys in enumerate(shard_keys):
        part = index[start : start + len(keys)]
        part["id"], part["shard"], part["row"] = keys, k, np.arange(len(keys))
        start += len(keys)
    index = index[np.argsort(index["id"], kind="stable")]
    repeated = np.flatnonzero(index["id"][1:] == index["id"][:-1])
    if len(repeated):
        first, second = index[repeated[0]], index[repeated[0] + 1]
        a, b = int(first["shard"]), int(second["shard"])
        more = f" ({len(repeated) - 1} more ids are in more than one shard)" if len(repeated) > 1 else ""
        raise DataError(
            f"{where}: id {id_at(a, int(first['row']))!r} is in {names[a]} and in {names[b]}{more}; "
            "each id must be in one shard"
        )
    return index


def _map_id_index(path: Path, entry: Mapping) -> np.ndarray:
    """Map the id index read-only, checking only what costs no scan: the file's size against the one
    recorded in index.json (``entry``) and against the array its NumPy header describes, and that header."""
    n = entry["items"]
    if not path.is_file():
        raise DataError(f"{path}: the store's id index is missing; write the store again (or its index)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise DataError(
            f"{path}: {size} bytes, but {INDEX_FILE} says {entry['bytes']}: the id index is truncated "
            "or was replaced after the store was written"
        )
    try:
        index = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: not a readable id index, possibly truncated or corrupt ({exc})") from exc
    if index.dtype != _index_dtype(entry["key_bytes"]) or index.shape != (n,) or index.offset + index.nbytes != size:
        raise DataError(
            f"{path}: holds {index.shape} records of {index.dtype} in {size} bytes, but {INDEX_FILE} says "
            f"{n} records of {entry['key_bytes']}-byte keys; the id index was replaced after the store was written"
        )
    return index


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
    """Write ``folder/ids.npy`` and then ``folder/index.json`` for the shard ``files`` (in that order), read
    from their headers only. An id in two shards is refused, naming it and the two files."""
    folder = Path(folder)
    if not files:
        raise DataError(f"{folder}: no shards to index")
    shards, keys, first = [], [], None
    for path in files:
        shard = ShardFile(path)
        this = (shard.ids[0], shard.item_shape, shard.dtype)
        if first is not None and this[1:] != first[1:]:
            raise DataError(f"{folder}: {path.name}: {_shape_problem(first, this)}")
        first = first or this
        if not shard.in_id_order:
            raise DataError(f"{path}: its items are not stored in id order, as safetensors writes them; rewrite it")
        keys.append(_keys(shard.ids, path))
        shards.append(
            {
                "file": path.relative_to(folder).as_posix(),
                "items": shard.n,
                "header_bytes": shard.data_start,
                "header_sha256": shard.header_sha256,
            }
        )
    names = [path.name for path in files]
    index = _build_id_index(keys, names, lambda k, row: ShardFile(files[k], check=False).ids[row], folder)
    with atomic_output(folder / ID_INDEX_FILE) as tmp, tmp.open("wb") as f:
        np.save(f, index, allow_pickle=False)
    index_entry = {
        "file": ID_INDEX_FILE,
        "key_bytes": index.dtype["id"].itemsize,
        "bytes": (folder / ID_INDEX_FILE).stat().st_size,
        "sha256": _file_sha256(folder / ID_INDEX_FILE),
    }
    write_json(
        folder / INDEX_FILE,
        {
            "format": INDEX_FORMAT,
            "item_shape": list(first[1]),
            "dtype": _DTYPE_NAMES[first[2]],
            "metadata": dict(metadata or {}),
            "items": len(index),
            "id_index": index_entry,
            "shards": shards,
        },
    )
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
        entries = sorted((key, _DTYPES[e["dtype"]], tuple(e["shape"]), *e["data_offsets"]) for key, e in header.items())
        record = metadata.pop(CHECKS_KEY, None)
        digest = hashlib.sha256(prefix + raw).hexdigest()
        return size, 8 + n, digest, entries, metadata, json.loads(record) if record else None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: not a readable safetensors file, possibly truncated or corrupt ({exc!r})") from exc


def _describe(n: int, shape: tuple, dtype: torch.dtype) -> str:
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
                    f"{path}: {_shape_problem((first_id, self.item_shape, self.dtype), (key, shape, dtype))}"
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
            _DTYPE_NAMES[self.dtype],
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
                f"{path}: holds {_describe(found.n, found.item_shape, found.dtype)}, but the index says "
                f"{_describe(shard.n, item_shape, dtype)}; the shard changed after the index was written"
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
            for row, buffer in enumerate(_rows(out), start):
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

    def __init__(
        self,
        path: Path,
        shards: list[dict],
        spec: tuple,
        metadata: dict[str, str],
        index: np.ndarray,
        *,
        ids: list[str] | None = None,
        index_entry: dict | None = None,
    ):
        self.path = path
        self.metadata = metadata
        self.item_shape: tuple[int, ...] = spec[0]
        self.dtype: torch.dtype = spec[1]
        self._shards = shards  # file (a Path), items and, from an index with the id index, the header's size and hash
        self._index = index
        self._index_entry = index_entry  # the id index's record in index.json when it is mapped from ids.npy
        self._ids = ids  # every id in store order, once known
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
        index = _build_id_index([_keys(shard.ids, path)], [path.name], lambda k, row: shard.ids[row], path)
        spec = (shard.item_shape, shard.dtype)
        store = cls(path, [{"file": path, "items": shard.n}], spec, shard.metadata, index, ids=shard.ids)
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
            if index.get("format") not in (INDEX_FORMAT, _INDEX_FORMAT_LISTING_IDS):
                raise ValueError(f"format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
            spec = (tuple(index["item_shape"]), _DTYPES[index["dtype"]])
            metadata = dict(index.get("metadata") or {})
            shards = [dict(s, file=folder / s["file"]) for s in index["shards"]]
            if index["format"] == _INDEX_FORMAT_LISTING_IDS:
                listed = [list(s.pop("ids")) for s in shards]
                for s, ids in zip(shards, listed):
                    s["items"] = len(ids)
            else:
                entry = dict(index["id_index"], items=int(index["items"]))
                if entry["items"] != sum(int(s["items"]) for s in shards):
                    raise ValueError(f"{entry['items']} items, but its shards add up to another count")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(f"{index_path}: not a readable store index ({exc!r})") from exc
        if not shards or not any(s["items"] for s in shards):
            raise DataError(f"{folder}: contains no features")
        if index["format"] == _INDEX_FORMAT_LISTING_IDS:  # written before ids.npy: the index is built here
            keys = [_keys(ids, index_path) for ids in listed]
            names = [s["file"].name for s in shards]
            ids_index = _build_id_index(keys, names, lambda k, row: listed[k][row], index_path)
            return cls(folder, shards, spec, metadata, ids_index, ids=[i for part in listed for i in part])
        ids_index = _map_id_index(folder / entry["file"], entry)
        return cls(folder, shards, spec, metadata, ids_index, index_entry=entry)

    # The mapped id index goes to spawned DataLoader workers as its file, not its bytes: mapped again there.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self._index_entry is not None:
            state["_index"], state["_ids"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._index is None:
            self._index = _map_id_index(self.path / self._index_entry["file"], self._index_entry)

    def _shard(self, k: int) -> ShardFile:
        shard = self._opened.get(k)
        if shard is not None:
            return shard
        entry = self._shards[k]
        if "header_sha256" in entry:
            shard = ShardFile.indexed(entry["file"], entry, self.item_shape, self.dtype)
        else:  # a store indexed before headers were recorded: parse the shard, compare with the index
            if not entry["file"].is_file():
                raise DataError(f"{self.path}: shard {entry['file'].name} is missing")
            shard = ShardFile(entry["file"])
            if (shard.n, shard.item_shape, shard.dtype) != (entry["items"], self.item_shape, self.dtype):
                raise DataError(
                    f"{shard.path}: holds {_describe(shard.n, shard.item_shape, shard.dtype)}, but the index says "
                    f"{_describe(entry['items'], self.item_shape, self.dtype)}"
                )
        self._opened[k] = shard
        return shard

    def _locate(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, row, found) for each of ``ids``, by binary search in the sorted keys."""
        key_dtype = self._index.dtype["id"]
        keys = [_id_key(i) for i in ids]
        usable = np.array([len(k) <= key_dtype.itemsize and b"\0" not in k for k in keys], dtype=bool)
        needles = np.array([k if ok else b"" for k, ok in zip(keys, usable)], dtype=key_dtype)
        at = np.minimum(np.searchsorted(self._index["id"], needles), len(self._index) - 1)
        hits = self._index[at]
        found = usable & (hits["id"] == needles)
        return hits["shard"].astype(np.int64), hits["row"].astype(np.int64), found

    def _parse_shard(self, k: int) -> ShardFile:
        """Shard k with its header parsed (every id), as the index recorded it."""
        entry = self._shards[k]
        if not entry["file"].is_file():
            raise DataError(f"{self.path}: shard {entry['file'].name} is missing")
        shard = ShardFile(entry["file"], check=False)
        if shard.n != entry["items"] or shard.header_sha256 != entry.get("header_sha256", shard.header_sha256):
            raise DataError(
                f"{shard.path}: differs from the shard the index was written for (it holds {shard.n} items, "
                f"the index says {entry['items']}, or its header changed)"
            )
        return shard

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(self.path, self.item_shape, self.dtype, dict(self.metadata))

    @property
    def ids(self) -> list[str]:
        """Every id, in store order. A store with an id index lists them only when asked, from its shards'
        headers (parsing each one); reading items never needs the list."""
        if self._ids is None:
            self._ids = [i for k in range(len(self._shards)) for i in self._parse_shard(k).ids]
        return list(self._ids)

    def missing(self, ids: list[str]) -> list[str]:
        """Those of ``ids`` that the store has no item for, each once, in order (one search for all)."""
        unique = list(dict.fromkeys(ids))
        return [i for i, ok in zip(unique, self._locate(unique)[2]) if not ok]

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and bool(self._locate([image_id])[2][0])

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, n={len(self)}, item_shape={self.item_shape}, dtype={self.dtype})"

    def get(self, ids: list[str]) -> torch.Tensor:
        """Read the features of ``ids`` into a new tensor of shape ``(len(ids), *item_shape)``."""
        if isinstance(ids, str):
            raise TypeError("FeatureStore.get takes a list of ids, not a single string")
        shards, rows, found = self._locate(ids)
        if not found.all():
            missing = list(dict.fromkeys(i for i, ok in zip(ids, found) if not ok))
            raise DataError(f"{self.path}: no features for {describe_ids(missing)}")
        out = torch.empty((len(ids), *self.item_shape), dtype=self.dtype)
        if len(ids):
            for k, row, buffer in zip(shards.tolist(), rows.tolist(), _rows(out)):
                self._shard(k).read_into(row, buffer)
        return out

    def all(self) -> dict[str, torch.Tensor]:
        """All items as a new dict, id -> tensor, in store order (reads the whole store into memory)."""
        ids = self.ids
        return dict(zip(ids, self.get(ids)))

    def verify(self) -> dict:
        """Rescan everything: the id index against its checksum and the shards' ids, every item's values
        (finite) and checksum against the record written with it."""
        if self._index_entry is not None:
            index_file = self.path / self._index_entry["file"]
            if _file_sha256(index_file) != self._index_entry["sha256"]:
                raise DataError(f"{index_file}: checksum mismatch: the id index changed after the store was written")
        checked = 0
        for k in range(len(self._shards)):
            shard = self._parse_shard(k)
            shards, rows, found = self._locate(shard.ids)
            if not (found.all() and (shards == k).all() and (rows == np.arange(shard.n)).all()):
                raise DataError(f"{shard.path}: its ids differ from those the index lists for it")
            shard.verify()
            checked += shard.record is not None
        return {"path": str(self.path), "items": len(self), "shards": len(self._shards), "with_checksum": checked}
