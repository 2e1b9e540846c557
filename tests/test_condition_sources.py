"""Several condition sources (the seed's "[x_t..., image_clip, text_clip]"): feature stores joined along the
token axis, each source with its own segment embedding."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CAPTIONS, small_config

from diffcap.cli import main
from diffcap.config import Config, ConfigError, validate
from diffcap.data.contract import CaptionRecord, DataError, FeatureStore, write_captions, write_features
from diffcap.data.sources import join_features
from diffcap.models.denoiser import TransformerDenoiser
from diffcap.pipeline import CaptionPipeline
from diffcap.training import Trainer

DIM = 16


def test_join_features_concatenates_sources_along_the_tokens(tmp_path):
    ids = ["a", "b", "c"]
    pooled = {i: torch.randn(DIM) for i in ids}
    grid = {i: torch.randn(3, DIM).half() for i in ids}
    write_features(tmp_path / "image.safetensors", pooled)
    write_features(tmp_path / "grid.safetensors", grid)
    index = join_features([tmp_path / "image.safetensors", tmp_path / "grid.safetensors"], tmp_path / "joined")
    store = FeatureStore.open(index.parent)
    assert store.item_shape == (4, DIM) and store.dtype == torch.float32  # float16 grid promoted
    assert store.metadata["segments"] == "1,3"
    assert len(json.loads(store.metadata["sources"])) == 2
    item = store.get(["b"])[0]
    assert torch.equal(item[0], pooled["b"]) and torch.equal(item[1:], grid["b"].float())


def test_join_features_refuses_sources_that_do_not_line_up(tmp_path):
    write_features(tmp_path / "a.safetensors", {"x": torch.randn(DIM), "y": torch.randn(DIM)})
    write_features(tmp_path / "narrow.safetensors", {"x": torch.randn(8), "y": torch.randn(8)})
    write_features(tmp_path / "fewer.safetensors", {"x": torch.randn(DIM)})
    with pytest.raises(DataError, match="equally wide"):
        join_features([tmp_path / "a.safetensors", tmp_path / "narrow.safetensors"], tmp_path / "j1")
    with pytest.raises(DataError, match="differ in their ids"):
        join_features([tmp_path / "a.safetensors", tmp_path / "fewer.safetensors"], tmp_path / "j2")
    with pytest.raises(DataError, match="at least two"):
        join_features([tmp_path / "a.safetensors"], tmp_path / "j3")


def test_cond_segments_must_add_up_to_the_condition_tokens():
    cfg = Config()
    cfg.model.cond_tokens, cfg.model.cond_dim, cfg.model.cond_segments = 2, DIM, "1,2"
    with pytest.raises(ConfigError, match="adds up to 3"):
        validate(cfg)
    cfg.model.cond_segments = "1,x"
    with pytest.raises(ConfigError, match="positive token counts"):
        validate(cfg)
    cfg.model.cond_segments = "1,1"
    validate(cfg)


@pytest.mark.parametrize("fusion", ["cross", "concat"])
def test_each_source_has_its_own_segment_embedding(fusion):
    """Swapping the image and the text token changes the prediction only because each source is marked:
    cross-attention is blind to the order of its keys, so without segments the swap changes nothing."""

    def build(segments):
        torch.manual_seed(0)
        kw = dict(emb_dim=8, cond_dim=DIM, seq_len=6, max_cond_tokens=2, d_model=32, n_layers=1, n_heads=4)
        return TransformerDenoiser(**kw, dropout=0.0, fusion=fusion, cond_segments=segments).eval()

    x_t, t, cond = torch.randn(2, 6, 8), torch.tensor([4, 90]), torch.randn(2, 2, DIM)
    swapped = cond.flip(1)
    marked = build([1, 1])
    assert not torch.allclose(marked(x_t, t, cond), marked(x_t, t, swapped))
    assert "source.weight" in marked.state_dict() and "source_ids" not in marked.state_dict()
    if fusion == "cross":
        unmarked = build(None)
        assert torch.allclose(unmarked(x_t, t, cond), unmarked(x_t, t, swapped), atol=1e-6)


@pytest.mark.parametrize("fusion", ["concat", "cross"])
def test_overfits_captions_that_only_both_sources_together_determine(tmp_path, fusion):
    """Image vectors shared by pairs of captions, text vectors by every other caption: only the pair
    (image, text) tells the eight captions apart."""
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(4, DIM, generator=g), torch.randn(2, DIM, generator=g)
    ids = [f"img{i}" for i in range(8)]
    data = tmp_path / "data"
    data.mkdir()
    write_captions([CaptionRecord(i, c, "train") for i, c in zip(ids, CAPTIONS)], data / "captions.jsonl")
    write_features(data / "image.safetensors", {i: image[k // 2] for k, i in enumerate(ids)})
    write_features(data / "text.safetensors", {i: text[k % 2] for k, i in enumerate(ids)})
    assert (
        main(
            [
                "join-features",
                str(data / "image.safetensors"),
                str(data / "text.safetensors"),
                "--out",
                str(data / "joined"),
            ]
        )
        == 0
    )

    cfg = small_config(data, steps=400)
    cfg.data.features = str(data / "joined")
    cfg.model.fusion = fusion
    cfg.diffusion.timesteps_per_caption = 4
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.train(resume=False)
    assert (trainer.cfg.model.cond_tokens, trainer.cfg.model.cond_segments) == (2, "1,1")

    pipe = CaptionPipeline.from_pretrained(tmp_path / "run")
    assert pipe.model.denoiser.source.num_embeddings == 2
    assert pipe(FeatureStore.open(data / "joined").get(ids), seed=0).texts == CAPTIONS
