"""The cellvi model file: ``{prefix}model.pt`` with tensors and plain data, no pickle."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import CellviWarning, ModelFileError
from ._atomic import atomic_directory, interrupted_swaps

__all__ = ["FORMAT_VERSION", "write_model_dir", "read_model_file", "stamp_h5ad", "h5ad_stamp"]

FORMAT_VERSION = "1.0"


def write_model_dir(
    dir_path,
    *,
    state_dict: dict[str, torch.Tensor],
    var_names: list[str] | None,
    attr_dict: dict,
    prefix: str | None = None,
    overwrite: bool = False,
    extra_files: dict[str, Callable[[Path], None]] | None = None,
    save_kwargs: dict | None = None,
    optimizer_state: dict | None = None,
    save_id: str | None = None,
) -> Path:
    """Write a model directory atomically.

    Parameters
    ----------
    dir_path
        Target directory.
    state_dict
        Module weights (moved to CPU).
    var_names
        Feature names.
    attr_dict
        Plain (JSON-like) model attributes, e.g. from :func:`~cellvi.io.to_plain`.
    prefix
        Prepended to file names.
    overwrite
        Write into an existing directory: this prefix's ``model.pt`` and ``adata.h5ad`` are
        replaced (or removed when not written again); other files (e.g. another prefix's
        model) stay.
    extra_files
        ``{file name: writer(path)}`` for further files (e.g. ``adata.h5ad``).
    save_kwargs
        Passed to ``torch.save``.
    optimizer_state
        Stored as ``optimizer_state`` when given (tensors and plain values, like the rest).
    save_id
        Stored as ``save_id``: a token the save's other files carry too, so that a load can
        tell files of one save from a mix (see :func:`~cellvi.io.stamp_h5ad`).
    """
    from .. import __version__

    content = {
        "model_state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "var_names": [str(v) for v in (var_names or [])],
        "attr_dict": attr_dict,
        "format_version": FORMAT_VERSION,
        "cellvi_version": __version__,
    }
    if optimizer_state is not None:
        content["optimizer_state"] = optimizer_state
    if save_id is not None:
        content["save_id"] = str(save_id)
    owned = {f"{prefix or ''}{name}" for name in ("model.pt", "adata.h5ad")}
    with atomic_directory(dir_path, overwrite, owned | set(extra_files or ())) as tmp:
        torch.save(content, tmp / f"{prefix or ''}model.pt", **(save_kwargs or {}))
        for name, writer in (extra_files or {}).items():
            writer(tmp / name)
    return Path(dir_path)


def read_model_file(
    dir_path, prefix: str | None = None, map_location="cpu", allow_pickle: bool = False
) -> dict:
    """Read ``{prefix}model.pt`` without executing code.

    Raises
    ------
    ModelFileError
        Missing, corrupt, pickled (unless ``allow_pickle``) or of an unknown major version.
    """
    path = Path(dir_path) / f"{prefix or ''}model.pt"
    if not path.is_file():
        contents = (
            sorted(p.name for p in Path(dir_path).iterdir()) if Path(dir_path).is_dir() else None
        )
        where = (
            f"the directory contains {contents}" if contents is not None else "no such directory"
        )
        raise ModelFileError(f"No model file at {path} ({where}). {_missing_advice(dir_path)}")
    if path.stat().st_size == 0:
        raise ModelFileError(
            f"{path} is empty (0 bytes): the save that wrote it did not finish, or the file was "
            "truncated by a copy."
        )
    if allow_pickle:
        warnings.warn(
            f"Reading {path} with allow_pickle=True: a pickled file can run arbitrary code. Do "
            "this only for files you trust.",
            CellviWarning,
            stacklevel=2,
        )
    try:
        content = torch.load(path, map_location=map_location, weights_only=not allow_pickle)
    except pickle.UnpicklingError as err:
        raise ModelFileError(
            f"{path} contains Python objects that cellvi refuses to execute: it is not a cellvi "
            "model file, or it may be malicious. Only if you trust its source, pass "
            f"allow_pickle=True. ({str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
        # (a file that is not a zip archive reaches torch's legacy reader, which can fail with
        # a bare KeyError on its first bytes)
        raise ModelFileError(
            f"{path} is not a readable model file (corrupt or truncated): {err!r}"
        ) from err
    if not isinstance(content, dict) or "model_state_dict" not in content:
        raise ModelFileError(f"{path} is not a cellvi model file (no model_state_dict).")
    version = content.get("format_version")
    major = _major(version)
    if major != _major(FORMAT_VERSION):
        if major is not None and major > _major(FORMAT_VERSION):
            advice = "it was written by a newer cellvi: upgrade (pip install -U cellvi)"
        elif version is None:
            advice = "it has no format version, so it was not written by cellvi's save"
        else:  # an older major version, or a value that is not a version
            advice = "it is not a file this cellvi writes (an old format, or edited by hand)"
        raise ModelFileError(
            f"{path} has format version {version!r}; this cellvi reads {FORMAT_VERSION}: {advice}."
        )
    return content


_SAVE_ID_ATTR = "cellvi_save_id"


def stamp_h5ad(path, save_id: str) -> None:
    """Mark an ``.h5ad`` file as written by the save ``save_id`` (an attribute of its root
    group, which anndata does not read)."""
    import h5py

    with h5py.File(path, "a") as fh:
        fh.attrs[_SAVE_ID_ATTR] = save_id


def h5ad_stamp(path) -> str | None:
    """The save token of an ``.h5ad`` file (None: unstamped, or not readable as HDF5)."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            value = fh.attrs.get(_SAVE_ID_ATTR)
    except OSError:
        return None
    return value.decode() if isinstance(value, bytes) else (None if value is None else str(value))


def _missing_advice(dir_path) -> str:
    """What to do about a missing model file: a save killed between two renames, a training
    checkpoint or run directory given instead of a model directory, or another prefix."""
    left = interrupted_swaps(dir_path)
    if left and not Path(dir_path).exists():
        return (
            f"A save into it was interrupted and left {[str(p) for p in left]}: each is a "
            "complete model directory (the previous save, .old-, or the new one, .tmp-); rename "
            "the one you want to that name."
        )
    folder = Path(dir_path)
    if folder.suffix == ".ckpt" or (folder / "checkpoints" / "last.ckpt").exists():
        return (
            "This is a training checkpoint or run directory, not a saved model: continue it "
            "with model.train(ckpt_path='<run_dir>/checkpoints/last.ckpt'), or load a "
            "directory written by model.save."
        )
    return "Is prefix= right?"


def _major(version) -> int | None:
    """The major number of a ``"major.minor"`` format version, None when it is not one."""
    try:
        return int(str(version).split(".")[0]) if version is not None else None
    except ValueError:
        return None
