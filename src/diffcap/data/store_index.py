"""The files that index a sharded feature store: ``index.json`` and the sorted id index ``ids.npy``.

``ids.npy`` is a NumPy file of fixed-width records, one per id: its key, sorted, with the shard and row
that hold it. A store maps it read-only (``mmap_mode="r"``) and finds an id by binary search in the
mapped keys, touching a few pages of the file, so no id list is parsed and a store opens in the same
time at 1,000 items as at 100,000. It is the one file a store keeps mapped (see
:mod:`diffcap.data.shard_file` for why shards are not): a few tens of bytes per item, and mapping it is
what lets opening skip it. Building it refuses an id held by two shards; ``index.json`` records its size
and SHA-256, which :func:`map_id_index` and :func:`verify_id_index` check.

A single file, or a store written before the id index (``index.json`` format ``diffcap-feature-shards/1``,
which lists every id), gets the same index built in memory (:func:`build_id_index`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from ..io import atomic_output, file_sha256
from .errors import DataError, describe_ids

INDEX_FILE = "index.json"
ID_INDEX_FILE = "ids.npy"
INDEX_FORMAT = "diffcap-feature-shards/2"
INDEX_FORMAT_LISTING_IDS = "diffcap-feature-shards/1"  # index.json with every id in it
# An id is its own key in the id index when its UTF-8 fits in this many bytes; a longer one is keyed by
# its first 32 bytes and its SHA-256, so one long path does not widen every record of the index.
KEY_BYTES = 64


def id_key(image_id: str) -> bytes:
    """An id's key in the id index: its UTF-8, or for an id longer than ``KEY_BYTES``, its first 32 bytes
    and its SHA-256 (two long ids share a key only if their hashes collide)."""
    raw = image_id.encode("utf-8", "surrogatepass")  # a lone surrogate (from a JSON escape) matches nothing
    return raw if len(raw) <= KEY_BYTES else raw[: KEY_BYTES - 32] + hashlib.sha256(raw).digest()


def index_dtype(key_bytes: int) -> np.dtype:
    """One record per id: its key (NUL-padded), the shard holding it, its row there (its place in the shard's
    sorted ids). The key comes first so that the mapped ``id`` column is searched in place: NumPy's
    searchsorted reads a strided, aligned column without copying it (while the ids searched for are
    fewer than the records)."""
    return np.dtype([("id", f"S{key_bytes}"), ("shard", "<u4"), ("row", "<u4")])


def shard_keys(ids: list[str], where: object) -> np.ndarray:
    """The keys of a shard's ids as a NumPy bytes array, refusing ids that no fixed-width key can hold."""
    keys = [id_key(i) for i in ids]
    # NumPy drops trailing NUL bytes, so an id ending in NUL would share the key of the id without it.
    if bad := [i for i, k in zip(ids, keys) if b"\0" in k]:
        raise DataError(f"{where}: {describe_ids(bad)} contain a NUL character, which an image id may not")
    return np.array(keys, dtype=bytes)


def build_id_index(
    keys_per_shard: list[np.ndarray], names: list[str], id_at: Callable[[int, int], str], where: object
) -> np.ndarray:
    """The sorted id index of the shards ``names`` whose sorted ids have the keys ``keys_per_shard``; an id in
    two shards raises, naming it (found with ``id_at(shard, row)``) and both shards."""
    width = -(-max(keys.dtype.itemsize for keys in keys_per_shard) // 8) * 8  # whole words: aligned records
    index = np.empty(sum(map(len, keys_per_shard)), dtype=index_dtype(width))
    start = 0
    for k, keys in enumerate(keys_per_shard):
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


def write_id_index(folder: Path, index: np.ndarray) -> dict:
    """Write ``folder/ids.npy``, atomically; returns its record for ``index.json`` (file, key width, size,
    SHA-256)."""
    with atomic_output(folder / ID_INDEX_FILE) as tmp, tmp.open("wb") as f:
        np.save(f, index, allow_pickle=False)
    return {
        "file": ID_INDEX_FILE,
        "key_bytes": index.dtype["id"].itemsize,
        "bytes": (folder / ID_INDEX_FILE).stat().st_size,
        "sha256": file_sha256(folder / ID_INDEX_FILE),
    }


def map_id_index(path: Path, entry: Mapping) -> np.ndarray:
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
    if index.dtype != index_dtype(entry["key_bytes"]) or index.shape != (n,) or index.offset + index.nbytes != size:
        raise DataError(
            f"{path}: holds {index.shape} records of {index.dtype} in {size} bytes, but {INDEX_FILE} says "
            f"{n} records of {entry['key_bytes']}-byte keys; the id index was replaced after the store was written"
        )
    return index


def verify_id_index(path: Path, entry: Mapping) -> None:
    """Compare the id index's SHA-256 with the one ``index.json`` recorded (``entry``): reads the whole file."""
    if file_sha256(path) != entry["sha256"]:
        raise DataError(f"{path}: checksum mismatch: the id index changed after the store was written")


def locate(index: np.ndarray, ids: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shard, row, found) for each of ``ids``, by binary search in the sorted keys of ``index``."""
    key_dtype = index.dtype["id"]
    keys = [id_key(i) for i in ids]
    usable = np.array([len(k) <= key_dtype.itemsize and b"\0" not in k for k in keys], dtype=bool)
    needles = np.array([k if ok else b"" for k, ok in zip(keys, usable)], dtype=key_dtype)
    at = np.minimum(np.searchsorted(index["id"], needles), len(index) - 1)
    hits = index[at]
    found = usable & (hits["id"] == needles)
    return hits["shard"].astype(np.int64), hits["row"].astype(np.int64), found
