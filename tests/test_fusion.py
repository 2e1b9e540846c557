"""Cross-attention fusion (``model.fusion: cross``): the caption attends to the condition tokens in every
layer instead of carrying them in its own sequence, so a CLIP patch grid stays out of the self-attention."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, small_config
from PIL import Image
from safetensors.torch import load_file

from diffcap.config import Config, ConfigError, validate
from diffcap.data.contract import CaptionRecord, FeatureStore, write_captions, write_features
from diffcap.models.denoiser import TransformerDenoiser
from diffcap.pipeline import CaptionPipeline
from diffcap.training import Trainer

PATCHES, WIDTH = 16, 32  # tiny CLIP: 32x32 images in 8x8 patches -> 16 patch tokens 32 wide
SEQ_LEN = 10


@pytest.fixture(scope="module")
def patch_data(tmp_path_factory) -> Path:
    """The eight captions of conftest on the patch grids of eight random images (two more for val), from a
    tiny random CLIP saved like a hub checkpoint and read by diffcap's own encoder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from diffcap.data.encoders import ClipImageEncoder

    root = tmp_path_factory.mktemp("fusion")
    torch.manual_seed(0)
    tower = {"hidden_size": WIDTH, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 16, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")
    encoder = ClipImageEncoder(str(root / "clip"), device="cpu", dtype="fp32", patch_tokens=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(10)]
    grids = encoder.encode_images(images)["patches"]
    assert grids.shape == (10, PATCHES, WIDTH)

    data = root / "data"
    data.mkdir()
    ids = [f"img{i}" for i in range(8)] + ["val0", "val1"]
    records = [
        CaptionRecord(image_id, CAPTIONS[i % 8], "val" if image_id.startswith("val") else "train")
        for i, image_id in enumerate(ids)
    ]
    write_captions(records, data / "captions.jsonl")
    write_features(data / "patch_features.safetensors", dict(zip(ids, grids)))
    return data


def denoiser(fusion: str) -> TransformerDenoiser:
    torch.manual_seed(0)
    return TransformerDenoiser(
        emb_dim=16,
        cond_dim=WIDTH,
        seq_len=SEQ_LEN,
        max_cond_tokens=PATCHES,
        d_model=64,
        n_layers=2,
        n_heads=4,
        dropout=0.0,
        fusion=fusion,
    ).eval()


def test_cross_fusion_attends_over_the_caption_and_reads_every_patch():
    model = denoiser("cross")
    assert model.body.config.max_position_embeddings == SEQ_LEN  # no positions for the condition tokens
    probs = {}
    layer = model.body.encoder.layer[0]
    for name in ("attention", "crossattention"):
        getattr(layer, name).register_forward_hook(lambda m, args, out, name=name: probs.__setitem__(name, out[1]))
    x_t, t = torch.randn(2, SEQ_LEN, 16), torch.tensor([3, 150])
    cond = torch.randn(2, PATCHES, WIDTH, requires_grad=True)
    out = model(x_t, t, cond)
    assert out.shape == (2, SEQ_LEN, 16)
    # self-attention spans the caption only, and both ways (a decoder's causal mask would zero the upper
    # triangle); cross-attention goes from every caption position to every patch
    assert probs["attention"].shape == (2, 4, SEQ_LEN, SEQ_LEN) and (probs["attention"] > 0).all()
    assert probs["crossattention"].shape == (2, 4, SEQ_LEN, PATCHES)
    (grad,) = torch.autograd.grad(out.square().sum(), cond)
    assert (grad.abs().sum(-1) > 0).all()  # every patch of every image reaches the prediction
    # the null condition of classifier-free guidance replaces every patch
    drop = torch.tensor([True, False])
    other = torch.randn(2, PATCHES, WIDTH)
    a, b = model(x_t, t, cond, drop_cond=drop), model(x_t, t, other, drop_cond=drop)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_add_and_concat_keep_their_bodies():
    for fusion, positions in (("add", SEQ_LEN + PATCHES), ("concat", SEQ_LEN + PATCHES)):
        model = denoiser(fusion)
        assert type(model.body).__name__ == "BertModel"
        assert model.body.config.max_position_embeddings == positions
        assert not any("crossattention" in name for name, _ in model.named_parameters())


def test_cross_fusion_cannot_start_from_a_pretrained_body():
    cfg = Config()
    cfg.model.fusion, cfg.model.backbone = "cross", "distilbert-base-uncased"
    with pytest.raises(ConfigError, match="fusion=cross"):
        validate(cfg)
    cfg.model.backbone = None
    validate(cfg)


def test_cross_fusion_overfits_a_clip_patch_grid_and_reloads(patch_data, tmp_path):
    cfg = small_config(patch_data, steps=400)
    cfg.data.features = str(patch_data / "patch_features.safetensors")
    cfg.model.fusion = "cross"
    cfg.diffusion.timesteps_per_caption = 4
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train(resume=False)
    assert (trainer.cfg.model.cond_tokens, trainer.cfg.model.cond_dim) == (PATCHES, WIDTH)
    assert json.loads((tmp_path / "run" / "body_config.json").read_text())["model_type"] == "blip_text_model"

    features = FeatureStore.open(cfg.data.features).get([f"img{i}" for i in range(8)])
    loaded = CaptionPipeline.from_pretrained(tmp_path / "run")  # rebuilt from body_config.json, offline
    out = loaded(features, seed=0, trajectory=True)
    assert out.texts == CAPTIONS
    assert loaded(features, seed=0, precision="bf16").texts == CAPTIONS  # the matmuls in bfloat16
    live = CaptionPipeline(trainer.cfg, trainer.ema.module, trainer.tokenizer)
    assert live(features, seed=0, trajectory=True).trajectories == out.trajectories
    saved = load_file(str(tmp_path / "run" / "ema.safetensors"))
    assert any("crossattention" in name for name in saved)
    state = loaded.model.state_dict()
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
