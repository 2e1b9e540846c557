"""Hostile inputs fail early, before training, with a message naming the file and the item; a NaN
loss stops training with the step and the images, and leaves the last checkpoint intact."""

from __future__ import annotations

import hashlib
import logging
import re

import pytest
import torch
from conftest import make_feature_data, small_config
from safetensors.torch import save_file
from test_prepare import tiny_clip  # noqa: F401  (a fixture)

from diffcap.cli import main
from diffcap.data.contract import CaptionRecord, DataError, write_captions
from diffcap.training import Trainer, load_training_data
from diffcap.training.rundir import RunDir


def test_nan_features_name_the_file_and_image(feature_data):
    path = feature_data / "features.safetensors"
    items = {f"img{i}": torch.randn(16) for i in range(8)} | {f"val{i}": torch.randn(16) for i in range(4)}
    items["img3"][5] = float("nan")
    items["val1"][0] = float("inf")
    save_file(items, str(path))  # another producer: write_features would refuse
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(path))}: NaN or infinite values in 2 id\(s\): 'img3', 'val1'"
    ):
        load_training_data(small_config(feature_data))


def test_ids_that_do_not_match(feature_data, caplog):
    captions = feature_data / "captions.jsonl"
    records = [CaptionRecord(f"img{i}", "a dog runs", "train") for i in range(8)]
    write_captions(
        records + [CaptionRecord("img99", "a cat", "train"), CaptionRecord("img98", "a cat", "train")], captions
    )
    with pytest.raises(DataError) as info:
        load_training_data(small_config(feature_data))
    message = str(info.value)
    assert message.startswith(str(captions)) and "'img99', 'img98'" in message and "features.safetensors" in message
    # features without captions are legal (a file for several splits) but reported
    write_captions(records, captions)
    with caplog.at_level(logging.WARNING):
        load_training_data(small_config(feature_data))
    assert "features.safetensors: 4 id(s): 'val0', 'val1', 'val2', 'val3' have features but no captions" in caplog.text


def test_truncated_feature_file_names_the_file(feature_data, capsys):
    path = feature_data / "features.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: not a readable safetensors file"):
        load_training_data(small_config(feature_data))
    # the command line turns it into one line and exit status 2
    cfg = small_config(feature_data)
    args = [f"data.captions={cfg.data.captions}", f"data.features={path}", "train.steps=1"]
    assert main(["train", "--out", str(feature_data / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err


def test_empty_and_all_pad_captions_are_errors(feature_data):
    captions = feature_data / "captions.jsonl"
    captions.write_text('{"image_id": "img0", "caption": "   ", "split": "train"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(captions))}:1: empty caption for image 'img0'"):
        load_training_data(small_config(feature_data))
    # a lone combining accent: not empty text, but no tokens at all once normalised (all PAD)
    records = [CaptionRecord(f"img{i}", "a dog runs", "train") for i in range(7)] + [
        CaptionRecord("img7", "\u0301", "train")
    ]
    write_captions(records, captions)
    with pytest.raises(
        DataError,
        match=rf"^{re.escape(str(captions))}: 1 train caption\(s\) have no tokens \(all PAD\), "
        r"for image\(s\) 'img7'",
    ):
        load_training_data(small_config(feature_data))


def test_over_long_captions_are_counted(feature_data, caplog):
    captions = feature_data / "captions.jsonl"
    long = "a very long caption " * 4
    records = [CaptionRecord(f"img{i}", long if i in (2, 5) else "a dog", "train") for i in range(8)]
    write_captions(records, captions)
    with caplog.at_level(logging.WARNING):
        load_training_data(small_config(feature_data))  # max_length 10
    assert (
        f"{captions}: 2 of 8 train captions are longer than max_length=10 tokens and were truncated "
        "(e.g. for image(s) 'img2', 'img5')"
    ) in caplog.text


def test_feature_width_that_does_not_fit_the_run(feature_data, tmp_path):
    run = tmp_path / "run"
    Trainer(small_config(feature_data, steps=2), run).train(resume=False)
    before = (run / "model.safetensors").read_bytes()
    wide = make_feature_data(tmp_path / "wide", dim=24)
    with pytest.raises(DataError) as info:
        Trainer(small_config(wide, steps=4), run).train()
    message = str(info.value)
    assert message.startswith(str(wide / "features.safetensors")) and "x 24" in message and "x 16" in message
    assert str(run) in message
    assert (run / "model.safetensors").read_bytes() == before


def test_decompression_bomb_is_an_error_naming_the_file(tmp_path, monkeypatch):
    from PIL import Image

    from diffcap.data.images import ImageError, load_image

    path = tmp_path / "bomb.png"
    Image.new("RGB", (64, 64)).save(path)
    # Pillow's limit scaled down, so a 64x64 file plays the multi-gigapixel bomb
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match=rf"^{re.escape(str(path))}: not a readable image"):
        load_image(path)  # > 2x the limit: DecompressionBombError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    with pytest.raises(ImageError, match=rf"^{re.escape(str(path))}: not a readable image"):
        load_image(path)  # just above the limit: Pillow only warns; still an error here


def _digest(folder):
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_nan_loss_stops_with_step_and_images_and_keeps_the_checkpoint(feature_data, tmp_path, monkeypatch):
    from tqdm.auto import tqdm

    import diffcap.training.trainer

    bars = []

    class RecordedBar(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed_by_train = False
            bars.append(self)

        def close(self):
            self.closed_by_train = True
            super().close()

    monkeypatch.setattr(diffcap.training.trainer, "tqdm", RecordedBar)
    run = tmp_path / "run"
    cfg = small_config(feature_data, steps=10)
    cfg.train.save_every, cfg.train.log_every = 4, 1
    trainer = Trainer(cfg, run)
    real = trainer.state.model.training_losses
    calls, open_outputs, poisoned_image = [], [], []
    train = trainer.data.train

    def poisoned(ids, feats, **kw):
        terms = real(ids, feats, **kw)
        calls.append(1)
        if len(calls) == 6:
            # step 6: one caption's loss becomes NaN, as from a bad example
            open_outputs.extend([trainer.train_log.writer, bars[-1].closed_by_train])
            row = (train.caption_ids == ids[3]).all(1).nonzero().item()  # the test's captions are all different
            poisoned_image.append(train.image_ids[int(train.caption_image[row])])
            per = terms["per_sample"].clone()
            per[3] = float("nan")
            terms["per_sample"] = per
            terms["loss"] = terms["loss"] + per.sum()
        return terms

    trainer.state.model.training_losses = poisoned
    with pytest.raises(FloatingPointError) as info:
        trainer.train(resume=False)
    message = str(info.value)
    assert "non-finite loss at step 6" in message and "captions.jsonl" in message
    assert f"non-finite for image 1 id(s): '{poisoned_image[0]}';" in message
    assert f"the checkpoint of step 4 is intact ({run / 'checkpoints' / 'step-000004'})" in message
    writer, bar_was_closed = open_outputs  # open when the error struck, closed on the way out
    assert writer is not None and writer.all_writers is None and trainer.train_log.writer is None
    assert len(bars) == 1 and not bar_was_closed and bars[0].closed_by_train
    assert [s for s, _ in RunDir(run).checkpoints()] == [4]
    saved = _digest(run / "checkpoints" / "step-000004")
    resumed = Trainer(small_config(feature_data, steps=10), run)
    assert resumed.resume() and resumed.step == 4
    assert _digest(run / "checkpoints" / "step-000004") == saved


def test_an_image_in_two_splits_is_refused_naming_it(feature_data):
    captions = feature_data / "captions.jsonl"
    records = [CaptionRecord(f"img{i}", "a dog runs", "train") for i in range(8)]
    records += [CaptionRecord("val0", "a cat", "val"), CaptionRecord("img5", "a bird", "val")]
    write_captions(records, captions)
    with pytest.raises(
        DataError, match=rf"^{re.escape(str(captions))}: 1 id\(s\): 'img5' have captions in the 'train' "
    ):
        load_training_data(small_config(feature_data))


@pytest.mark.parametrize("size", [(1, 30000), (25, 600), (300, 200)])
def test_extreme_image_shapes_are_errors_before_decoding(tmp_path, size, monkeypatch):
    from PIL import Image, ImageFile

    from diffcap.data import images

    path = tmp_path / "strip.png"
    Image.new("L", size).save(path)
    monkeypatch.setattr(images, "MAX_SIDE", 250)  # plays a 20000-pixel side
    with pytest.raises(images.ImageError, match=rf"^{re.escape(str(path))}: {size[0]} x {size[1]} pixels is outside"):
        images.load_image(path)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded before the check"))
    with pytest.raises(images.ImageError):
        images.load_image(path)


def test_only_the_usual_formats_are_opened(tmp_path):
    from PIL import Image

    from diffcap.data.images import ImageError, load_image

    path = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(path, format="PCX")  # a format Pillow reads, but not one of the usual
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(path)
    eps = tmp_path / "drawing.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")  # would go to Ghostscript
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(eps)


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    from diffcap.data.images import load_image

    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": stored landscape, shown portrait
    Image.new("RGB", (40, 20), "red").save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_an_image_replaced_under_the_same_name_is_encoded_again(tmp_path, tiny_clip):  # noqa: F811
    from test_prepare import CountingEncoder, jpeg

    from diffcap.data.contract import FeatureStore
    from diffcap.data.encoders import ClipImageEncoder, extract_image_features

    images = {f"i{i}": jpeg(tmp_path / "img" / f"i{i}.jpg", i) for i in range(3)}
    clip = ClipImageEncoder(str(tiny_clip))
    extract_image_features(images, tmp_path / "out", clip, batch_size=2, shard_size=2, progress=False)
    jpeg(images["i1"], 7)  # another picture, same file name
    again = CountingEncoder(clip)
    extract_image_features(images, tmp_path / "out", again, batch_size=2, shard_size=2, progress=False)
    assert again.images == 3
    fresh = extract_image_features(images, tmp_path / "fresh", clip, batch_size=2, shard_size=2, progress=False)
    store, expected = FeatureStore.open(tmp_path / "out" / "features"), FeatureStore.open(fresh.files["pooled"])
    assert torch.equal(store.get(["i1"]), expected.get(["i1"]))


def test_caption_reads_the_encoder_a_run_names_only_from_this_machine(feature_data, tmp_path, tiny_clip):  # noqa: F811
    import json

    from PIL import Image

    from diffcap.captioning import caption_images

    run = tmp_path / "run"
    Trainer(small_config(feature_data, steps=2), run).train(resume=False)  # 16-wide features, as tiny CLIP's
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"] |= {"encoder": "someone/not-on-this-machine", "encoder_kind": "clip-image"}
    (run / "config.json").unlink()  # a hard link to the checkpoint's: replace it, do not write through it
    (run / "config.json").write_text(json.dumps(cfg))
    image = tmp_path / "cat.png"
    Image.new("RGB", (40, 30), "gray").save(image)
    with pytest.raises(ValueError, match=r"is not on this machine.*pass --encoder someone/not-on-this-machine"):
        caption_images([str(image)], run)
    [(path, text)] = caption_images([str(image)], run, encoder=str(tiny_clip))  # the user's own choice
    assert path == str(image) and isinstance(text, str)
