"""Crash-safe file writing: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

PathLike = str | os.PathLike


@contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path``; move it onto ``path`` if the block succeeds.

    The temporary file sits in the same directory so that ``os.replace`` is an
    atomic rename rather than a cross-device copy, and it is fsynced before the
    rename so a crash cannot leave ``path`` naming unflushed data. Readers thus
    see either the old file or the complete new one, never a partial write.
    The path is not created in advance, so the writer's file gets the usual
    umask-derived permissions.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":
        # The rename itself lives in the directory entry; sync it too.
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json(path: PathLike, obj: Any) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def save_tensors(path: PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_output(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)
