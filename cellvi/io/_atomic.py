"""Crash-safe directory writes: build in a temporary sibling, then swap into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..errors import ModelFileError

__all__ = ["atomic_directory"]


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
