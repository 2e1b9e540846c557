"""The interface every captioner implements, so that training, sampling and evaluation never ask
which kind of captioner they hold.

A captioner owns its weights and everything that decides how it learns and how it writes a caption:
the diffusion captioner its forward process and sampler, the autoregressive one its teacher forcing
and search. Code outside :mod:`diffcap.models` uses only what is declared here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import SamplerConfig


@dataclass
class Generation:
    ids: torch.Tensor  # [B x L] word ids, right-padded with the tokenizer's PAD
    # (timestep, [B x L] ids of the x0 estimate) per refinement step, when asked for
    trajectory: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class Captioner(nn.Module):
    """Base class of the captioners (see :mod:`diffcap.models.factory` for which config builds which).

    Subclasses set ``image_encoder`` (a module or None) before :meth:`encode_condition` is used.
    """

    #: True when :meth:`generate` refines every position over ``sampler.steps`` (diffusion), False when
    #: it decodes left to right. Sweeps over sampling steps and classifier guidance apply only when True.
    iterative: bool
    #: The SamplerConfig fields :meth:`generate` reads; the pipeline refuses an explicit setting of any
    #: other field rather than ignore it.
    sampler_fields: frozenset[str]
    image_encoder: nn.Module | None

    def encode_condition(self, features: torch.Tensor) -> torch.Tensor:
        """Features as stored in the feature file -> condition tokens [B x N x C]."""
        if self.image_encoder is not None:
            return self.image_encoder(features)
        features = features.float()
        return features[:, None] if features.dim() == 2 else features

    def body_config(self) -> dict:
        """The architecture saved next to the weights, so that a run rebuilds without the hub."""
        raise NotImplementedError

    def restrict_vocabulary(self, caption_ids: torch.Tensor) -> None:
        """Called once before training with the training captions [N x L]; a captioner may limit what
        it generates to their tokens. The default allows every token."""

    def upgrade_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights saved by an earlier diffcap -> the keys this version's model has (the default: as is)."""
        return state

    def training_losses(
        self, ids: torch.Tensor, features: torch.Tensor, *, noise=None, net: nn.Module | None = None
    ) -> dict[str, torch.Tensor]:
        """Losses of one batch: the scalar ``loss`` (what is minimised) and its named scalar terms, plus
        ``per_sample`` values (detached) that tell which captions a non-finite loss came from.

        Args:
            ids: [B x L] caption ids as from ``CaptionTokenizer.encode``.
            features: [B x ...] features as stored in the feature file.
            noise: a :class:`~diffcap.diffusion.noise.StepNoise` for every random draw of the step
                (so several processes train like one); the global torch RNG if None.
            net: the module to run forward passes through: the DDP wrapper of this captioner when
                training on several processes (gradients are synchronised only for work done inside
                its ``forward``); this captioner if None.
        """
        raise NotImplementedError

    def validation_losses(self, ids: torch.Tensor, features: torch.Tensor) -> dict[str, float]:
        """Held-out losses by name (logged as ``val/<name>``); may draw from the global torch RNG."""
        raise NotImplementedError

    def generate(
        self,
        features: torch.Tensor,
        sampler_cfg: SamplerConfig,
        *,
        generator: torch.Generator | None = None,
        trajectory: bool = False,
        classifier: nn.Module | None = None,
    ) -> Generation:
        """Captions for features [B x ...] as ids, under the settings of ``sampler_cfg``.

        ``generator`` is the source of every random draw, ``trajectory`` asks for the intermediate
        estimates, ``classifier`` is the guidance model for ``sampler_cfg.classifier_scale > 0``.
        A captioner that cannot honour one of them raises ValueError.
        """
        raise NotImplementedError

    def training_state(self) -> dict[str, torch.Tensor]:
        """State that training changes outside the weights (saved with each checkpoint for resume)."""
        return {}

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no training state, got {sorted(state)}")


SAMPLER_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplerConfig))
