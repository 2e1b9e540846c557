"""What the trainer reports besides its loss: held-out losses, sample captions and CIDEr
(:class:`Validator`), and which images a non-finite loss came from (:class:`NonFiniteCheck`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..config import Config
from ..data.contract import describe_ids
from ..data.datasets import SplitData
from ..models.base import Captioner
from ..pipeline import CaptionPipeline
from ..text.tokenizer import CaptionTokenizer

VAL_CAPTIONS = 256  # held-out captions the validation losses are measured on
VAL_SEED = 1234  # validation draws from its own seed, so it never shifts the training RNG stream


class Validator:
    """Scores a model on the validation split: ``val/<loss>`` from :meth:`Captioner.validation_losses`,
    then ``val/CIDEr`` of the captions of its first ``train.eval_images`` images, and three samples."""

    def __init__(
        self,
        cfg: Config,
        tokenizer: CaptionTokenizer,
        val: SplitData | None,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager],
    ):
        self.cfg, self.tokenizer, self.val = cfg, tokenizer, val
        self.device, self.autocast = device, autocast

    @torch.no_grad()
    def __call__(self, model: Captioner) -> dict:
        val = self.val
        if val is None:
            return {}
        model = model.eval()
        record: dict = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(VAL_SEED)
            n = min(VAL_CAPTIONS, len(val.caption_ids))
            ids = val.caption_ids[:n].to(self.device)
            feats = val.features[val.caption_image[:n]].to(self.device)
            with self.autocast():
                record |= {f"val/{k}": v for k, v in model.validation_losses(ids, feats).items()}
        images = val.image_ids[: self.cfg.train.eval_images]
        pipe = CaptionPipeline(self.cfg, model, self.tokenizer, self.device)
        predictions = dict(zip(images, pipe(val.features[: len(images)]).texts))
        # The Java-backed metrics load only when a run validates.
        from ..evaluation.metrics import cider

        record["val/CIDEr"] = cider(predictions, {i: val.references[i] for i in images})
        record["val/samples"] = [{"image_id": i, "caption": c} for i, c in list(predictions.items())[:3]]
        return record


class NonFiniteCheck:
    """Averages a step's scalar loss terms over the processes (one all-reduce per step, which also tells
    every process whether any loss is non-finite) and, before the update, stops training with the
    images of the captions whose loss is not finite, or, for a gradient that is not finite, those of
    the step's batch."""

    def __init__(self, accelerator: Accelerator, train: SplitData, captions_path: str):
        self.accelerator, self.train, self.captions_path = accelerator, train, captions_path

    def scalars(self, terms: dict, index: torch.Tensor, step: int, kept: str) -> dict[str, float]:
        """``index``: this process's rows of the training split; ``kept``: what the error says survives."""
        names = [k for k, v in terms.items() if v.dim() == 0]
        values = torch.stack(
            [(~torch.isfinite(terms["loss"].detach())).float()] + [terms[k].detach().float() for k in names]
        )
        world = self.accelerator.num_processes
        if world > 1:
            values = self.accelerator.reduce(values, "sum")
        if values[0] > 0:
            self._raise(terms, index, step, kept)
        return {k: float(v) / world for k, v in zip(names, values[1:])}

    def gradient(self, norm: torch.Tensor | float, rows: torch.Tensor, step: int, kept: str) -> None:
        """Stop if the gradient norm of the step (the same on every process once DDP has averaged the
        gradients; reduced anyway, so that all processes agree) is not finite; ``rows``: this
        process's rows of the training split in the step's micro-batches."""
        bad = (~torch.isfinite(torch.as_tensor(norm, dtype=torch.float32))).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad.to(self.accelerator.device), "sum")
        if bad.item() > 0:
            images = self._images(rows.tolist())
            raise FloatingPointError(
                f"non-finite gradient at step {step} from a finite loss (batch of {len(images)} image(s) from "
                f"{self.captions_path}: {describe_ids(images)}); stopped before the update, {kept}"
            )

    def _images(self, local: list[int]) -> list[str]:
        """The images of training rows ``local``, gathered from every process, each named once."""
        images = [self.train.image_ids[int(self.train.caption_image[i])] for i in local]
        if self.accelerator.num_processes > 1:
            images = gather_object(images)
        return list(dict.fromkeys(images))

    def _raise(self, terms: dict, index: torch.Tensor, step: int, kept: str) -> None:
        local = index.tolist()
        culprits: list[int] = []
        if not torch.isfinite(terms["loss"]):
            culprits = local
            per = terms.get("per_sample")
            if per is not None and per.numel() % len(local) == 0:  # [K*B]: name the captions themselves
                rows = (~torch.isfinite(per.detach().view(-1, len(local)))).any(0)
                culprits = [local[i] for i in rows.nonzero().flatten().tolist()] or local
        images = self._images(culprits)
        raise FloatingPointError(
            f"non-finite loss at step {step} (batch of {len(local) * self.accelerator.num_processes} "
            f"captions from {self.captions_path}); non-finite for image {describe_ids(images)}; "
            f"stopped before the update, {kept}"
        )
