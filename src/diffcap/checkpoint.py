"""The run directory: everything needed to rebuild a trained captioner, and to resume its training.

    RUN_DIR/config.json          the resolved Config
    RUN_DIR/body_config.json     the transformer body's architecture (so a pretrained backbone rebuilds offline)
    RUN_DIR/tokenizer/           the tokenizer files
    RUN_DIR/model.safetensors    raw weights
    RUN_DIR/ema.safetensors      EMA weights (what sampling uses by default)
    RUN_DIR/checkpoints/step-N/  the last few checkpoints: all of the above plus trainer_state/
                                 (optimizer, LR schedule, step, RNG and EMA states), for resume;
                                 the files above are published from the newest (see checkpoints.py)

Weights are safetensors and everything else is JSON: nothing is pickled, so loading runs no code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import Config, ConfigError
from .io import save_tensors, write_json
from .models.factory import build_model
from .text.tokenizer import CaptionTokenizer


class RunDirError(FileNotFoundError):
    pass


def save_model_files(run_dir: str | Path, cfg: Config, model: torch.nn.Module, tokenizer: CaptionTokenizer,
                     ema_state: dict[str, torch.Tensor] | None = None) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", cfg.to_dict())
    write_json(run_dir / "body_config.json", model.body_config())
    tokenizer.save(run_dir / "tokenizer")
    save_tensors(run_dir / "model.safetensors", model.state_dict(), {"format": "pt"})
    if ema_state is not None:
        save_tensors(run_dir / "ema.safetensors", ema_state, {"format": "pt"})


def _require(path: Path) -> Path:
    if not path.exists():
        raise RunDirError(f"{path}: missing from the run directory (is {path.parent} a diffcap run?)")
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(_require(path)))
    except SafetensorError as exc:
        raise RunDirError(f"{path}: not a readable safetensors file ({exc})") from exc


def check_shapes(path: Path, saved: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> None:
    """Saved weights must fit the model the config builds: say which file and tensors do not,
    instead of torch's size-mismatch error."""
    wrong = [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in current.items()
             if k in saved and saved[k].shape != v.shape]
    missing = sorted(set(current) ^ set(saved))
    if wrong or missing:
        raise ConfigError(f"{path}: does not fit the model built from the current config and data "
                          f"(saved vs now: {'; '.join(wrong[:3])}{'; keys differ: ' + str(missing[:5]) if missing else ''}); "
                          "was it written by another version of diffcap, or the vocabulary built from other captions?")


def load_run(run_dir: str | Path, *, ema: bool = True) -> tuple[Config, torch.nn.Module, CaptionTokenizer]:
    """Rebuild config, model (EMA weights if present and ``ema``) and tokenizer from a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: run directory not found")
    cfg = Config.from_dict(json.loads(_require(run_dir / "config.json").read_text()), str(run_dir / "config.json"))
    body_config = json.loads(_require(run_dir / "body_config.json").read_text())
    tokenizer = CaptionTokenizer.load(_require(run_dir / "tokenizer"))
    model = build_model(cfg, tokenizer, pretrained=False, body_config=body_config)
    weights = run_dir / ("ema.safetensors" if ema and (run_dir / "ema.safetensors").exists() else "model.safetensors")
    state = load_weights(weights)
    check_shapes(weights, state, model.state_dict())
    model.load_state_dict(state)
    model.eval()
    return cfg, model, tokenizer
