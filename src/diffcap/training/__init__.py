"""Training captioners: the optimisation loop, the run directory, validation, distillation.

``Trainer``, ``TrainingData`` and ``load_training_data`` are importable from here. They load on first
use, so that ``diffcap.training.rundir`` (which CaptionPipeline reads runs with) can be imported without
the trainer, whose validation uses CaptionPipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .trainer import Trainer, TrainingData, load_training_data

__all__ = ["Trainer", "TrainingData", "load_training_data"]


def __getattr__(name: str):
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
