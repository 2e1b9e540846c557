"""CaptionPipeline: features (or images) in, captions out, rebuilt from a run directory."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .caching import cached_while_unchanged
from .config import Config, ConfigError, SamplerConfig, check_guidance, validate_sampler
from .models.base import Captioner
from .models.conditioning import feature_shape
from .precision import sampling_in_bf16
from .text.tokenizer import CaptionTokenizer
from .training.rundir import RunDir, RunDirError


@dataclass
class Captions:
    texts: list[str]
    # per input: (timestep, decoded x0 estimate) for every sampling step, when asked for
    trajectories: list[list[tuple[int, str]]] | None = None


class CaptionPipeline:
    def __init__(self, cfg: Config, model: Captioner, tokenizer: CaptionTokenizer, device: str | torch.device = "cpu"):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.run_dir: Path | None = None  # where classifier-guidance models are looked up
        self.classifiers: dict[str, torch.nn.Module] = {}  # sampler.classifier_path -> loaded model
        self._bf16_cache = None  # the bf16 copy of the model (see _model_for)

    def classifier(self, path: str) -> torch.nn.Module:
        """The guidance classifier RUN/<path>/ (loaded once), for sampler.classifier_scale > 0."""
        if path not in self.classifiers:
            from .training.guidance import load_guidance

            if self.run_dir is None:
                raise ValueError(
                    "classifier guidance needs a pipeline loaded from a run directory "
                    "(or a model in pipeline.classifiers)"
                )
            self.classifiers[path] = load_guidance(self.run_dir / path, self.device)
        return self.classifiers[path]

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        ema: bool = True,
        device: str = "cpu",
        revision: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> CaptionPipeline:
        """A pipeline from a run directory, a folder written by :meth:`save_pretrained`, or a hub model id
        (``owner/name``, fetched with ``huggingface_hub.snapshot_download`` into the hub cache, or
        ``cache_dir``; with ``HF_HUB_OFFLINE=1`` only the cache is read)."""
        run_dir = (
            Path(name_or_path) if Path(name_or_path).is_dir() else _download(str(name_or_path), revision, cache_dir)
        )
        cfg, model, tokenizer = RunDir(run_dir).load_model(ema=ema)
        pipe = cls(cfg, model, tokenizer, device)
        pipe.run_dir = run_dir
        return pipe

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the model as a folder that :meth:`from_pretrained` reads (and the hub can host as it is):
        config.json, body_config.json, tokenizer/, model.safetensors (the weights this pipeline captions
        with, EMA ones for a pipeline loaded from a run) and a model card README.md."""
        from .model_card import write_model_card
        from .training.rundir import save_model_files

        folder = Path(folder)
        save_model_files(folder, self.cfg, self.model, self.tokenizer)
        write_model_card(folder, self.cfg, source=self.run_dir or folder)
        return folder

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return feature_shape(self.cfg.model)

    def check_features(self, features: torch.Tensor, source: str = "features") -> None:
        shape = tuple(features.shape[1:])
        m = self.cfg.model
        if shape != self.feature_shape and not (m.cond_tokens == 1 and shape == (1, m.cond_dim)):
            raise ValueError(f"{source}: items have shape {shape} but this run was trained on {self.feature_shape}")

    @torch.no_grad()
    def __call__(
        self,
        features: torch.Tensor,
        *,
        seed: int | None = None,
        batch_size: int = 64,
        trajectory: bool = False,
        **sampler_overrides,
    ) -> Captions:
        """Caption a batch of features [N x ...]. ``sampler_overrides`` (steps=, method=, guidance_scale=,
        classifier_scale=, clamp=, mbr=, beam_size=, precision=, ...) change the run's sampler settings
        for this call only; one the model does not use (steps= for an autoregressive run) is an error."""
        self.check_features(features)
        sampler_cfg = self.sampler_config(seed=seed, **sampler_overrides)
        bf16 = sampling_in_bf16(sampler_cfg.precision, self.device)
        model = self._model_for("bf16" if bf16 else "fp32")
        classifier = self.classifier(sampler_cfg.classifier_path) if sampler_cfg.classifier_scale > 0 else None
        generator = torch.Generator(self.device).manual_seed(sampler_cfg.seed)
        texts: list[str] = []
        trajs: list[list[tuple[int, str]]] = []
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            for start in range(0, len(features), batch_size):
                out = model.generate(
                    features[start : start + batch_size].to(self.device),
                    sampler_cfg,
                    generator=generator,
                    trajectory=trajectory,
                    classifier=classifier,
                )
                texts += self.tokenizer.decode(out.ids.cpu())
                steps = [(t, self.tokenizer.decode_tokens(ids)) for t, ids in out.trajectory]
                for i in range(out.ids.shape[0] if trajectory else 0):
                    trajs.append([(t, " ".join(tokens[i])) for t, tokens in steps])
        if hasattr(model, "last_nfe"):  # forwards of the last batch (counted by the AR search), also for a bf16 copy
            self.model.last_nfe = model.last_nfe
        return Captions(texts, trajs if trajectory else None)

    def sampler_config(self, seed: int | None = None, **overrides) -> SamplerConfig:
        """The run's sampler settings with ``overrides`` (and ``seed``, if given) applied and checked."""
        if seed is not None:
            overrides["seed"] = seed
        try:
            sampler_cfg = dataclasses.replace(self.cfg.sampler, **overrides)
        except TypeError as exc:
            raise ConfigError(f"unknown sampler setting in {sorted(overrides)}: {exc}") from exc
        if unused := sorted(set(overrides) - self.model.sampler_fields):
            raise ConfigError(
                f"sampler.{', sampler.'.join(unused)} does not apply to {type(self.model).__name__} "
                f"(it reads {sorted(self.model.sampler_fields)}); leave it out"
            )
        validate_sampler(sampler_cfg, self.cfg.diffusion.num_timesteps)
        if "guidance_scale" in self.model.sampler_fields:
            check_guidance(sampler_cfg, self.cfg.diffusion)
        return sampler_cfg

    def _model_for(self, precision: str) -> torch.nn.Module:  # precision: fp32 or bf16, as resolved
        """The model to caption with. For bf16, a copy whose nn.Linear weights are stored in bfloat16:
        autocast would otherwise cast every weight again at every call, a fifth of a batch-1 caption's
        time (BENCHMARKS.md). The copy is remade whenever the weights or buffers change (a pipeline
        that follows an EMA model during training sees every update)."""
        if precision != "bf16":
            return self.model

        def bf16_copy() -> torch.nn.Module:
            fast = copy.deepcopy(self.model)
            for module in fast.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(torch.bfloat16)
            return fast

        state = (*self.model.parameters(), *self.model.buffers())  # buffers: e.g. the allowed-token mask
        return cached_while_unchanged(self, "_bf16_cache", state, bf16_copy)


def _download(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> Path:
    """The local snapshot of the hub model ``repo_id`` (downloaded unless the cache has it)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir))
    except (HFValidationError, OSError) as exc:  # not a repo id, not on the hub, offline and not cached
        raise RunDirError(
            f"{repo_id}: no run directory of that name here, and no hub model that can be fetched "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
