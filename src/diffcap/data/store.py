"""Feature stores of the data contract, read lazily: one safetensors file, or a folder of shards.

A store is either

* one safetensors file with one tensor per image, named by its image id
  (:func:`~diffcap.data.shard_file.write_features`, :mod:`diffcap.data.shard_file`), or
* a folder of such files, ``shard-00000.safetensors``, ..., with ``index.json`` (the shards, their item
  counts, the item shape and dtype, the metadata) and ``ids.npy``, the id index: every id's key, sorted,
  with the shard and row that hold it (:mod:`diffcap.data.store_index`). ``diffcap prepare`` writes this
  (:func:`write_store`, :func:`write_index`).

Opening a folder reads ``index.json`` and maps ``ids.npy``: no id list is parsed, so a store opens in
the same time at 1,000 items as at 100,000. A shard is opened when an item of it is first read, by
checking its size and the SHA-256 of its header against ``index.json``, without parsing the header's id
list either. A process's memory thus grows with the batch it reads, not with the store; the full id
list is built only when :attr:`FeatureStore.ids` is asked for (the training path does not ask).

Each shard carries the record of its checks (:func:`~diffcap.data.shard_file.write_features`);
:func:`write_index` refuses an id held by two shards and records the SHA-256 of ``ids.npy`` and of each
shard's header. :meth:`FeatureStore.verify` (``diffcap check-data``) rescans everything and compares the
checksums.

Stores written before the id index (``index.json`` format ``diffcap-feature-shards/1``, which lists
every id) still open: their index is built in memory from that list, as it is for a single file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import PathLike, write_json
from .errors import DataError, describe_ids
from .shard_file import DTYPE_NAMES, DTYPES, ShardFile, batch_rows, describe_items, shape_problem, write_features
from .store_index import (
    INDEX_FILE,
    INDEX_FORMAT,
    INDEX_FORMAT_LISTING_IDS,
    build_id_index,
    locate,
    map_id_index,
    shard_keys,
    verify_id_index,
    write_id_index,
)


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


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
            raise DataError(f"{folder}: {path.name}: {shape_problem(first, this)}")
        first = first or this
        if not shard.in_id_order:
            raise DataError(f"{path}: its items are not stored in id order, as safetensors writes them; rewrite it")
        keys.append(shard_keys(shard.ids, path))
        shards.append(
            {
                "file": path.relative_to(folder).as_posix(),
                "items": shard.n,
                "header_bytes": shard.data_start,
                "header_sha256": shard.header_sha256,
            }
        )
    names = [path.name for path in files]
    index = build_id_index(keys, names, lambda k, row: ShardFile(files[k], check=False).ids[row], folder)
    index_entry = write_id_index(folder, index)
    write_json(
        folder / INDEX_FILE,
        {
            "format": INDEX_FORMAT,
            "item_shape": list(first[1]),
            "dtype": DTYPE_NAMES[first[2]],
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
        index = build_id_index([shard_keys(shard.ids, path)], [path.name], lambda k, row: shard.ids[row], path)
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
            if index.get("format") not in (INDEX_FORMAT, INDEX_FORMAT_LISTING_IDS):
                raise ValueError(f"format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
            spec = (tuple(index["item_shape"]), DTYPES[index["dtype"]])
            metadata = dict(index.get("metadata") or {})
            shards = [dict(s, file=folder / s["file"]) for s in index["shards"]]
            if index["format"] == INDEX_FORMAT_LISTING_IDS:
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
        if index["format"] == INDEX_FORMAT_LISTING_IDS:  # written before ids.npy: the index is built here
            keys = [shard_keys(ids, index_path) for ids in listed]
            names = [s["file"].name for s in shards]
            ids_index = build_id_index(keys, names, lambda k, row: listed[k][row], index_path)
            return cls(folder, shards, spec, metadata, ids_index, ids=[i for part in listed for i in part])
        ids_index = map_id_index(folder / entry["file"], entry)
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
            self._index = map_id_index(self.path / self._index_entry["file"], self._index_entry)

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
                    f"{shard.path}: holds {describe_items(shard.n, shard.item_shape, shard.dtype)}, but the index says "
                    f"{describe_items(entry['items'], self.item_shape, self.dtype)}"
                )
        self._opened[k] = shard
        return shard

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
        return [i for i, ok in zip(unique, locate(self._index, unique)[2]) if not ok]

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and bool(locate(self._index, [image_id])[2][0])

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, n={len(self)}, item_shape={self.item_shape}, dtype={self.dtype})"

    def get(self, ids: list[str]) -> torch.Tensor:
        """Read the features of ``ids`` into a new tensor of shape ``(len(ids), *item_shape)``."""
        if isinstance(ids, str):
            raise TypeError("FeatureStore.get takes a list of ids, not a single string")
        shards, rows, found = locate(self._index, ids)
        if not found.all():
            missing = list(dict.fromkeys(i for i, ok in zip(ids, found) if not ok))
            raise DataError(f"{self.path}: no features for {describe_ids(missing)}")
        out = torch.empty((len(ids), *self.item_shape), dtype=self.dtype)
        if len(ids):
            for k, row, buffer in zip(shards.tolist(), rows.tolist(), batch_rows(out)):
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
            verify_id_index(self.path / self._index_entry["file"], self._index_entry)
        checked = 0
        for k in range(len(self._shards)):
            shard = self._parse_shard(k)
            shards, rows, found = locate(self._index, shard.ids)
            if not (found.all() and (shards == k).all() and (rows == np.arange(shard.n)).all()):
                raise DataError(f"{shard.path}: its ids differ from those the index lists for it")
            shard.verify()
            checked += shard.record is not None
        return {"path": str(self.path), "items": len(self), "shards": len(self._shards), "with_checksum": checked}
