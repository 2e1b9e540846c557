"""Build the captioner that ``model.kind`` names, fresh or from a saved architecture: the one place that
maps a kind to a class."""

from __future__ import annotations

from ..config import Config
from ..text.tokenizer import CaptionTokenizer
from .autoregressive import AutoregressiveCaptioner
from .base import Captioner
from .diffusion_captioner import DiffusionCaptioner


def build_model(
    cfg: Config, tokenizer: CaptionTokenizer, *, pretrained: bool = True, body_config: dict | None = None
) -> Captioner:
    """``cfg`` must be resolved (:func:`diffcap.config.resolve`); ``pretrained=False`` with the saved
    ``body_config`` rebuilds a saved run without reading pretrained weights."""
    common = {"vocab_size": tokenizer.vocab_size, "seq_len": cfg.text.max_length, "backbone_config": body_config}
    if cfg.model.kind == "autoregressive":
        return AutoregressiveCaptioner(
            cfg.model, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, **common
        )
    return DiffusionCaptioner(cfg.model, cfg.diffusion, pad_id=tokenizer.pad_id, pretrained=pretrained, **common)
