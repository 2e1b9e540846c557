"""Sequence-level distillation (diffcap.training.distill and `diffcap distill`): a teacher run re-captions a split."""

from __future__ import annotations

import json

import pytest
from conftest import CAPTIONS, small_config

from diffcap.cli import main
from diffcap.data.contract import DataError, FeatureStore, read_captions, write_features
from diffcap.pipeline import CaptionPipeline
from diffcap.training import Trainer
from diffcap.training.distill import distill_captions


@pytest.fixture
def teacher(feature_data, tmp_path):
    """A small autoregressive run trained until it writes its training captions."""
    cfg = small_config(feature_data, steps=250)
    cfg.model.kind = "autoregressive"
    Trainer(cfg, tmp_path / "teacher").train(resume=False)
    return tmp_path / "teacher"


def test_train_images_get_the_teacher_caption_and_other_splits_are_kept(feature_data, teacher, tmp_path):
    captions, features = feature_data / "captions.jsonl", feature_data / "features.safetensors"
    out = tmp_path / "distilled.jsonl"
    summary = distill_captions(teacher, captions, features, out)
    source, written = read_captions(captions), read_captions(out)
    train_ids = [r.image_id for r in source if r.split == "train"]
    expected = CaptionPipeline.from_pretrained(teacher)(FeatureStore.open(features).get(train_ids)).texts
    assert [(r.image_id, r.caption) for r in written if r.split == "train"] == list(zip(train_ids, expected))
    assert [r for r in written if r.split != "train"] == [r for r in source if r.split != "train"]
    assert summary["images"] == summary["teacher_captions"] == 8 and summary["empty"] == 0
    # the overfit teacher writes its training captions back
    assert [r.caption for r in written if r.split == "train"] == CAPTIONS


def test_keep_references_and_empty_teacher_captions(feature_data, teacher, tmp_path, monkeypatch):
    captions, features = feature_data / "captions.jsonl", feature_data / "features.safetensors"
    distill_captions(teacher, captions, features, tmp_path / "kept.jsonl", keep_references=True)
    kept = read_captions(tmp_path / "kept.jsonl")
    assert [r for r in kept if r.split == "train"][8:] == [r for r in read_captions(captions) if r.split == "train"]

    real_call = CaptionPipeline.__call__

    def first_caption_empty(self, feats, **kw):
        out = real_call(self, feats, **kw)
        out.texts[0] = " "
        return out

    monkeypatch.setattr(CaptionPipeline, "__call__", first_caption_empty)
    summary = distill_captions(teacher, captions, features, tmp_path / "holes.jsonl")
    assert summary["empty"] == 1 and summary["kept_references"] == 1
    img0 = [r.caption for r in read_captions(tmp_path / "holes.jsonl") if r.image_id == "img0"]
    assert img0 == [CAPTIONS[0]]  # its own reference, not an empty caption and not nothing


def test_bad_requests_are_refused(feature_data, teacher, tmp_path):
    captions, features = feature_data / "captions.jsonl", feature_data / "features.safetensors"
    with pytest.raises(DataError, match="overwrite the source"):
        distill_captions(teacher, captions, features, captions)
    with pytest.raises(DataError, match=r"no captions in split 'test'.*'train', 'val'"):
        distill_captions(teacher, captions, features, tmp_path / "x.jsonl", split="test")
    assert not (tmp_path / "x.jsonl").exists()


def test_command_line(feature_data, teacher, tmp_path, capsys):
    out = tmp_path / "distilled.csv"
    assert (
        main(["distill", "--teacher", str(teacher), "--data", str(feature_data), "--out", str(out), "--beam", "2"]) == 0
    )
    printed = capsys.readouterr().out
    assert json.loads(printed[: printed.rindex("}") + 1])["teacher_captions"] == 8
    assert len([r for r in read_captions(out) if r.split == "train"]) == 8
    top2 = tmp_path / "top2.jsonl"
    argv = ["distill", "--teacher", str(teacher), "--data", str(feature_data), "--out", str(top2), "--beam", "2"]
    assert main([*argv, "--captions-per-image", "2"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[: printed.rindex("}") + 1])
    assert summary["captions_per_image"] == 2 and 8 < summary["teacher_captions"] <= 16
    assert (
        main(
            [
                "distill",
                "--teacher",
                str(teacher),
                "--data",
                str(feature_data),
                "--out",
                str(feature_data / "captions.jsonl"),
            ]
        )
        == 2
    )
    assert "overwrite the source" in capsys.readouterr().err


def test_several_beam_hypotheses_per_image(feature_data, teacher, tmp_path):
    """captions_per_image=k writes the k best distinct hypotheses of the beam, the best being exactly the
    caption that beam search returns."""
    from diffcap.config import ConfigError

    captions, features = feature_data / "captions.jsonl", feature_data / "features.safetensors"
    out = tmp_path / "top3.jsonl"
    summary = distill_captions(teacher, captions, features, out, captions_per_image=3, beam_size=3)
    train_ids = [r.image_id for r in read_captions(captions) if r.split == "train"]
    best = CaptionPipeline.from_pretrained(teacher)(FeatureStore.open(features).get(train_ids), beam_size=3).texts
    written = [r for r in read_captions(out) if r.split == "train"]
    by_image = {i: [r.caption for r in written if r.image_id == i] for i in train_ids}
    assert [by_image[i][0] for i in train_ids] == best
    assert all(len(set(c)) == len(c) and 1 <= len(c) <= 3 for c in by_image.values())
    assert summary["teacher_captions"] == len(written) > len(train_ids)
    with pytest.raises(ConfigError, match="beam_size >= 3"):
        distill_captions(teacher, captions, features, tmp_path / "bad.jsonl", captions_per_image=3, beam_size=1)


def test_noisy_copies_are_new_conditions_with_the_teachers_own_captions(feature_data, teacher, tmp_path, capsys):
    """noisy_copies=n captions n noise-perturbed copies of every training condition: each copy is a new item
    at the original's norm, written with every original item to a features file the student trains on,
    and carries the teacher's caption of that copy."""
    import torch
    from torch.nn.functional import cosine_similarity

    from diffcap.config import ConfigError
    from diffcap.training.distill import perturbed_conditions

    captions, features = feature_data / "captions.jsonl", feature_data / "features.safetensors"
    out = tmp_path / "noisy.jsonl"
    summary = distill_captions(teacher, captions, features, out, noisy_copies=2, condition_noise=0.5, seed=3)
    source, written = FeatureStore.open(features), FeatureStore.open(summary["features"])
    train_ids = [r.image_id for r in read_captions(captions) if r.split == "train"]
    noisy_ids = [f"{i}~noise{k}" for k in range(2) for i in train_ids]
    assert torch.equal(written.get(source.ids), source.get(source.ids))  # every original item, unchanged
    noisy, originals = written.get(noisy_ids), source.get(train_ids).repeat(2, 1)
    assert torch.equal(noisy, perturbed_conditions(source.get(train_ids), 2, 0.5, seed=3))
    torch.testing.assert_close(noisy.norm(dim=-1), originals.norm(dim=-1))
    cosine = cosine_similarity(noisy, originals, dim=-1)
    assert (cosine < 0.999).all() and (cosine > 0.5).all()
    assert summary["noisy_cosine"] == pytest.approx(float(cosine.mean()), abs=1e-6)
    assert not torch.equal(noisy[:8], noisy[8:])  # two different copies, not one twice

    by_id = {r.image_id: r.caption for r in read_captions(out) if r.split == "train"}
    assert [by_id[i] for i in noisy_ids] == CaptionPipeline.from_pretrained(teacher)(noisy).texts
    assert summary["noisy_captions"] == 16 and summary["teacher_captions"] == 24 and summary["empty"] == 0

    student = small_config(feature_data, steps=4)
    student.data.captions, student.data.features = str(out), summary["features"]
    Trainer(student, tmp_path / "student").train(resume=False)  # the captions and features agree

    for bad in ({"noisy_copies": 1}, {"condition_noise": 0.1}, {"noisy_copies": -1, "condition_noise": 0.1}):
        with pytest.raises(ConfigError, match="noisy copies need a positive noise level"):
            distill_captions(teacher, captions, features, tmp_path / "bad.jsonl", **bad)
    pixels = tmp_path / "pixels.safetensors"
    write_features(pixels, {i: torch.zeros(3, 4, 4, dtype=torch.uint8) for i in source.ids})
    with pytest.raises(ConfigError, match=r"pixels.safetensors: holds pixels"):
        distill_captions(teacher, captions, pixels, tmp_path / "bad.jsonl", noisy_copies=1, condition_noise=0.1)
    argv = ["distill", "--teacher", str(teacher), "--data", str(feature_data), "--out", str(tmp_path / "cli.jsonl")]
    assert main([*argv, "--noisy-copies", "1", "--condition-noise", "0.5"]) == 0
    assert f"data.features={tmp_path / 'cli_features.safetensors'}" in capsys.readouterr().out
