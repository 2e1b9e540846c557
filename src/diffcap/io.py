"""Crash-safe file writing: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import json
import os
import shutil
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


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: PathLike) -> None:
    """fsync every file and folder under ``root`` (and ``root``), so a rename of ``root`` publishes
    flushed data: some writers (e.g. a tokenizer's save_pretrained) do not sync their files."""
    root = Path(root)
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(folder) / name)
        if os.name == "posix":
            _fsync_path(Path(folder))


@contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; once the block succeeds, sync it and rename
    it to ``path``, so ``path`` never names a half-written folder (a killed writer leaves only a
    hidden ``.NAME.*.tmp`` folder, which :func:`remove_partial` cleans up).

    An existing ``path`` is replaced: it is first renamed aside, so for a moment neither exists but
    ``path`` never holds a mix of old and new files.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old.tmp")
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.name == "posix":
        _fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_partial(folder: PathLike) -> list[Path]:
    """Delete the temporary files and folders that a killed atomic writer left in ``folder``."""
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def link_or_copy(src: PathLike, dst: PathLike) -> None:
    """Atomically make ``dst`` a copy of the file ``src``: a hard link where the file system allows
    (no extra space; safe because our writers never modify a file in place), else a copy."""
    with atomic_output(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
