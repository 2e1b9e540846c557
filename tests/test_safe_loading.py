"""Pretrained weights are read from safetensors only: a checkpoint folder that holds nothing but a pickled
pytorch_model.bin (which torch.load could run code from, CVE-2025-32434) is refused, not unpickled."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch


def _pickled_only(model, folder: Path) -> Path:
    """``model`` saved like an old hub checkpoint: config.json and a pickled pytorch_model.bin."""
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def pickled_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    return _pickled_only(BertModel(config), tmp_path_factory.mktemp("bert"))


def test_pretrained_embeddings_and_backbone_refuse_pickled_weights(pickled_bert):
    from diffcap.models.denoiser import build_body
    from diffcap.models.embedding import load_pretrained_embeddings

    with pytest.raises(OSError, match="model.safetensors"):
        load_pretrained_embeddings(str(pickled_bert))
    with pytest.raises(OSError, match="model.safetensors"):
        build_body(d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_positions=32, backbone=str(pickled_bert))


def test_clip_encoders_refuse_pickled_weights(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from diffcap.data.encoders import ClipImageEncoder, TextEncoder

    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=20, max_position_embeddings=8, **tower),
        vision_config=dict(image_size=16, patch_size=8, **tower),
        projection_dim=8,
    )
    folder = _pickled_only(CLIPModel(config), tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size=16).save_pretrained(folder)
    with pytest.raises(ValueError, match="model.safetensors"):
        ClipImageEncoder(str(folder), device="cpu")
    with pytest.raises(ValueError, match="model.safetensors"):
        TextEncoder(str(folder), kind="clip-text", device="cpu")


def test_sentence_transformers_encoder_refuses_pickled_weights(pickled_bert, tmp_path):
    import shutil

    from transformers import BertTokenizerFast

    from diffcap.data.encoders import TextEncoder

    folder = shutil.copytree(pickled_bert, tmp_path / "st")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog"]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    with pytest.raises(ValueError, match="model.safetensors"):
        TextEncoder(str(folder), kind="sentence-transformers", device="cpu")


def test_pip_installs_get_a_torch_without_the_torch_load_vulnerability():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    pin = re.search(r'^\s*"torch>=(\d+)\.(\d+)', pyproject, re.MULTILINE)
    assert pin and (int(pin[1]), int(pin[2])) >= (2, 6)
