"""`diffcap prepare` on each layout with a tiny random CLIP, resumable extraction, bad images,
text-only (CapDec) conditioning, and captioning real image files with a run trained on CLIP features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffcap.data.contract import DataError, FeatureStore, read_captions
from diffcap.data.encoders import ClipImageEncoder, TextEncoder, extract_image_features
from diffcap.data.layouts import read_layout
from diffcap.data.prepare import prepare

CAPTIONS = [
    "a dog runs on the grass",
    "a brown dog runs",
    "a dog on green grass",
    "two children play in the snow",
    "kids in the snow",
    "children playing outside",
    "a man rides a red bike",
    "a cyclist on a road",
    "a man on a bike",
    "a black cat sleeps on a sofa",
    "a cat on a couch",
    "a sleeping cat",
]
WORDS = sorted({w for c in CAPTIONS for w in c.split()})
FLICKR8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
PROJ, HIDDEN, PATCHES = 16, 32, 16  # tiny CLIP: 32x32 images in 8x8 patches -> 16 patch tokens


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIP with a word-level tokenizer, saved like a hub checkpoint (model, processor, tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_clip")
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        ),
        vision_config=dict(
            hidden_size=HIDDEN,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=PROJ,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def jpeg(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (24 + seed % 3 * 8, 40, 3), dtype=np.uint8)).save(path, quality=90)
    return path


def names(n: int) -> list[str]:
    return [f"{1000 + i}_abc.jpg" for i in range(n)]


def flickr8k_layout(root: Path, n: int = 4, token_file: bool = False) -> Path:
    """Flickr8k as distributed: images, captions (CSV or the token file) and the official split lists."""
    image_dir = root / ("Flicker8k_Dataset" if token_file else "Images")
    files = names(n)
    for i, name in enumerate(files):
        jpeg(image_dir / name, i)
    if token_file:
        lines = [f"{name}#{k}\t{CAPTIONS[3 * i + k]}" for i, name in enumerate(files) for k in range(3)]
        (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    else:
        lines = ["image,caption"] + [f"{name},{CAPTIONS[3 * i + k]}" for i, name in enumerate(files) for k in range(3)]
        (root / "captions.txt").write_text("\n".join(lines) + "\n")
    for split, chunk in (("train", files[:2]), ("dev", files[2:3]), ("test", files[3:])):
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(chunk) + "\n")
    return root


def karpathy_layout(root: Path, name: str) -> Path:
    splits = ["train", "restval", "val", "test"]
    images = []
    for i, filename in enumerate(names(4)):
        filepath = "val2014" if name == "coco" else None
        folder = root / ("images" if name == "coco" else "flickr30k-images")
        jpeg(folder / (filepath or "") / filename, i)
        entry = {
            "filename": filename,
            "split": splits[i],
            "imgid": i,
            "sentences": [{"raw": CAPTIONS[3 * i + k]} for k in range(3)],
        }
        if name == "coco":
            entry |= {"filepath": filepath, "cocoid": 500 + i}
        images.append(entry)
    (root / f"dataset_{name}.json").write_text(json.dumps({"images": images, "dataset": name}))
    return root


def folder_layout(root: Path, n: int = 4) -> Path:
    rows = ["image_id,caption,split"]
    for i in range(n):
        jpeg(root / "photos" / f"p{i}.jpg", i)
        rows += [f"photos/p{i}.jpg,{CAPTIONS[3 * i + k]},{'train' if i < n - 1 else 'val'}" for k in range(3)]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return root


# ------------------------------------------------------------------------------------------------ layouts


@pytest.mark.parametrize("token_file", [False, True])
def test_flickr8k_layout(tmp_path, tiny_clip, token_file):
    root = flickr8k_layout(tmp_path / "flickr8k", token_file=token_file)
    summary = prepare("flickr8k", root, tmp_path / "out", encoder=str(tiny_clip), progress=False)
    store = FeatureStore.open(tmp_path / "out" / "features")
    assert store.ids == names(4) and store.item_shape == (PROJ,)
    assert store.metadata["encoder"] == str(tiny_clip) and store.metadata["kind"] == "clip-image"
    assert torch.allclose(store.get(store.ids).norm(dim=-1), torch.ones(4))
    records = read_captions(tmp_path / "out" / "captions.jsonl")
    assert {r.image_id: r.split for r in records} == dict(zip(names(4), ["train", "train", "val", "test"]))
    assert summary["captions"] == {"train": 6, "val": 3, "test": 3}


@pytest.mark.parametrize("name", ["flickr30k", "coco"])
def test_karpathy_layouts(tmp_path, tiny_clip, name):
    root = karpathy_layout(tmp_path / name, name)
    prepare(name, root, tmp_path / "out", encoder=str(tiny_clip), progress=False, workers=1 if name == "coco" else 0)
    store = FeatureStore.open(tmp_path / "out" / "features")
    ids = ["500", "501", "502", "503"] if name == "coco" else names(4)
    assert store.ids == ids and store.item_shape == (PROJ,)
    splits = {r.image_id: r.split for r in read_captions(tmp_path / "out" / "captions.jsonl")}
    assert splits == dict(zip(ids, ["train", "train", "val", "test"]))  # restval -> train


def test_folder_layout_with_patch_grid(tmp_path, tiny_clip):
    root = folder_layout(tmp_path / "photos")
    prepare("folder", root, tmp_path / "out", encoder=str(tiny_clip), patch_tokens=True, progress=False)
    pooled = FeatureStore.open(tmp_path / "out" / "features")
    grid = FeatureStore.open(tmp_path / "out" / "patch_features")
    ids = [f"photos/p{i}.jpg" for i in range(4)]
    assert pooled.ids == grid.ids == ids
    assert pooled.item_shape == (PROJ,) and grid.item_shape == (PATCHES, HIDDEN)
    assert grid.metadata["output"] == "patches"
    # the same image through the encoder directly gives the same pooled feature
    direct = ClipImageEncoder(str(tiny_clip)).encode_images([Image.open(root / ids[0]).convert("RGB")])
    assert torch.allclose(direct["pooled"][0], pooled.get(ids[:1])[0], atol=1e-5)


def test_vision_only_checkpoint_needs_no_tokenizer(tmp_path, tiny_clip):
    """Image features need only the vision tower and the image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPVisionModelWithProjection

    folder = tmp_path / "vision_only"
    vision = CLIPConfig.from_pretrained(tiny_clip).vision_config
    vision.projection_dim = PROJ
    CLIPVisionModelWithProjection(vision).save_pretrained(folder)
    CLIPImageProcessor.from_pretrained(tiny_clip).save_pretrained(folder)
    assert not list(folder.glob("tokenizer*")) and not list(folder.glob("vocab*"))
    root = folder_layout(tmp_path / "photos")
    prepare("folder", root, tmp_path / "out", encoder=str(folder), progress=False)
    assert FeatureStore.open(tmp_path / "out" / "features").item_shape == (PROJ,)


def test_unknown_encoder_is_a_clear_error(tmp_path):
    root = folder_layout(tmp_path / "photos")
    with pytest.raises(ValueError, match="no_such_clip"):
        prepare("folder", root, tmp_path / "out", encoder=str(tmp_path / "no_such_clip"), progress=False)


def test_folder_without_splits_is_split_by_image(tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    rows = ["image_id,caption"] + [f"img{i}.jpg,caption {k} of {i}" for i in range(40) for k in range(2)]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    layout = read_layout("folder", root)
    split_of: dict[str, set] = {}
    for r in layout.records:
        split_of.setdefault(r.image_id, set()).add(r.split)
    assert all(len(s) == 1 for s in split_of.values())
    assert {s for (s,) in split_of.values()} == {"train", "val"}
    assert read_layout("folder", root).records == layout.records  # stable


@pytest.mark.skipif(not (FLICKR8K / "captions.txt").is_file(), reason="shared Flickr8k captions not present")
def test_real_flickr8k_captions():
    layout = read_layout("flickr8k", FLICKR8K)
    assert len(layout.images) == 7000 and len(layout.records) == 35000
    split_images: dict[str, set] = {}
    for r in layout.records:
        split_images.setdefault(r.split, set()).add(r.image_id)
    assert len(split_images["train"]) == 6000 and len(split_images["val"]) == 1000
    assert not split_images["train"] & split_images["val"]


# ------------------------------------------------------------------------------------------------ extraction


class CountingEncoder:
    """Wraps the real encoder; counts the images it encodes and can fail after some batches."""

    def __init__(self, inner: ClipImageEncoder, fail_after_batches: int | None = None):
        self.inner, self.fail_after = inner, fail_after_batches
        self.model_id, self.patch_tokens, self.processor = inner.model_id, inner.patch_tokens, inner.processor
        self.dtype = inner.dtype
        self.images = self.batches = 0

    def __call__(self, pixel_values):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.batches += 1
        self.images += len(pixel_values)
        return self.inner(pixel_values)


def test_interrupted_extraction_resumes_without_recomputing(tmp_path, tiny_clip):
    images = {f"i{i}": jpeg(tmp_path / "img" / f"i{i}.jpg", i) for i in range(7)}
    out = tmp_path / "out"
    clip = ClipImageEncoder(str(tiny_clip))
    first = CountingEncoder(clip, fail_after_batches=2)  # shards of 2 images, batches of 2: 2 shards done
    with pytest.raises(KeyboardInterrupt):
        extract_image_features(images, out, first, batch_size=2, shard_size=2, progress=False)
    assert sorted(p.name for p in (out / "features").glob("shard-*")) == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]
    with pytest.raises(DataError, match="no index.json"):  # an unfinished store does not open
        FeatureStore.open(out / "features")
    second = CountingEncoder(clip)
    done = extract_image_features(images, out, second, batch_size=2, shard_size=2, progress=False)
    assert second.images == 3 and (done.reused_shards, done.computed_shards) == (2, 2)
    resumed = FeatureStore.open(out / "features")
    fresh = extract_image_features(images, tmp_path / "fresh", clip, batch_size=4, shard_size=100, progress=False)
    assert resumed.ids == sorted(images)
    assert torch.allclose(
        resumed.get(resumed.ids), FeatureStore.open(fresh.files["pooled"]).get(resumed.ids), atol=1e-5
    )
    # changed settings (another shard size) start over instead of mixing shards
    third = CountingEncoder(clip)
    extract_image_features(images, out, third, batch_size=2, shard_size=3, progress=False)
    assert third.images == 7


def test_corrupt_and_missing_images_are_named(tmp_path, tiny_clip, capsys):
    from diffcap.cli import main

    root = flickr8k_layout(tmp_path / "flickr8k")
    corrupt = root / "Images" / names(4)[1]
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated JPEG
    missing = root / "Images" / names(4)[3]
    missing.unlink()
    with pytest.raises(DataError) as err:
        prepare("flickr8k", root, tmp_path / "out", encoder=str(tiny_clip), progress=False)
    assert corrupt.name in str(err.value) and missing.name in str(err.value)
    assert not (tmp_path / "out" / "features" / "index.json").exists()  # shards, but no store
    listed = (tmp_path / "out" / "bad_images.txt").read_text()
    assert str(corrupt) in listed and str(missing) in listed

    args = [
        "prepare",
        "flickr8k",
        "--root",
        str(root),
        "--out",
        str(tmp_path / "out"),
        "--encoder",
        str(tiny_clip),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
    ]
    assert main(args) == 2
    assert corrupt.name in capsys.readouterr().err
    assert main(args + ["--skip-bad"]) == 0
    assert (tmp_path / "out" / "bad_images.txt").is_file()
    summary = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert summary["images_left_out"] == 2
    assert FeatureStore.open(tmp_path / "out" / "features").ids == [names(4)[0], names(4)[2]]
    assert {r.image_id for r in read_captions(tmp_path / "out" / "captions.jsonl")} == {names(4)[0], names(4)[2]}


def test_flickr8k_official_text_folder(tmp_path):
    """Flickr8k_text.zip unpacked as is: the token file and the split lists together in Flickr8k_text/."""
    root = flickr8k_layout(tmp_path / "flickr8k", token_file=True)
    text = root / "Flickr8k_text"
    text.mkdir()
    for f in [root / "Flickr8k.token.txt", *root.glob("Flickr_8k.*Images.txt")]:
        f.rename(text / f.name)
    layout = read_layout("flickr8k", root)
    assert layout.captions_file == text / "Flickr8k.token.txt"
    assert {r.image_id: r.split for r in layout.records} == dict(zip(names(4), ["train", "train", "val", "test"]))


@pytest.mark.parametrize("how", ["out_is_root", "captions_flag"])
def test_prepare_never_overwrites_the_source_captions(tmp_path, how):
    root = tmp_path / "photos"
    jpeg(root / "p0.jpg", 0)
    source = root / "captions.jsonl"
    source.write_text(
        "".join(json.dumps({"image_id": "p0.jpg", "caption": c, "split": "train"}) + "\n" for c in CAPTIONS[:3])
    )
    before = source.read_bytes()
    if how == "out_is_root":
        out, captions = root, None
    else:  # the source captions file named explicitly, inside the output folder
        out = tmp_path / "data"
        out.mkdir()
        captions = out / "captions.jsonl"
        source.rename(captions)
        source, before = captions, captions.read_bytes()
    with pytest.raises(DataError, match="source captions") as err:
        prepare("folder", root, out, captions=captions, encoder="no/such-encoder", progress=False)
    assert str(source) in str(err.value) and str(out) in str(err.value)
    assert source.read_bytes() == before
    assert not (out / "features").exists() and not (out / "prepare.json").exists()


# ------------------------------------------------------------------------------------------------ text only


def test_text_condition_clip_text(tmp_path, tiny_clip):
    root = folder_layout(tmp_path / "photos")
    summary = prepare(
        "folder", root, tmp_path / "out", encoder=str(tiny_clip), condition="text", condition_caption=1, progress=False
    )
    assert summary["kind"] == "clip-text"
    store = FeatureStore.open(tmp_path / "out" / "features.safetensors")
    assert store.item_shape == (PROJ,) and store.metadata["kind"] == "clip-text"
    records = read_captions(tmp_path / "out" / "captions.jsonl")
    assert len(records) == 8 and CAPTIONS[1] not in {r.caption for r in records}  # the condition is no target
    expected = TextEncoder(str(tiny_clip))([CAPTIONS[1]])[0]
    assert torch.allclose(store.get(["photos/p0.jpg"])[0], expected, atol=1e-5)


def test_text_condition_sentence_transformers(tmp_path, minilm_dir):
    pytest.importorskip("sentence_transformers")
    root = flickr8k_layout(tmp_path / "flickr8k")
    (root / "Images").rename(root / "gone")  # text-only preparation never opens an image
    summary = prepare(
        "flickr8k", root, tmp_path / "out", condition="text", text_encoder=str(minilm_dir), progress=False
    )
    assert summary["kind"] == "sentence-transformers"
    store = FeatureStore.open(tmp_path / "out" / "features.safetensors")
    assert store.item_shape == (384,) and store.ids == names(4)
    assert len(read_captions(tmp_path / "out" / "captions.jsonl")) == 8


def test_text_condition_passes_batch_size_and_dtype_and_warns_of_image_options(
    tmp_path, tiny_clip, monkeypatch, caplog
):
    import diffcap.data.prepare as prepare_module

    made = []

    class Recording(TextEncoder):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "TextEncoder", Recording)
    root = folder_layout(tmp_path / "photos")
    with caplog.at_level("WARNING", logger="diffcap.data.prepare"):
        prepare(
            "folder",
            root,
            tmp_path / "out",
            encoder=str(tiny_clip),
            condition="text",
            progress=False,
            batch_size=3,
            dtype="fp32",
            device="cpu",
        )
    assert made[-1]["batch_size"] == 3 and made[-1]["dtype"] == "fp32"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # defaults: no warning
    with caplog.at_level("WARNING", logger="diffcap.data.prepare"):
        prepare(
            "folder",
            root,
            tmp_path / "out2",
            encoder=str(tiny_clip),
            condition="text",
            progress=False,
            device="cpu",
            workers=2,
            skip_bad=True,
            patch_tokens=True,
            shard_size=10,
        )
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert all(flag in warned for flag in ("--workers", "--skip-bad", "--patch-tokens", "--shard-size"))


def test_text_condition_needs_a_remaining_target(tmp_path, tiny_clip):
    root = folder_layout(tmp_path / "photos")
    with pytest.raises(DataError, match="fewer than 4 captions"):
        prepare(
            "folder",
            root,
            tmp_path / "out",
            encoder=str(tiny_clip),
            condition="text",
            condition_caption=2,
            progress=False,
        )


# ------------------------------------------------------------------------------------------------ end to end


def test_prepare_train_caption_end_to_end(tmp_path, tiny_clip, capsys):
    from conftest import small_config

    from diffcap.cli import main
    from diffcap.config import Config
    from diffcap.training import Trainer

    root = folder_layout(tmp_path / "photos")
    assert (
        main(
            [
                "prepare",
                "folder",
                "--root",
                str(root),
                "--out",
                str(tmp_path / "data"),
                "--encoder",
                str(tiny_clip),
                "--device",
                "cpu",
                "--workers",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    cfg = small_config(tmp_path / "data", steps=3)
    cfg.data.features = str(tmp_path / "data" / "features")  # prepare writes a sharded store
    cfg.data.feature_noise_std = 0.1  # CapDec noise at training time runs too
    Trainer(cfg, tmp_path / "run").train(resume=False)
    saved = Config.from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    assert saved.data.encoder == str(tiny_clip) and saved.data.encoder_kind == "clip-image"

    photo = jpeg(tmp_path / "new photo.jpg", 7)
    assert main(["caption", str(photo), "--run", str(tmp_path / "run"), "--seed", "0"]) == 0
    path, text = capsys.readouterr().out.rstrip("\n").split("\t")
    assert path == str(photo) and isinstance(text, str)

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    assert main(["caption", str(photo), str(bad), "--run", str(tmp_path / "run")]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_text_trained_run_captions_images(tmp_path, tiny_clip, capsys):
    """CapDec: train on CLIP text embeddings, caption images with the same CLIP's image tower."""
    from conftest import small_config

    from diffcap.cli import main
    from diffcap.training import Trainer

    root = folder_layout(tmp_path / "photos")
    prepare("folder", root, tmp_path / "data", encoder=str(tiny_clip), condition="text", progress=False)
    Trainer(small_config(tmp_path / "data", steps=2), tmp_path / "run").train(resume=False)
    assert main(["caption", str(root / "photos" / "p0.jpg"), "--run", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.count("\t") == 1


def test_sentence_transformer_run_cannot_encode_images(tmp_path, feature_data, capsys):
    from conftest import small_config

    from diffcap.cli import main
    from diffcap.data.contract import write_features
    from diffcap.training import Trainer

    store = FeatureStore.open(feature_data / "features.safetensors")
    write_features(
        feature_data / "features.safetensors",
        store.all(),
        {"encoder": "/models/minilm", "kind": "sentence-transformers"},
    )
    Trainer(small_config(feature_data, steps=1), tmp_path / "run").train(resume=False)
    photo = jpeg(tmp_path / "a.jpg", 0)
    assert main(["caption", str(photo), "--run", str(tmp_path / "run")]) == 2
    assert "sentence-transformers" in capsys.readouterr().err


def test_feature_noise_std_is_validated():
    from diffcap.config import Config, ConfigError

    with pytest.raises(ConfigError, match="feature_noise_std"):
        Config.load(None, ["data.feature_noise_std=-1"])
    with pytest.raises(ConfigError, match="encoder_kind"):
        Config.load(None, ["data.encoder_kind=resnet"])


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_features_match_fp32(tiny_clip, dtype):
    """The GPU path runs the tower in half precision; features still come out float32 and close."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    full = ClipImageEncoder(str(tiny_clip), device="cpu", dtype="fp32", patch_tokens=True).encode_images([image])
    half = ClipImageEncoder(str(tiny_clip), device="cpu", dtype=dtype, patch_tokens=True).encode_images([image])
    assert half["pooled"].dtype == torch.float32 and half["patches"].shape == (1, PATCHES, HIDDEN)
    assert torch.allclose(full["pooled"], half["pooled"], atol=0.05)
