"""The captioning service behind the page and the API: one trained run, the encoder that turns an
upload into its features, request settings, and the batching queue.

The run decides what it takes. A run with its own image encoder (the demo's CNN) takes pixels; a run
trained on CLIP image features takes an image through the same CLIP; a run trained on text features
(CapDec-style text-only training, the Flickr8k proxy) takes a sentence through the same text encoder,
and a CLIP-text run also takes an image through CLIP's image tower, which shares the text tower's space.

Seeds: requests with equal settings (seed included) share one pipeline call, and the pipeline draws one
noise tensor for the whole batch from the seed, so a caption equals ``CaptionPipeline``'s for that seed
when the request is captioned alone (always with --max-batch 1), and is the same draw's row for its place
in a batch otherwise. The answer's ``batch_size`` says which.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import MAX_MBR
from ..data.contract import DataError, read_captions
from ..pipeline import CaptionPipeline
from .batching import BatchQueue
from .limits import InputError, Limits

log = logging.getLogger(__name__)

SETTINGS = ("steps", "guidance_scale", "seed", "samples", "trajectory")
MAX_GUIDANCE = 50.0


@dataclass(frozen=True)
class Settings:
    """One request's sampler settings; None keeps the run's default. Hashable: requests with equal
    settings share a batch."""

    seed: int | None = None  # None for an autoregressive run: its decoding draws no noise
    steps: int | None = None
    guidance_scale: float | None = None
    samples: int | None = None
    trajectory: bool = False

    def overrides(self) -> dict:
        named = {"steps": self.steps, "guidance_scale": self.guidance_scale, "mbr": self.samples}
        return {k: v for k, v in named.items() if v is not None}


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{name}: expected an integer, got {value!r}")
    try:
        number = float(value) if not isinstance(value, int) else value
    except ValueError:
        raise InputError(f"{name}: expected an integer, got {value!r}") from None
    if not math.isfinite(number) or int(number) != number:
        raise InputError(f"{name}: expected an integer, got {value!r}")
    return int(number)


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(f"{name}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"{name}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{name}: expected a finite number, got {value!r}")
    return number


def _as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InputError(f"{name}: expected true or false, got {value!r}")


class RunInputs:
    """Turns uploads (PIL images or sentences) into the run's condition features."""

    def __init__(self, pipe: CaptionPipeline, device: str):
        cfg, data = pipe.cfg, pipe.cfg.data
        self.image_encoder = self.text_encoder = None
        self.pixel_size: int | None = None
        if cfg.model.image_encoder:  # the demo: raw pixels, encoded by the run's own CNN
            self.pixel_size = pipe.feature_shape[-1]
            self.accepts: tuple[str, ...] = ("image",)
            return
        patches = cfg.model.cond_tokens > 1
        if data.encoder_kind in ("clip-image", "clip-text") and data.encoder:
            from ..data.encoders import ClipImageEncoder

            if not (patches and data.encoder_kind == "clip-text"):
                self.image_encoder = ClipImageEncoder(data.encoder, device=device, patch_tokens=patches)
            self.patches = patches
        if data.encoder_kind in ("clip-text", "sentence-transformers") and data.encoder:
            from ..data.encoders import TextEncoder

            self.text_encoder = TextEncoder(data.encoder, kind=data.encoder_kind, device=device)
        self.accepts = tuple(
            kind for kind, enc in (("image", self.image_encoder), ("text", self.text_encoder)) if enc is not None
        )
        if not self.accepts:
            origin = (
                f"{data.encoder_kind} features from {data.encoder}" if data.encoder else "features of unknown origin"
            )
            raise ValueError(
                f"this run was trained on {origin}, so the server cannot encode an upload the same way; "
                "serve a run whose feature file records its encoder (diffcap prepare writes it)"
            )

    def encode(self, kind: str, items: list) -> torch.Tensor:
        if kind == "text":
            return self.text_encoder(items)
        if self.pixel_size is not None:
            size = self.pixel_size
            arrays = [np.asarray(img.resize((size, size), Image.Resampling.BICUBIC)) for img in items]
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # uint8 [B x 3 x S x S]
        return self.image_encoder.encode_images(items)["patches" if self.patches else "pooled"]


def example_inputs(pipe: CaptionPipeline, accepts: tuple[str, ...], n: int = 4) -> list:
    """A few inputs from the run's own data set, test split first: scenes for the demo (its feature file
    holds their pixels), sentences of the same kind for a text-conditioned run. Empty when the data has
    moved."""
    data = pipe.cfg.data
    try:
        records = read_captions(data.captions)
    except (DataError, OSError):
        return []
    by_split: dict[str, list] = {}
    for record in records:
        by_split.setdefault(record.split, []).append(record)
    chosen = by_split.get("test") or by_split.get(data.val_split) or records
    if "image" in accepts and pipe.cfg.model.image_encoder:
        from safetensors import safe_open

        ids = list(dict.fromkeys(r.image_id for r in chosen))[:n]
        try:
            with safe_open(data.features, framework="pt") as f:
                pixels = [f.get_tensor(i) for i in ids if i in set(f.keys())]
        except (OSError, ValueError):
            return []
        return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    if "text" in accepts:
        return list(dict.fromkeys(r.caption for r in chosen))[:n]
    return []  # a run on CLIP image features: its feature file holds no pixels to show


class CaptionService:
    def __init__(
        self,
        run_dir: str | Path,
        *,
        device: str = "cpu",
        limits: Limits | None = None,
        max_batch: int = 16,
        max_wait_s: float = 0.005,
    ):
        self.run_dir = Path(run_dir)
        self.limits = limits or Limits()
        self.pipe = CaptionPipeline.from_pretrained(run_dir, device=device)
        self.inputs = RunInputs(self.pipe, device)
        self.iterative = bool(self.pipe.model.iterative)
        self.examples = example_inputs(self.pipe, self.inputs.accepts)
        self.queue = BatchQueue(
            self._run_batch, max_batch=max_batch, max_wait_s=max_wait_s, max_queue=self.limits.max_queue
        )

    def close(self) -> None:
        self.queue.close()

    @property
    def defaults(self) -> dict:
        sampler = self.pipe.cfg.sampler
        if not self.iterative:
            return {}
        return {
            "steps": sampler.steps,
            "guidance_scale": sampler.guidance_scale,
            "seed": sampler.seed,
            "samples": sampler.mbr,
        }

    def describe(self) -> dict:
        """What /api/health reports."""
        return {
            "status": "ok",
            "run": str(self.run_dir),
            "kind": self.pipe.cfg.model.kind,
            "iterative": self.iterative,
            "accepts": list(self.inputs.accepts),
            "defaults": self.defaults,
            "limits": self.limits.describe(),
            "batching": {
                "max_batch": self.queue.max_batch,
                "max_wait_ms": self.queue.max_wait_s * 1000,
                "waiting": len(self.queue),
                "batches": self.queue.batches,
                "captions": self.queue.items,
            },
        }

    def settings(self, raw: Mapping[str, object]) -> Settings:
        """Request fields -> checked Settings; an unknown field, a bad value, or a diffusion setting sent
        to an autoregressive run is an InputError naming it."""
        unknown = sorted(set(raw) - set(SETTINGS))
        if unknown:
            raise InputError(
                f"unknown field(s) {', '.join(unknown)}; the fields are image or text, {', '.join(SETTINGS)}"
            )
        given = {k: v for k, v in raw.items() if v is not None and v != ""}
        diffusion_only = sorted(set(given) & {"steps", "guidance_scale", "samples", "seed"})
        if not self.iterative and diffusion_only:
            raise InputError(
                f"{', '.join(diffusion_only)} apply to a diffusion run; this run is "
                f"{self.pipe.cfg.model.kind} and decodes deterministically"
            )
        seed = steps = guidance = samples = None
        if self.iterative:
            seed = _as_int("seed", given["seed"]) if "seed" in given else self.pipe.cfg.sampler.seed
            if not 0 <= seed < 2**63:
                raise InputError(f"seed must be in 0..2^63-1, got {seed}")
        if "steps" in given:
            steps, most = _as_int("steps", given["steps"]), self.pipe.cfg.diffusion.num_timesteps
            if not 1 <= steps <= most:
                raise InputError(f"steps must be in 1..{most} (the run's training timesteps), got {steps}")
        if "guidance_scale" in given:
            guidance = _as_float("guidance_scale", given["guidance_scale"])
            if not 0 <= guidance <= MAX_GUIDANCE:
                raise InputError(f"guidance_scale must be in 0..{MAX_GUIDANCE:g}, got {guidance:g}")
        if "samples" in given:
            samples = _as_int("samples", given["samples"])
            if not 1 <= samples <= MAX_MBR:
                raise InputError(f"samples must be in 1..{MAX_MBR}, got {samples}")
        trajectory = _as_bool("trajectory", given["trajectory"]) if "trajectory" in given else False
        return Settings(
            seed=seed, steps=steps, guidance_scale=guidance, samples=samples, trajectory=trajectory and self.iterative
        )

    def submit(self, kind: str, item: object, settings: Settings):
        """Queue one input (a PIL image or a checked sentence); a Future of the caption's dict."""
        if kind not in self.inputs.accepts:
            wanted = " or ".join("an image" if k == "image" else "a sentence ('text')" for k in self.inputs.accepts)
            raise InputError(f"this run takes {wanted}, not {'an image' if kind == 'image' else 'text'}")
        return self.queue.submit((kind, settings), item)

    def _run_batch(self, key: tuple[str, Settings], items: list) -> list[dict]:
        kind, settings = key
        features = self.inputs.encode(kind, items)
        out = self.pipe(features, seed=settings.seed, trajectory=settings.trajectory, **settings.overrides())
        steps = (settings.steps or self.pipe.cfg.sampler.steps) if self.iterative else None
        results = []
        for i, text in enumerate(out.texts):
            result = {"caption": text, "steps": steps, "batch_size": len(items)}
            if settings.trajectory:
                result["trajectory"] = [[int(t), tokens] for t, tokens in out.trajectories[i]]
            results.append(result)
        return results
