"""Crash-safe writes of files and directories: build a temporary sibling, then swap it in."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import ModelFileError

__all__ = ["atomic_directory", "atomic_file"]


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_directory(dir_path: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``dir_path`` in one rename.

    An exception (or a kill) at any point leaves either the previous complete directory or
    the new complete one, never a half-written one; the temporary directory is removed.
    """
    target = Path(dir_path)
    if target.exists() and not overwrite:
        raise ModelFileError(f"{target} exists; pass overwrite=True or choose another dir_path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffix) to write to; on success it
    replaces ``path`` in one rename, so readers never see a half-written file.

    An exception (or a kill) leaves the previous file, if any, untouched; the temporary
    file is removed on an exception.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.stem}.tmp-{uuid.uuid4().hex[:8]}{target.suffix}"
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
