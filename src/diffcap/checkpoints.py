"""Training checkpoints of a run directory: the last N kept, each complete before it becomes visible.

    RUN_DIR/checkpoints/step-000120/   a complete run directory of step 120 (see checkpoint.py)
                                       plus trainer_state/ (optimizer, LR schedule, RNG, EMA count)
    RUN_DIR/checkpoints/step-000160/   the newest
    RUN_DIR/checkpoint.json            which checkpoint the top-level files were published from

A checkpoint is written into a hidden temporary folder, synced, and renamed to ``step-NNNNNN``, so a
folder with that name is always complete: a process killed at any moment leaves at worst a hidden
``.step-*.tmp`` folder, which the next run deletes. Then the files that CaptionPipeline reads
(config.json, body_config.json, tokenizer/, model.safetensors, ema.safetensors) are published to
the top of the run directory, each by an atomic rename; a kill in the middle of publishing leaves
one file a checkpoint behind, and the next ``diffcap train`` re-publishes from the newest checkpoint.
"""
from __future__ import annotations

import filecmp
import re
import shutil
from pathlib import Path

from .io import atomic_directory, link_or_copy, remove_partial, write_json

CHECKPOINTS = "checkpoints"
PUBLISHED_FILES = ("config.json", "body_config.json", "model.safetensors", "ema.safetensors")
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (step, folder), oldest first; temporary folders are never listed."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def remove_partial_checkpoints(run_dir: str | Path) -> list[Path]:
    """Delete what a killed writer left behind (hidden temporary files and folders)."""
    run_dir = Path(run_dir)
    removed = remove_partial(run_dir / CHECKPOINTS) if (run_dir / CHECKPOINTS).is_dir() else []
    return removed + (remove_partial(run_dir) if run_dir.is_dir() else [])


def write_checkpoint(run_dir: str | Path, step: int, write) -> Path:
    """Call ``write(folder)`` on a temporary folder and make it checkpoint ``step`` atomically."""
    final = checkpoint_path(run_dir, step)
    with atomic_directory(final) as tmp:
        write(tmp)
    return final


def prune(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (keep <= 0 keeps them all)."""
    if keep <= 0:
        return []
    old = [p for _, p in list_checkpoints(run_dir)[:-keep]]
    for p in old:
        # Rename first, so a kill during the (non-atomic) delete leaves a hidden folder, not a
        # half-deleted checkpoint that looks complete.
        doomed = p.with_name(f".{p.name}.deleted.tmp")
        p.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    return old


def publish(run_dir: str | Path, checkpoint: Path) -> None:
    """Make the top-level files of ``run_dir`` those of ``checkpoint`` (hard links where possible)."""
    run_dir = Path(run_dir)
    tokenizer = run_dir / "tokenizer"
    if not tokenizer.is_dir() or _differs(tokenizer, checkpoint / "tokenizer"):
        with atomic_directory(tokenizer) as tmp:
            shutil.copytree(checkpoint / "tokenizer", tmp, dirs_exist_ok=True)
    for name in PUBLISHED_FILES:
        if (checkpoint / name).exists():
            link_or_copy(checkpoint / name, run_dir / name)
    write_json(run_dir / "checkpoint.json", {"checkpoint": str(checkpoint.relative_to(run_dir)),
                                             "step": int(_NAME.match(checkpoint.name).group(1))})


def _differs(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    return bool(cmp.left_only or cmp.right_only or filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)[1:] != ([], []))
