"""Configuration: one dataclass per component, defaults in code, YAML files hold overrides only.

A config as written names what to build; :func:`resolve` adds what the data set and tokenizer imply
(the condition's shape, the encoder that made the features, the widths of pretrained tables) and
returns a new Config. Nothing else writes into a config. The resolved config is saved as
``config.json`` in the run directory, and everything needed to rebuild the model and sampler is
derived from it (see :mod:`diffcap.pipeline`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .data.contract import FeatureSpec
    from .text.tokenizer import CaptionTokenizer

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied (unknown key, bad value)."""


@dataclass
class DataConfig:
    captions: str = ""  # JSONL or CSV of (image_id, caption, split); see docs/data-contract.md
    features: str = ""  # safetensors file keyed by image id
    train_split: str = "train"
    val_split: str = "val"
    overfit_n: int = 0  # debug: train on the first N examples only (the seed's single-sample trials)
    # The encoder that made the features (hub id or path) and its kind (clip-image, clip-text,
    # sentence-transformers); filled in from the feature file's metadata, so `diffcap caption` can
    # encode new images the same way.
    encoder: str = ""
    encoder_kind: str = ""
    # Gaussian noise added to the condition at training time only: CapDec (arXiv 2211.00575) trains on
    # text embeddings and uses std sqrt(0.016) ~ 0.126 so that image embeddings land inside the
    # training distribution at test time.
    feature_noise_std: float = 0.0


@dataclass
class TextConfig:
    tokenizer: str = "word_level"  # "word_level" or a pretrained WordPiece tokenizer (path or hub id)
    min_count: int = 1  # word-level vocabulary: rarer words become [UNK]
    max_length: int = 20


@dataclass
class ModelConfig:
    kind: str = "diffusion"  # or "autoregressive": the matched left-to-right baseline
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    dropout: float = 0.1
    # Initialise the transformer body from a BERT-family checkpoint (DistilBERT in the seed).
    backbone: str | None = None
    # The denoiser's transformer body: "bert" (transformers' BertModel, or model.backbone's) or
    # "prenorm" (the autoregressive captioner's pre-norm blocks without a mask; models/prenorm_body.py).
    body: str = "bert"
    # A trained autoregressive run whose blocks, positions, condition projection and output head start a
    # prenorm denoiser of the same shape (its distillation teacher; NAT students start from AR teachers).
    init_from: str | None = None
    # "learned": trained embeddings of width emb_dim projected to d_model (Diffusion-LM, arXiv 2205.14217).
    # Otherwise a path or hub id whose input embeddings are used frozen (the seed's DistilBERT setting).
    embedding: str = "learned"
    emb_dim: int = 64
    # Fixed-norm embeddings (each row rescaled to RMS emb_scale per coordinate); Difformer
    # (arXiv 2212.09412) shows that free norms let the model escape the noise by growing them.
    emb_normalize: bool = True
    emb_scale: float = 1.0
    time_embedding: bool = True  # sinusoidal timestep embedding; the seed had none
    self_condition: bool = True  # Bit Diffusion, arXiv 2208.04202
    # CDCD's score interpolation (arXiv 2211.15089): the network outputs logits over the vocabulary and
    # x0_hat = softmax(logits) @ E, so the rounding cross-entropy trains it as a classifier at every noise
    # level instead of through a D-wide regression bottleneck. Needs diffusion.objective = x0.
    score_interpolation: bool = False
    # Where its logits come from: "separate", a d_model -> vocabulary layer; "tied", a d_model -> D
    # projection scored against the embedding table like the rounding head (logits = out @ E^T), which
    # is d_model / D times less arithmetic for the largest matmul of a step.
    score_head: str = "separate"
    # "add" (like a time embedding), "concat" (extra tokens + segment embedding) or "cross" (every layer
    # cross-attends to the condition tokens: a large patch grid stays out of the self-attention)
    fusion: str = "concat"
    image_encoder: str | None = None  # "cnn": raw pixels go through a small CNN trained jointly (demo)
    cond_dim: int = 0  # condition width C; resolve() fills it in from the feature file
    cond_tokens: int = 0  # condition tokens N (1 for a pooled vector); resolve() fills it in from the feature file
    # Each condition source's token count, in order ("1,1": a CLIP image then a CLIP text embedding), for a
    # store joined from several sources (diffcap.data.sources); each gets its own segment embedding. ""
    # is one source. resolve() fills it in from the feature file.
    cond_segments: str = ""
    # The seed's "no training embedding and projection" and "pretrained projection layer with no bias":
    # freeze the projections into and out of the embedding space (the identity when the table is as wide
    # as the body; models/projections.py), and drop their bias.
    freeze_projections: bool = False
    projection_bias: bool = True


# model.image_encoder="cnn" reads CNN_IMAGE_SIZE x CNN_IMAGE_SIZE RGB pixels into a grid of CNN_TOKENS
# tokens CNN_WIDTH wide (models/image_encoder.py).
CNN_IMAGE_SIZE, CNN_WIDTH = 64, 128
CNN_TOKENS = (CNN_IMAGE_SIZE // 16) ** 2


@dataclass
class DiffusionConfig:
    schedule: str = "sqrt"  # linear (DDPM), cosine (improved DDPM), sqrt (Diffusion-LM)
    num_timesteps: int = 2000
    objective: str = "x0"  # x0, eps, or xtk (predict x_{t-k}, the seed's x_{t-30})
    step_gap: int = 30  # k of the xtk objective
    # l1 or mse on the objective, or vlb: the variational bound's closed-form terms (diffusion/vlb.py)
    loss: str = "l1"
    rounding_weight: float = 0.3  # cross-entropy of the tied rounding head; the seed's best
    diffusion_weight: float = 1.0  # the L1/MSE term; 0 with score interpolation is CDCD's pure CE loss
    restore_weight: float = 0.0  # Diffusion-LM's x_1 -> embedding restore term
    prior_weight: float = 1.0  # Diffusion-LM's prior term ||sqrt(abar_T) x0||^2
    timesteps_per_caption: int = 1  # the seed's SAMPLE_SIZE
    timestep_sampler: str = "uniform"  # uniform, loss_aware (improved DDPM), warped (CDCD-style) or grid
    grid_steps: int = 5  # "grid": train at the timesteps of trailing samplers with 1..grid_steps steps
    cond_dropout: float = 0.1  # classifier-free guidance, arXiv 2207.12598
    # Step-unrolled denoising (SUNDAE, Savinov et al. 2022, arXiv 2112.06749), for continuous diffusion:
    # for this share of the examples x_t is built the way the DDIM sampler builds its second step, from
    # the model's own clamped x0 estimate at t = T-1 (no gradient), and the model learns to recover the
    # true caption from it. Without it a later step only ever saw x_t made from true captions, so it
    # trusts the first step's mistakes instead of repairing them. Needs diffusion.objective = x0.
    unroll_prob: float = 0.0
    # Mask-predict in continuous diffusion (CMLM, Ghazvininejad et al. 2019, arXiv 1904.09324; LaDiC's
    # Back&Refine, arXiv 2404.10763): for this share of the examples a uniform number of positions is
    # noised to t = T-1 and the others are the clean caption at t = 0, each position told its own time.
    # The loss covers the noised positions. sampler.method = mask_predict then keeps the confident words
    # of each step and re-noises only the rest, so a later step writes words in the context of the kept
    # ones instead of every position choosing independently. Needs diffusion.objective = x0.
    mask_predict_prob: float = 0.0


@dataclass
class SamplerConfig:
    # ddim, ddpm, refine (the seed's loop that never re-noises), or mask_predict (re-noise the least
    # confident positions at each step; a model trained with diffusion.mask_predict_prob > 0)
    method: str = "ddim"
    steps: int = 20
    clamp: bool = True  # snap x0 to the nearest embedding (Diffusion-LM's clamping trick)
    guidance_scale: float = field(default=1.0, metadata={"flag": "--guidance"})  # classifier-free guidance
    # Classifier guidance (Dhariwal & Nichol, arXiv 2105.05233): scale of grad log p(c|x_t) from the
    # guidance model in RUN/<classifier_path>/ (trained by `diffcap train-guidance`); 0 = off.
    classifier_scale: float = 0.0
    classifier_path: str = "guidance"
    mbr: int = 1  # minimum Bayes risk selection among this many samples
    # Asymmetric time intervals (Bit Diffusion, arXiv 2208.04202, section 3.3): the network is told the
    # state is this many training timesteps noisier than it is, so it trusts x_t less and corrects
    # more of the previous step's rounding.
    time_offset: int = 0
    # Drop a token that repeats the one before it ("dog dog dog" -> "dog"): the standard post-processing
    # of non-autoregressive decoders, whose positions choose words independently (Lee et al. 2018,
    # arXiv 1802.06901; Wang et al. 2019, arXiv 1902.10245). Off by default: it changes what the
    # network produced, and the benchmarks report both.
    collapse_repeats: bool = False
    # How long a caption is. "free": every position rounds on its own, and PAD wins a position as soon
    # as no single word is likelier, so captions come out short (8 words against the references' 11.8
    # on the Flickr8k proxy). "expected": the first step fixes the length to the expected number of non-PAD positions,
    # sum_i (1 - P_i(PAD)) under the rounding distribution, and rounding then keeps PAD out of the first
    # n positions and in the rest (length prediction as in non-autoregressive decoding, Gu et al. 2018,
    # arXiv 1711.02281, read here off the denoiser's own first estimate instead of a separate head).
    length: str = "free"
    # Mask-predict only: decode this many candidate lengths per caption in parallel, the likeliest under
    # the first step's PAD probabilities, and keep the one whose words the model is surest of (mean log
    # probability): the "length beam" of Mask-Predict (Ghazvininejad et al. 2019, arXiv 1904.09324).
    length_beam: int = 1
    # Mask-predict only: how many words step k+1 of S re-noises out of N. "linear": N (S-1-k) / S, CMLM's
    # decay (Ghazvininejad et al. 2019); "cosine": N cos(pi/2 (k+1) / S), MaskGIT's (Chang et al. 2022,
    # arXiv 2202.04653), which re-noises more in the early steps and fewer in the last.
    mask_schedule: str = "linear"
    seed: int = 0
    beam_size: int = field(default=1, metadata={"flag": "--beam"})  # autoregressive model: 1 = greedy
    # Matmuls in bfloat16 (torch.autocast) while captioning, for both model kinds: on CPUs with bf16
    # instructions (AVX512-BF16, AMX) and on GPUs they run several times faster than fp32, on an
    # AVX2-only CPU over 100x slower. "auto": bf16 where the device has it natively (diffcap.precision).
    precision: str = "fp32"


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-4
    final_lr: float = 5e-5  # the seed decayed linearly from 1e-4 to 5e-5
    lr_schedule: str = "linear"  # linear, cosine or constant, after warm-up
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.999
    # The pretrained transformer body's learning rate as a multiple of lr (model.backbone only): new
    # layers need a large rate and pretrained ones a small one (discriminative fine-tuning, ULMFiT,
    # Howard & Ruder 2018, arXiv 1801.06146); one rate for both left the MiniLM body unable to learn.
    body_lr_scale: float = 1.0
    mixed_precision: str = "no"  # no, bf16, fp16 (Accelerate); auto: bf16 where native (diffcap.precision)
    eval_every: int = 500
    eval_images: int = 100  # validation subset for CIDEr
    # Model selection by early stopping (Prechelt 1998, "Early stopping - but when?"): after each
    # validation RUN/best/ holds the EMA weights of the one with the highest val/CIDEr so far, a folder
    # CaptionPipeline.from_pretrained reads like the run. A long run on few captions overfits: at 36
    # minutes the Flickr8k proxy's AR captioner ended below every 12-minute run (BENCHMARKS.md).
    keep_best: bool = False
    save_every: int = 1000
    keep_checkpoints: int = 3  # checkpoints/step-N folders kept (the newest; 0 keeps all)
    log_every: int = 50
    seed: int = 0
    progress: bool = True
    time_budget_s: float = 0.0  # stop training after this many seconds (0 = no limit)
    # DataLoader processes that read batches from the feature store while the model steps (0: the
    # training process reads them itself, which keeps up with small pooled features; see BENCHMARKS.md)
    num_workers: int = 0


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """A config from a mapping of sections (a run's config.json), checked like a config file."""
        cfg = cls()
        apply_dict(cfg, data, source)
        try:
            validate(cfg)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        return cfg

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> Config:
        """Defaults, then the YAML/JSON file at ``path`` (if any), then ``key.sub=value`` overrides."""
        cfg = cls()
        if path:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"{path}: config file not found")
            try:
                data = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
            apply_dict(cfg, data, str(path))
        for item in overrides:
            apply_override(cfg, item)
        validate(cfg)
        return cfg


def apply_dict(obj: Any, data: dict[str, Any], source: str, prefix: str = "") -> None:
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown config key '{dotted}'; valid keys here: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' is a section and needs a mapping")
            apply_dict(current, value, source, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, current, dotted, source))


def apply_override(cfg: Config, item: str) -> None:
    """Apply one ``section.key=value`` override; the value is parsed as YAML (numbers, bools, null)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    nested: Any = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    apply_dict(cfg, nested, "command line")


def _coerce(value: Any, current: Any, key: str, source: str) -> Any:
    # bool is a subclass of int: check it first so "steps=true" is rejected.
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        return float(value)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
    return value


CHOICES = {  # (section, key) -> the values allowed
    ("data", "encoder_kind"): ("", "clip-image", "clip-text", "sentence-transformers"),
    ("model", "kind"): ("diffusion", "autoregressive"),
    ("model", "fusion"): ("add", "concat", "cross"),
    ("model", "body"): ("bert", "prenorm"),
    ("model", "image_encoder"): (None, "cnn"),
    ("model", "score_head"): ("separate", "tied"),
    ("diffusion", "schedule"): ("linear", "cosine", "sqrt"),
    ("diffusion", "objective"): ("x0", "eps", "xtk"),
    ("diffusion", "loss"): ("l1", "mse", "vlb"),
    ("diffusion", "timestep_sampler"): ("uniform", "loss_aware", "warped", "grid"),
    ("sampler", "method"): ("ddim", "ddpm", "refine", "mask_predict"),
    ("sampler", "length"): ("free", "expected"),
    ("sampler", "mask_schedule"): ("linear", "cosine"),
    ("sampler", "precision"): ("fp32", "bf16", "auto"),
    ("train", "lr_schedule"): ("linear", "cosine", "constant"),
    ("train", "mixed_precision"): ("no", "bf16", "fp16", "auto"),
}


MAX_MBR = 64  # MBR compares every pair of the k samples in Python: k^2 n-gram overlaps per caption


def _check_choices(obj: Any, section: str) -> None:
    for (name, key), allowed in CHOICES.items():
        value = getattr(obj, key) if name == section else None
        if name == section and value not in allowed:
            raise ConfigError(f"'{section}.{key}' is {value!r}; choose one of {list(allowed)}")


def validate_sampler(sampler: SamplerConfig, num_timesteps: int) -> None:
    """Check sampler settings (also those a caller overrides for one call)."""
    _check_choices(sampler, "sampler")
    if sampler.steps < 1 or sampler.steps > num_timesteps:
        raise ConfigError(f"sampler.steps must be in 1..{num_timesteps}, got {sampler.steps}")
    if not 1 <= sampler.mbr <= MAX_MBR:
        raise ConfigError(f"sampler.mbr must be in 1..{MAX_MBR}, got {sampler.mbr}")
    if sampler.beam_size < 1:
        raise ConfigError(f"sampler.beam_size must be >= 1, got {sampler.beam_size}")
    if sampler.time_offset < 0:
        raise ConfigError(f"sampler.time_offset must be >= 0, got {sampler.time_offset}")
    if sampler.classifier_scale < 0:
        raise ConfigError("sampler.classifier_scale must be >= 0 (0 = no classifier guidance)")
    if sampler.length_beam < 1:
        raise ConfigError(f"sampler.length_beam must be >= 1, got {sampler.length_beam}")
    if sampler.length_beam > 1 and sampler.method != "mask_predict":
        raise ConfigError(f"sampler.length_beam > 1 needs sampler.method=mask_predict, got {sampler.method!r}")
    if sampler.method == "mask_predict" and (sampler.classifier_scale > 0 or sampler.length != "free"):
        raise ConfigError(
            "sampler.method=mask_predict fixes the length at its first step and steers no classifier: it needs "
            f"sampler.length=free and sampler.classifier_scale=0 (got {sampler.length!r}, {sampler.classifier_scale:g})"
        )


def check_guidance(sampler: SamplerConfig, diffusion: DiffusionConfig) -> None:
    """Classifier-free guidance extrapolates away from the model's null-condition prediction, which only
    condition dropout trains: with diffusion.cond_dropout = 0 that prediction is an untrained output."""
    if sampler.guidance_scale != 1.0 and diffusion.cond_dropout == 0:
        raise ConfigError(
            f"sampler.guidance_scale={sampler.guidance_scale:g} needs a model trained with condition dropout, "
            "but diffusion.cond_dropout=0 left its null condition untrained: use guidance_scale 1 "
            "or train with diffusion.cond_dropout > 0 (e.g. 0.1)"
        )


def validate(cfg: Config) -> None:
    for section in ("data", "model", "diffusion", "train"):
        _check_choices(getattr(cfg, section), section)
    validate_sampler(cfg.sampler, cfg.diffusion.num_timesteps)
    if cfg.model.d_model % cfg.model.n_heads:
        raise ConfigError(f"model.d_model={cfg.model.d_model} is not divisible by model.n_heads={cfg.model.n_heads}")
    if cfg.train.num_workers < 0:
        raise ConfigError(f"train.num_workers must be >= 0, got {cfg.train.num_workers}")
    if cfg.diffusion.grid_steps < 1:
        raise ConfigError(f"diffusion.grid_steps must be at least 1, got {cfg.diffusion.grid_steps}")
    if not 0 <= cfg.diffusion.unroll_prob <= 1:
        raise ConfigError(f"diffusion.unroll_prob must be in [0, 1], got {cfg.diffusion.unroll_prob}")
    if cfg.diffusion.unroll_prob > 0 and cfg.diffusion.objective != "x0":
        raise ConfigError(
            "diffusion.unroll_prob trains on the model's own x0 estimates: it needs diffusion.objective=x0"
        )
    if not 0 <= cfg.diffusion.mask_predict_prob <= 1:
        raise ConfigError(f"diffusion.mask_predict_prob must be in [0, 1], got {cfg.diffusion.mask_predict_prob}")
    if cfg.diffusion.mask_predict_prob > 0 and (cfg.diffusion.objective != "x0" or not cfg.model.time_embedding):
        raise ConfigError(
            "diffusion.mask_predict_prob tells each position its own noise level and learns x0 there: it needs "
            "diffusion.objective=x0 and model.time_embedding=true"
        )
    if cfg.train.body_lr_scale <= 0:
        raise ConfigError(f"train.body_lr_scale must be positive, got {cfg.train.body_lr_scale:g}")
    if cfg.train.body_lr_scale != 1.0 and not (cfg.model.backbone and cfg.model.kind == "diffusion"):
        raise ConfigError(
            "train.body_lr_scale sets the learning rate of a pretrained transformer body: it needs "
            "model.kind=diffusion and model.backbone"
        )
    if cfg.model.fusion == "cross" and cfg.model.backbone and cfg.model.kind == "diffusion":
        raise ConfigError(
            "model.fusion=cross builds a body with cross-attention layers (BLIP's text encoder); it cannot start "
            "from model.backbone: use fusion add or concat with a pretrained body"
        )
    prenorm = cfg.model.kind == "diffusion" and cfg.model.body == "prenorm"
    if prenorm and (cfg.model.backbone or cfg.model.fusion == "cross"):
        raise ConfigError(
            "model.body=prenorm is diffcap's own pre-norm body: it has no pretrained model.backbone and no "
            "cross-attention (model.fusion=cross); use model.body=bert for those"
        )
    if cfg.model.init_from and (cfg.model.kind != "diffusion" or cfg.model.body != "prenorm"):
        raise ConfigError(
            "model.init_from starts a diffusion denoiser from an autoregressive run's blocks: it needs "
            "model.kind=diffusion and model.body=prenorm"
        )
    segments = condition_segments(cfg.model)
    if cfg.model.cond_tokens and sum(segments) != cfg.model.cond_tokens:
        raise ConfigError(
            f"model.cond_segments={cfg.model.cond_segments!r} adds up to {sum(segments)} tokens, not "
            f"model.cond_tokens={cfg.model.cond_tokens}"
        )
    if cfg.model.score_interpolation and cfg.diffusion.objective != "x0":
        raise ConfigError("model.score_interpolation predicts x0 from logits: it needs diffusion.objective=x0")
    m = cfg.model
    if m.kind == "autoregressive":
        # The left-to-right baseline has neither the denoiser's embedding-space projections nor its
        # per-source segment embeddings: these settings would be ignored, and the run mislabelled.
        ignored = {
            "model.freeze_projections=true": m.freeze_projections,
            "model.projection_bias=false": not m.projection_bias,
            "model.body=prenorm": m.body != "bert",
            f"model.cond_segments={m.cond_segments!r} (a store joined from several sources)": m.cond_segments,
        }
        for setting, given in ignored.items():
            if given:
                raise ConfigError(
                    f"{setting} is a setting of the diffusion denoiser; model.kind=autoregressive has none"
                )
    if (m.freeze_projections or not m.projection_bias) and m.score_interpolation and m.score_head == "separate":
        raise ConfigError(
            "model.freeze_projections and model.projection_bias=false are about the projection back to the "
            "embedding space; with score interpolation's separate head the output layer is the vocabulary "
            "head: use model.score_head=tied"
        )
    if cfg.diffusion.loss == "vlb" and cfg.diffusion.mask_predict_prob > 0:
        raise ConfigError(
            "diffusion.loss=vlb scores one noise level per caption; mask-predict examples have one per word: "
            "use diffusion.mask_predict_prob=0"
        )
    if cfg.diffusion.timesteps_per_caption < 1:
        raise ConfigError("diffusion.timesteps_per_caption must be >= 1")
    if cfg.train.keep_best and (cfg.train.eval_every <= 0 or cfg.data.val_split == "none"):
        raise ConfigError(
            "train.keep_best picks the best validation: it needs train.eval_every > 0 and a data.val_split "
            f"(got eval_every={cfg.train.eval_every}, val_split={cfg.data.val_split!r})"
        )
    if cfg.data.feature_noise_std < 0:
        raise ConfigError(f"data.feature_noise_std must be >= 0, got {cfg.data.feature_noise_std}")
    if not 0.0 <= cfg.diffusion.cond_dropout < 1.0:
        raise ConfigError("diffusion.cond_dropout must be in [0, 1)")
    if cfg.model.kind == "diffusion":
        check_guidance(cfg.sampler, cfg.diffusion)


def condition_segments(m: ModelConfig) -> list[int]:
    """Each condition source's token count, in order: model.cond_segments parsed, or [model.cond_tokens]."""
    if not m.cond_segments:
        return [m.cond_tokens]
    try:
        counts = [int(part) for part in m.cond_segments.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(
            f"model.cond_segments must be positive token counts separated by commas, got {m.cond_segments!r}"
        )
    return counts


FEATURE_ENCODER_KINDS = ("clip-image", "clip-text", "sentence-transformers")  # kinds `diffcap caption` can rerun


def resolve(cfg: Config, data: FeatureSpec, tokenizer: CaptionTokenizer) -> Config:
    """A new Config: ``cfg`` with what the feature file ``data`` and the tokenizer imply filled in.

    - model.cond_tokens, model.cond_dim: the condition's shape (the feature items', or the CNN grid's);
    - data.encoder, data.encoder_kind: which encoder made the features (unless the config names one),
      so `diffcap caption` can encode new images the same way;
    - model.emb_dim: the width of a pretrained embedding table (model.embedding);
    - model.d_model: the width of a pretrained backbone (model.backbone).
    Raises ConfigError if the features or the tokenizer cannot feed the model ``cfg`` describes.
    """
    out = copy.deepcopy(cfg)
    m = out.model
    m.cond_tokens, m.cond_dim = condition_shape_of(m, data)
    m.cond_segments = "" if m.image_encoder else data.metadata.get("segments", "")
    if not out.data.encoder:
        out.data.encoder = data.metadata.get("encoder", "")
        kind = data.metadata.get("kind", "")
        out.data.encoder_kind = kind if kind in FEATURE_ENCODER_KINDS else ""
    if m.embedding != "learned" or m.backbone:
        from transformers import AutoConfig

        if m.embedding != "learned":
            table = AutoConfig.from_pretrained(m.embedding)
            if table.vocab_size != tokenizer.vocab_size:
                raise ConfigError(
                    f"model.embedding={m.embedding!r} has {table.vocab_size} rows but the tokenizer has "
                    f"{tokenizer.vocab_size} tokens: use the same checkpoint for text.tokenizer"
                )
            m.emb_dim = getattr(table, "embedding_size", None) or table.hidden_size
        if m.backbone:
            m.d_model = AutoConfig.from_pretrained(m.backbone).hidden_size
    validate(out)
    return out


def condition_shape_of(m: ModelConfig, data: FeatureSpec) -> tuple[int, int]:
    """(tokens N, width C) of the condition for the items of the feature file ``data``."""
    shape = data.item_shape
    if m.image_encoder:
        if not data.is_pixels:
            raise ConfigError(
                f"model.image_encoder={m.image_encoder!r} needs raw pixel items; "
                f"{data.path} holds {shape} {data.dtype} features"
            )
        return CNN_TOKENS, CNN_WIDTH
    if data.is_pixels:
        raise ConfigError(f"{data.path} holds raw images {shape}: set model.image_encoder=cnn")
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    raise ConfigError(f"{data.path}: feature items must be vectors (D,) or token grids (N, D), got {shape}")
