"""Build the captioner that ``model.kind`` names, fresh or from a saved architecture."""
from __future__ import annotations

from torch import nn

from ..config import Config
from ..text.tokenizer import CaptionTokenizer
from .autoregressive import AutoregressiveCaptioner
from .captioner import DiffusionCaptioner


def build_model(cfg: Config, tokenizer: CaptionTokenizer, *, pretrained: bool = True,
                body_config: dict | None = None) -> nn.Module:
    common = dict(vocab_size=tokenizer.vocab_size, seq_len=cfg.text.max_length, pretrained=pretrained,
                  backbone_config=body_config)
    if cfg.model.kind == "autoregressive":
        return AutoregressiveCaptioner(cfg.model, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                                       pad_id=tokenizer.pad_id, **common)
    return DiffusionCaptioner(cfg.model, **common)
