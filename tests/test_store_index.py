"""The sharded store's id index (ids.npy): exact lookups across shards, stores written before it, and
the faults in it that opening or `diffcap check-data` must catch."""

from __future__ import annotations

import hashlib
import json
import pickle
import re

import pytest
import torch
from conftest import CAPTIONS, small_config

from diffcap.cli import main
from diffcap.data.contract import CaptionRecord, DataError, FeatureStore, write_captions, write_features
from diffcap.data.store import write_index, write_store
from diffcap.training import Trainer

LONG = "photos/" + "a-rather-long-folder-name/" * 5  # 137 bytes: keyed by its first 32 bytes and its SHA-256


def as_format_1(folder):
    """Rewrite a store's index as diffcap wrote it before ids.npy: every id listed in index.json."""
    index = json.loads((folder / "index.json").read_text())
    shards = [{"file": s["file"], "ids": FeatureStore.open(folder / s["file"]).ids} for s in index["shards"]]
    old = {k: index[k] for k in ("item_shape", "dtype", "metadata")} | {"shards": shards}
    (folder / "index.json").write_text(json.dumps({"format": "diffcap-feature-shards/1"} | old))
    (folder / "ids.npy").unlink()


def test_lookups_across_shards_are_exact(tmp_path):
    ids = [f"img{i:03d}" for i in range(40)] + ["café.jpg", "日本/猫.png", "a", "a1", "a10"]
    ids += [LONG + "1.jpg", LONG + "2.jpg", "x" * 300]
    values = torch.arange(len(ids) * 3, dtype=torch.float32).reshape(len(ids), 3)
    write_store(tmp_path / "s", dict(zip(ids, values)), shard_size=7)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["items"] == len(ids) and len(index["shards"]) == 7
    assert all(set(s) == {"file", "items", "header_bytes", "header_sha256"} for s in index["shards"])  # no id list
    assert index["id_index"]["key_bytes"] == 64

    store = FeatureStore.open(tmp_path / "s")
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(0)).tolist() + [41, 41]
    assert torch.equal(store.get([ids[i] for i in order]), values[order])
    absent = ["a100", "café", LONG, LONG + "3.jpg", "x" * 299, "x" * 301, "img000\0", "", "IMG000"]
    assert store.missing(["a", *absent, "日本/猫.png", "a100"]) == absent
    assert "a1" in store and LONG + "2.jpg" in store and "a\0" not in store and 7 not in store
    assert len(store) == len(ids) and store.ids == sorted(ids)  # listed on demand, from the shards' headers
    assert store.verify()["items"] == len(ids)


def test_an_id_in_two_shards_is_refused_when_indexed(tmp_path):
    files = [tmp_path / "shard-00000.safetensors", tmp_path / "shard-00001.safetensors"]
    write_features(files[0], {"a": torch.zeros(2), LONG: torch.zeros(2)})
    write_features(files[1], {LONG: torch.ones(2), "c": torch.ones(2)})
    with pytest.raises(DataError) as info:
        write_index(tmp_path, files)
    assert str(info.value) == (
        f"{tmp_path}: id {LONG!r} is in shard-00000.safetensors and in shard-00001.safetensors; "
        "each id must be in one shard"
    )
    assert not (tmp_path / "index.json").exists()


def test_an_id_with_a_nul_character_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"1 id\(s\): 'a\\x00b' contain a NUL character"):
        write_store(tmp_path / "s", {"a\0b": torch.zeros(2), "a": torch.zeros(2)})


def test_a_file_out_of_id_order_is_read_right_but_not_indexed(tmp_path):
    """Another writer may store items in any order: a file opens by its header's byte ranges, and only
    files laid out as safetensors writes them (id order) can join an indexed store."""
    header = json.dumps(
        {
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        }
    ).encode()
    path = tmp_path / "other.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + torch.tensor([2.0, 2.0, 1.0, 1.0]).numpy().tobytes())
    assert FeatureStore.open(path).get(["a", "b", "a"]).tolist() == [[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: its items are not stored in id order"):
        write_index(tmp_path, [path])


@pytest.mark.parametrize("layout", ["id index", "index listing ids", "single file"])
def test_every_kind_of_store_opens_and_trains(tmp_path, layout, monkeypatch):
    """Stores written before ids.npy (index.json listing every id) and single files still train; a store
    with the id index trains without its id list ever being built."""
    items = {f"img{i:02d}": torch.randn(16, generator=torch.Generator().manual_seed(i)) for i in range(12)}
    records = [CaptionRecord(i, CAPTIONS[k % len(CAPTIONS)], "train" if k < 8 else "val") for k, i in enumerate(items)]
    write_captions(records, tmp_path / "captions.jsonl")
    path = tmp_path / ("features.safetensors" if layout == "single file" else "features")
    if layout == "single file":
        write_features(path, items)
    else:
        write_store(path, items, shard_size=5)
    if layout == "index listing ids":
        as_format_1(path)
    ids = sorted(items)
    store = FeatureStore.open(path)
    assert torch.equal(store.get(ids[::-1]), torch.stack([items[i] for i in ids[::-1]]))
    assert store.missing([*ids, "img99"]) == ["img99"] and store.verify()["items"] == 12
    if layout == "id index":
        monkeypatch.setattr(FeatureStore, "ids", property(lambda store: pytest.fail("the id list was built")))
    else:
        assert store.ids == ids
    cfg = small_config(tmp_path, steps=2)
    cfg.data.features, cfg.train.log_every = str(path), 1
    Trainer(cfg, tmp_path / "run").train(resume=False)
    assert json.loads((tmp_path / "run" / "logs" / "train.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_check_data_catches_a_flipped_byte_in_the_id_index(tmp_path, capsys):
    folder = tmp_path / "s"
    write_store(folder, {f"i{k}": torch.full((2,), float(k)) for k in range(6)}, shard_size=4)
    assert main(["check-data", str(folder)]) == 0
    capsys.readouterr()
    raw = bytearray((folder / "ids.npy").read_bytes())
    raw[-8] ^= 1  # the last record ('i5', shard 1, row 1) now points at shard 0, row 1
    (folder / "ids.npy").write_bytes(bytes(raw))
    store = FeatureStore.open(folder)  # opening reads no record of the index
    assert store.get(["i5"]).tolist() == [[1.0, 1.0]]  # the wrong item, which only a rescan finds
    assert main(["check-data", str(folder)]) == 2
    assert f"{folder / 'ids.npy'}: checksum mismatch" in capsys.readouterr().err

    # The same damage with a matching checksum: the index is also checked against the shards' ids.
    index = json.loads((folder / "index.json").read_text())
    index["id_index"]["sha256"] = hashlib.sha256(bytes(raw)).hexdigest()
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"shard-00001.safetensors: its ids differ from those the index lists"):
        FeatureStore.open(folder).verify()


def test_a_truncated_or_missing_id_index_is_named_at_open(tmp_path):
    folder = tmp_path / "s"
    write_store(folder, {f"i{k}": torch.zeros(2) for k in range(5)}, shard_size=2)
    path = folder / "ids.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: \d+ bytes, but index.json says \d+: .*truncated"):
        FeatureStore.open(folder)
    path.unlink()
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: the store's id index is missing"):
        FeatureStore.open(folder)


def test_a_shard_replaced_after_indexing_is_refused(tmp_path, capsys):
    folder = tmp_path / "s"
    write_store(folder, {f"i{k}": torch.full((2,), float(k)) for k in range(4)}, shard_size=2)
    write_features(folder / "shard-00001.safetensors", {"j2": torch.zeros(2), "j3": torch.zeros(2)})
    store = FeatureStore.open(folder)
    assert store.get(["i1"]).tolist() == [[1.0, 1.0]]
    with pytest.raises(DataError, match=r"shard-00001.safetensors: its header differs from the one the index"):
        store.get(["i3"])
    assert main(["check-data", str(folder)]) == 2
    assert "shard-00001.safetensors: differs from the shard the index was written for" in capsys.readouterr().err


def test_the_mapped_index_goes_to_loader_workers_as_its_file(tmp_path):
    folder = tmp_path / "s"
    write_store(folder, {f"img{k:05d}": torch.full((2,), float(k)) for k in range(3000)}, shard_size=1000)
    blob = pickle.dumps(FeatureStore.open(folder))
    assert len(blob) < (folder / "ids.npy").stat().st_size / 10
    assert pickle.loads(blob).get(["img02999", "img00000"]).tolist() == [[2999.0, 2999.0], [0.0, 0.0]]
