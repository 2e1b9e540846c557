"""Crash-safe file writing: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import hashlib
import json
import logging
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
log = logging.getLogger(__name__)


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
        _fsync_path(target.parent)


def file_sha256(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: PathLike, obj: Any) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def read_jsonl_log(path: PathLike) -> list[dict]:
    """The records of a JSONL log that a process appends to, one JSON object a line.

    A process killed mid-write (kill -9, power loss) leaves a torn last line: it is dropped with a
    warning, since every line before it is complete. A bad line anywhere else is corruption and raises.
    """
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not a JSON record ({err})") from None
            log.warning("%s: dropped its last line, cut short by an interrupted write: %.80r", path, line)
    return rows


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

    An existing ``path`` is replaced: it is first renamed aside to ``.NAME.*.old.tmp``, so for a
    moment neither exists but ``path`` never holds a mix of old and new files. If the new folder
    cannot be renamed in, the old one is renamed back; if the process is killed in that moment,
    :func:`remove_partial` renames it back.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    old = None
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex}{OLD_SUFFIX}")
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old, target)  # put the old folder back: never leave ``path`` missing
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.name == "posix":
        _fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


OLD_SUFFIX = ".old.tmp"  # atomic_directory's name for the folder it is replacing


def _renamed_aside(p: Path) -> Path | None:
    """The folder that ``.NAME.<hex>.old.tmp`` was renamed aside from (``NAME``), else None."""
    if not p.name.endswith(OLD_SUFFIX) or not p.name.startswith("."):
        return None
    name, _, _ = p.name[1 : -len(OLD_SUFFIX)].rpartition(".")
    return p.with_name(name) if name else None


def remove_partial(folder: PathLike) -> list[Path]:
    """Delete the temporary files and folders that a killed atomic writer left in ``folder``.

    A folder that :func:`atomic_directory` renamed aside (``.NAME.*.old.tmp``) is the only copy when
    the writer was killed before renaming the new ``NAME`` in: then it is renamed back to ``NAME``
    (and not counted as removed) instead of being deleted."""
    removed = []
    for p in sorted(Path(folder).glob(".*.tmp")):
        original = _renamed_aside(p)
        if original is not None and p.is_dir() and not original.exists():
            os.replace(p, original)
            continue
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
