"""The condition both captioners read: the image encoder that raw pixels go through, and the shape of
the condition tokens [B x N x C] (:meth:`Captioner.encode_condition` turns features into them).

The shape itself comes from the feature file and is written into the config by
:func:`diffcap.config.resolve`; a model only reads it.
"""

from __future__ import annotations

from ..config import CNN_IMAGE_SIZE, CNN_TOKENS, CNN_WIDTH, ConfigError, ModelConfig
from .image_encoder import ConvImageEncoder


def make_image_encoder(cfg: ModelConfig) -> ConvImageEncoder | None:
    return ConvImageEncoder() if cfg.image_encoder == "cnn" else None


def condition_shape(cfg: ModelConfig) -> tuple[int, int]:
    """(tokens N, width C) of the condition a model built from ``cfg`` reads."""
    if cfg.image_encoder == "cnn":
        return CNN_TOKENS, CNN_WIDTH
    if cfg.cond_dim <= 0 or cfg.cond_tokens <= 0:
        raise ConfigError(
            "model.cond_dim and model.cond_tokens must be set (diffcap.config.resolve fills them in "
            "from the feature file)"
        )
    return cfg.cond_tokens, cfg.cond_dim


def feature_shape(cfg: ModelConfig) -> tuple[int, ...]:
    """The shape of one feature item that a model built from ``cfg`` reads."""
    if cfg.image_encoder:
        return (3, CNN_IMAGE_SIZE, CNN_IMAGE_SIZE)
    return (cfg.cond_dim,) if cfg.cond_tokens == 1 else (cfg.cond_tokens, cfg.cond_dim)
