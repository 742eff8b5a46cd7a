"""Crash-safe writes of files and directories: build a temporary sibling, then swap it in."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import sys
import uuid
from collections.abc import Collection, Iterator
from pathlib import Path

from ..errors import ModelFileError

__all__ = ["atomic_directory", "atomic_file", "interrupted_swaps"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV}


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_directory(
    dir_path: str | os.PathLike, overwrite: bool, owned: Collection[str] = ()
) -> Iterator[Path]:
    """Yield a temporary directory whose files then go to ``dir_path``.

    ``owned`` names the files this kind of write produces (e.g. ``model.pt`` and
    ``adata.h5ad``): those of an earlier write that this one does not produce are stale and
    removed. A new directory, or one holding only such files, is put in place in one step (a
    rename, or on Linux an atomic exchange with the previous directory): an exception (or a
    kill) at any point leaves either the previous complete directory or the new complete
    one, never a half-written one. (Where no atomic exchange exists, the previous directory
    is renamed aside first; a kill between the two renames leaves both beside the target,
    see :func:`interrupted_swaps`.) A directory that also holds other files
    (another ``prefix``'s model, the user's own files), or that is the working directory or
    above it, keeps them: each new file replaces its namesake in one rename. The temporary
    directory is removed either way.
    """
    # absolute without resolving links: "." has a name and a parent to write next to
    target = Path(os.path.abspath(dir_path))
    if target.exists() and not overwrite:
        raise ModelFileError(f"{target} exists; pass overwrite=True or choose another dir_path.")
    if target.exists() and not target.is_dir():
        raise ModelFileError(
            f"{target} is a file, not a model directory; overwrite=True replaces a directory "
            "only. Choose another dir_path."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    old = None
    try:
        yield tmp
        _fsync_tree(tmp)
        written = {p.name for p in tmp.iterdir()}
        ours = written | set(owned)
        if target.exists() and (
            _holds_cwd(target) or any(p.name not in ours for p in target.iterdir())
        ):
            for name in sorted(written):  # the other files stay
                _replace(tmp / name, target / name)
            for name in ours - written:  # a stale file of an earlier write (its adata.h5ad)
                if (target / name).is_file():
                    (target / name).unlink()
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if target.exists() and _exchange(tmp, target):
            # one atomic step: the new directory is in place, the previous one at ``tmp``
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if target.exists():  # no atomic exchange here: two renames, a moment apart
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        # failed (or interrupted) between the two renames: the previous directory goes back
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@functools.cache
def _renameat2():
    """The C library's ``renameat2`` (Linux), None where there is none (e.g. glibc < 2.28)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2`` with ``RENAME_EXCHANGE``);
    False where the system or the file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(b))


def interrupted_swaps(target: str | os.PathLike) -> list[Path]:
    """The previous (``.old-``) and new (``.tmp-``) copies of ``target`` that a save killed
    between its two renames left beside it (where no atomic exchange was available)."""
    target = Path(os.path.abspath(target))
    if not target.parent.is_dir():
        return []
    found = [
        *target.parent.glob(f".{target.name}.old-*"),
        *target.parent.glob(f".{target.name}.tmp-*"),
    ]
    return sorted(p for p in found if p.is_dir())


def _holds_cwd(folder: Path) -> bool:
    """Whether ``folder`` is the working directory or one above it (never swapped away)."""
    cwd = Path(os.path.abspath(os.getcwd()))
    return folder == cwd or folder in cwd.parents


def _replace(source: Path, target: Path) -> None:
    """Move ``source`` over ``target`` (a file in one rename; a folder replaces a folder)."""
    if source.is_dir() and target.is_dir():
        shutil.rmtree(target)
    os.replace(source, target)


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
