"""CaptionPipeline: features (or images) in, captions out, rebuilt from a run directory."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .caching import cached_while_unchanged
from .checkpoint import load_run
from .config import Config, SamplerConfig
from .diffusion.diffusion import GaussianDiffusion
from .diffusion.sampler import Sampler
from .text.tokenizer import CaptionTokenizer


@dataclass
class Captions:
    texts: list[str]
    # per input: (timestep, decoded x0 estimate) for every sampling step, when asked for
    trajectories: list[list[tuple[int, str]]] | None = None


class CaptionPipeline:
    def __init__(self, cfg: Config, model: torch.nn.Module, tokenizer: CaptionTokenizer,
                 device: str | torch.device = "cpu"):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.diffusion = GaussianDiffusion(cfg.diffusion).to(self.device)
        self.run_dir: Path | None = None  # where classifier-guidance models are looked up
        self.classifiers: dict[str, torch.nn.Module] = {}  # sampler.classifier_path -> loaded model
        self._bf16_cache = None  # the bf16 copy of the model (see _model_for)

    def classifier(self, path: str) -> torch.nn.Module:
        """The guidance classifier RUN/<path>/ (loaded once), for sampler.classifier_scale > 0."""
        if path not in self.classifiers:
            from .diffusion.guidance import load_guidance

            if self.run_dir is None:
                raise ValueError("classifier guidance needs a pipeline loaded from a run directory "
                                 "(or a model in pipeline.classifiers)")
            self.classifiers[path] = load_guidance(self.run_dir / path, self.device)
        return self.classifiers[path]

    @classmethod
    def from_pretrained(cls, run_dir: str | Path, *, ema: bool = True, device: str = "cpu") -> "CaptionPipeline":
        cfg, model, tokenizer = load_run(run_dir, ema=ema)
        pipe = cls(cfg, model, tokenizer, device)
        pipe.run_dir = Path(run_dir)
        return pipe

    @property
    def feature_shape(self) -> tuple[int, ...]:
        m = self.cfg.model
        if m.image_encoder:
            return (3, 64, 64)
        return (m.cond_dim,) if m.cond_tokens == 1 else (m.cond_tokens, m.cond_dim)

    def check_features(self, features: torch.Tensor, source: str = "features") -> None:
        shape = tuple(features.shape[1:])
        if shape != self.feature_shape and not (self.cfg.model.cond_tokens == 1 and shape == (1, self.cfg.model.cond_dim)):
            raise ValueError(f"{source}: items have shape {shape} but this run was trained on {self.feature_shape}")

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, *, seed: int | None = None, batch_size: int = 64,
                 trajectory: bool = False, **sampler_overrides) -> Captions:
        """Caption a batch of features [N x ...]. ``sampler_overrides`` (steps=, method=, guidance_scale=,
        classifier_scale=, clamp=, mbr=, precision=, ...) change the run's sampler settings for this call only."""
        self.check_features(features)
        precision = sampler_overrides.get("precision", self.cfg.sampler.precision)
        model = self._model_for(precision)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if self.cfg.model.kind == "autoregressive":
                return self._generate_autoregressive(model, features, batch_size, **sampler_overrides)
            return self._sample_diffusion(model, features, seed, batch_size, trajectory, sampler_overrides)

    def _model_for(self, precision: str) -> torch.nn.Module:
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

    def _sample_diffusion(self, model: torch.nn.Module, features: torch.Tensor, seed: int | None, batch_size: int,
                          trajectory: bool, sampler_overrides: dict) -> Captions:
        sampler_cfg: SamplerConfig = dataclasses.replace(self.cfg.sampler, **sampler_overrides)
        classifier = self.classifier(sampler_cfg.classifier_path) if sampler_cfg.classifier_scale > 0 else None
        sampler = Sampler(model, self.diffusion, sampler_cfg, self.cfg.text.max_length, self.tokenizer.pad_id,
                          classifier=classifier)
        generator = torch.Generator(self.device).manual_seed(sampler_cfg.seed if seed is None else seed)
        texts: list[str] = []
        trajs: list[list[tuple[int, str]]] = []
        for start in range(0, len(features), batch_size):
            out = sampler.sample(features[start:start + batch_size].to(self.device), generator, trajectory)
            texts += self.tokenizer.decode(out.ids.cpu())
            if trajectory:
                steps = [(t, self.tokenizer.decode_tokens(ids)) for t, ids in out.trajectory]
                for i in range(out.ids.shape[0]):
                    trajs.append([(t, " ".join(tokens[i])) for t, tokens in steps])
        return Captions(texts, trajs if trajectory else None)

    def _generate_autoregressive(self, model: torch.nn.Module, features: torch.Tensor, batch_size: int,
                                 beam_size: int | None = None, **ignored) -> Captions:
        """Greedy or beam search with the KV cache; diffusion-only settings (steps, clamp...) do not apply."""
        beam = self.cfg.sampler.beam_size if beam_size is None else beam_size
        tok = self.tokenizer
        texts: list[str] = []
        for start in range(0, len(features), batch_size):
            ids = model.generate(features[start:start + batch_size].to(self.device),
                                 max_length=self.cfg.text.max_length, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                 pad_id=tok.pad_id, beam_size=beam)
            texts += tok.decode(ids.cpu())
        self.model.last_nfe = model.last_nfe  # forwards of the last batch, also when a bf16 copy ran
        return Captions(texts, None)
