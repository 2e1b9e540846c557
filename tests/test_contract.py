"""Tests for the captions/features data contract."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from diffcap.data.contract import (
    CaptionRecord,
    DataError,
    FeatureStore,
    check_ids,
    read_captions,
    write_captions,
    write_features,
)

RECORDS = [
    CaptionRecord("007", "A dog runs, fast.", "train"),
    CaptionRecord("007", 'He said "hi"\nthen left', "train"),
    CaptionRecord("12", "Café au lait", "val"),
]


# ---------------------------------------------------------------- captions


@pytest.mark.parametrize("name", ["caps.jsonl", "caps.csv"])
def test_captions_round_trip(tmp_path, name):
    path = tmp_path / name
    write_captions(RECORDS, path)
    assert read_captions(path) == RECORDS


def test_jsonl_integer_id_becomes_string_and_split_defaults_to_empty(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"image_id": 42, "caption": " two cats "}\n\n', encoding="utf-8")
    assert read_captions(path) == [CaptionRecord("42", "two cats", "")]


def test_flickr_style_csv_with_image_column(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text(
        "image,caption\n"
        "1000268201_693b08cb0e.jpg,A child in a pink dress .\n"
        '1001773457_577c3a7d70.jpg,"A black dog , a spotted dog ."\n',
        encoding="utf-8",
    )
    assert read_captions(path) == [
        CaptionRecord("1000268201_693b08cb0e.jpg", "A child in a pink dress .", ""),
        CaptionRecord("1001773457_577c3a7d70.jpg", "A black dog , a spotted dog .", ""),
    ]


def test_csv_ids_are_not_converted_to_numbers(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text("image_id,caption,split\n0042,a cat,test\n", encoding="utf-8")
    assert read_captions(path)[0].image_id == "0042"


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"image_id": "1", "caption": "ok"}\n{"image_id": "2", "caption": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: invalid JSON"):
        read_captions(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"image_id": "1"}\n', r":1: missing key 'caption'"),
        ('{"image_id": "1", "caption": "   "}\n', r":1: empty caption for image '1'"),
        ('["1", "a cat"]\n', r":1: expected a JSON object"),
        ('{"image_id": null, "caption": "a cat"}\n', r":1: image_id must be"),
    ],
)
def test_bad_jsonl_records(tmp_path, content, message):
    path = tmp_path / "caps.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        read_captions(path)
    assert str(info.value).startswith(str(path))


def test_csv_missing_column_and_empty_caption(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text("id,caption\n1,a cat\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"caps.csv:1: header .* no 'image_id'"):
        read_captions(path)
    path.write_text("image_id,caption\n1,a cat\n2,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"caps.csv:3: empty caption for image '2'"):
        read_captions(path)


def test_csv_unquoted_comma_is_reported(tmp_path):
    path = tmp_path / "caps.csv"
    path.write_text("image_id,caption,split\n1,a dog, a cat,train\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"caps.csv:2: 4 fields but the header has 3"):
        read_captions(path)


def test_missing_or_unknown_captions_file(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: captions file not found"):
        read_captions(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"caps.xml: unsupported captions format"):
        read_captions(tmp_path / "caps.xml")


# ---------------------------------------------------------------- features


def test_features_round_trip_is_exact(tmp_path):
    path = tmp_path / "feats.safetensors"
    batch = torch.randn(3, 4, 8)
    # Rows of one batch tensor plus an alias of one of them: safetensors
    # rejects aliased memory, write_features must cope.
    features = {"b": batch[1], "a": batch[0], "c": batch[2], "a_copy": batch[0]}
    write_features(path, features, metadata={"encoder": "test"})

    store = FeatureStore.open(path)
    assert store.ids == ["a", "a_copy", "b", "c"]
    assert store.item_shape == (4, 8)
    assert store.dtype == torch.float32
    assert store.metadata == {"encoder": "test"}
    assert len(store) == 4 and "b" in store and "z" not in store
    assert torch.equal(store.get(["c", "a", "c"]), torch.stack([batch[2], batch[0], batch[2]]))
    assert store.get([]).shape == (0, 4, 8)
    assert set(store.all()) == set(features)


def test_uint8_pixel_features(tmp_path):
    path = tmp_path / "pixels.safetensors"
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    write_features(path, {"x": images[0], "y": images[1]})
    store = FeatureStore.open(path)
    assert store.dtype == torch.uint8 and store.item_shape == (3, 8, 8)
    assert torch.equal(store.get(["x", "y"]), images)


def test_non_contiguous_tensor_is_written(tmp_path):
    path = tmp_path / "feats.safetensors"
    grid = torch.arange(12.0).reshape(3, 4).t()
    write_features(path, {"a": grid})
    assert torch.equal(FeatureStore.open(path).get(["a"])[0], grid)


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "feats.safetensors"
    write_features(path, {"a": torch.ones(16), "b": torch.zeros(16)})
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: not a readable safetensors file"):
        FeatureStore.open(path)


def test_missing_features_file(tmp_path):
    with pytest.raises(DataError, match=r"feats.safetensors: features file not found"):
        FeatureStore.open(tmp_path / "feats.safetensors")


def test_non_finite_values_name_the_ids(tmp_path):
    path = tmp_path / "feats.safetensors"
    bad = torch.ones(4)
    bad[2] = float("nan")
    with pytest.raises(DataError, match=r"NaN or infinite values in 1 id\(s\): 'img2'"):
        write_features(path, {"img1": torch.ones(4), "img2": bad})
    assert not path.exists()

    # Another producer may write a NaN file directly; the reader must catch it too.
    from safetensors.torch import save_file

    items = {f"id{i}": torch.full((2,), float("inf")) for i in range(7)}
    save_file(items, str(path))
    with pytest.raises(DataError) as info:
        FeatureStore.open(path)
    assert str(info.value) == (
        f"{path}: NaN or infinite values in 7 id(s): 'id0', 'id1', 'id2', 'id3', 'id4' and 2 more"
    )


def test_differing_shapes_name_an_id(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "feats.safetensors"
    save_file({"a": torch.ones(4), "b": torch.ones(5)}, str(path))
    with pytest.raises(DataError, match=r"item 'b' has shape \(5,\).* item 'a' has shape \(4,\)"):
        FeatureStore.open(path)
    with pytest.raises(DataError, match=r"item 'b' has shape"):
        write_features(tmp_path / "other.safetensors", {"a": torch.ones(4), "b": torch.ones(5)})


def test_get_unknown_ids(tmp_path):
    path = tmp_path / "feats.safetensors"
    write_features(path, {"a": torch.ones(2)})
    store = FeatureStore.open(path)
    unknown = [f"x{i}" for i in range(6)]
    with pytest.raises(DataError) as info:
        store.get(["a", *unknown])
    assert str(info.value) == f"{path}: no features for 6 id(s): 'x0', 'x1', 'x2', 'x3', 'x4' and 1 more"


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "feats.safetensors"
    write_features(path, {"a": torch.ones(2)})
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("diffcap.data.shard_file.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_features(path, {"a": torch.zeros(2)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["feats.safetensors"]


def test_check_ids(tmp_path):
    path = tmp_path / "feats.safetensors"
    write_features(path, {"1": torch.ones(2)})
    store = FeatureStore.open(path)
    captions = tmp_path / "caps.jsonl"
    check_ids([CaptionRecord("1", "a cat", "train")], store, captions)
    records = [CaptionRecord(str(i), "a cat", "train") for i in range(1, 4)]
    with pytest.raises(DataError) as info:
        check_ids(records, store, captions)
    assert str(info.value) == f"{captions}: 2 id(s): '2', '3' have captions but no features in {path}"


def test_jsonl_written_is_one_object_per_line(tmp_path):
    path = tmp_path / "caps.jsonl"
    write_captions(RECORDS, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["image_id"] for line in lines] == ["007", "007", "12"]


# ---------------------------------------------------------------- sharded stores, lazy reading


def _flip_payload_byte(path, back=4):
    """Change one byte of the last item's data, leaving the header (and its record of checks) intact."""
    data = bytearray(path.read_bytes())
    data[-back] ^= 0xFF
    path.write_bytes(bytes(data))


def test_sharded_store_round_trip(tmp_path):
    from diffcap.data.store import write_store

    items = {f"img{i:02d}": torch.randn(3, 4).half() for i in range(10)}
    write_store(tmp_path / "store", items, {"encoder": "test"}, shard_size=4)
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "ids.npy",
        "index.json",
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    store = FeatureStore.open(tmp_path / "store")
    assert store.ids == sorted(items) and len(store) == 10 and "img03" in store and "x" not in store
    assert (store.item_shape, store.dtype, store.metadata) == ((3, 4), torch.float16, {"encoder": "test"})
    ids = ["img09", "img00", "img05", "img09"]  # across shards, repeated
    assert torch.equal(store.get(ids), torch.stack([items[i] for i in ids]))
    assert store.verify() == {"path": str(tmp_path / "store"), "items": 10, "shards": 3, "with_checksum": 3}
    # each shard is a features file of the contract on its own
    assert FeatureStore.open(tmp_path / "store" / "shard-00001.safetensors").ids == ["img04", "img05", "img06", "img07"]


def test_opening_reads_no_items_and_verify_rescans(tmp_path):
    """Checks are recorded when written: a payload changed later (here to NaN) is not rescanned at
    open, and verify (diffcap check-data) finds it by the checksum."""
    path = tmp_path / "feats.safetensors"
    write_features(path, {"a": torch.ones(4), "b": torch.ones(4)})
    raw = bytearray(path.read_bytes())
    raw[-4:] = torch.tensor([float("nan")]).numpy().tobytes()
    path.write_bytes(bytes(raw))
    store = FeatureStore.open(path)
    assert torch.isnan(store.get(["b"])).any()  # read as stored: opening trusted the record
    with pytest.raises(DataError, match=r"NaN or infinite values in 1 id\(s\): 'b'"):
        store.verify()
    write_features(path, {"a": torch.ones(4), "b": torch.ones(4)})
    _flip_payload_byte(path)
    with pytest.raises(DataError, match="checksum mismatch"):
        FeatureStore.open(path).verify()


def test_store_reads_only_the_shards_it_needs(tmp_path):
    from diffcap.data.store import write_store

    write_store(tmp_path / "store", {f"i{k}": torch.full((2,), float(k)) for k in range(6)}, shard_size=2)
    (tmp_path / "store" / "shard-00002.safetensors").unlink()
    store = FeatureStore.open(tmp_path / "store")  # the index is enough to open
    assert store.get(["i0", "i3"]).tolist() == [[0.0, 0.0], [3.0, 3.0]]
    with pytest.raises(DataError, match="shard shard-00002.safetensors is missing"):
        store.get(["i4"])


def test_store_folder_without_index_or_with_a_stale_shard(tmp_path):
    from diffcap.data.store import write_store

    with pytest.raises(DataError, match="no index.json"):
        FeatureStore.open(tmp_path)
    write_store(tmp_path / "store", {f"i{k}": torch.zeros(2) for k in range(4)}, shard_size=2)
    write_features(tmp_path / "store" / "shard-00001.safetensors", {"i2": torch.zeros(3), "i3": torch.zeros(3)})
    with pytest.raises(DataError, match=r"holds 2 items of \(3,\).*index says 2 items of \(2,\)"):
        FeatureStore.open(tmp_path / "store").get(["i3"])


def test_store_goes_to_loader_workers(tmp_path):
    """Spawned DataLoader workers get the store by pickling: the file is reopened there."""
    import pickle

    path = tmp_path / "feats.safetensors"
    write_features(path, {"a": torch.arange(3.0), "b": torch.arange(3.0) + 1})
    store = pickle.loads(pickle.dumps(FeatureStore.open(path)))
    assert store.get(["b"]).tolist() == [[1.0, 2.0, 3.0]]


def test_feature_rows_index_like_a_tensor(tmp_path):
    from diffcap.data.datasets import FeatureRows

    path = tmp_path / "feats.safetensors"
    table = torch.randn(5, 3)
    write_features(path, {f"i{k}": table[k] for k in range(5)})
    rows = FeatureRows(FeatureStore.open(path), ["i4", "i0", "i2"])
    expected = table[[4, 0, 2]]
    assert rows.shape == (3, 3) and len(rows) == 3
    assert torch.equal(rows[1], expected[1]) and torch.equal(rows[torch.tensor(2)], expected[2])
    assert torch.equal(rows[1:], expected[1:]) and torch.equal(rows[torch.tensor([2, 2, 0])], expected[[2, 2, 0]])


def test_check_data_command(tmp_path, capsys):
    from diffcap.cli import main
    from diffcap.data.store import write_store

    write_store(tmp_path / "store", {f"i{k}": torch.ones(2) * k for k in range(3)}, shard_size=2)
    assert main(["check-data", str(tmp_path / "store")]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 3
    _flip_payload_byte(tmp_path / "store" / "shard-00001.safetensors")
    assert main(["check-data", str(tmp_path / "store")]) == 2
    assert "shard-00001.safetensors: checksum mismatch" in capsys.readouterr().err
