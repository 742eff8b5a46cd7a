"""Minibatch iteration over a fitted model's data for inference (no autograd, eval mode)."""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Iterator

import numpy as np
import torch

from .._constants import REGISTRY_KEYS
from .._settings import settings
from ..data._backed import close_disk_sources
from ..dataloaders._sparse import cached_blocks
from ..errors import CellviWarning, check_count

__all__ = [
    "inference_batches",
    "inference_batch_size",
    "resolve_indices",
    "eval_mode",
    "private_rng",
]

# Inference keeps no activations for gradients, so its minibatches are sized by memory: the
# largest per-minibatch tensor holds about 2^23 float32 values (32 MB; 4096 cells of 2,000
# genes), with at most 4096 and at least the training batch size of cells. Large minibatches
# amortise the per-call costs: 4096 cells run latent and expression outputs 10-20% faster
# than 1024.
INFERENCE_ELEMENTS = 1 << 23
INFERENCE_MAX_BATCH = 4096


def inference_batch_size(elements_per_cell: int) -> int:
    """Default inference minibatch size when a cell's largest tensor has this many values."""
    fit = INFERENCE_ELEMENTS // max(1, int(elements_per_cell))
    return max(settings.batch_size, min(INFERENCE_MAX_BATCH, fit))


def resolve_indices(indices, n_obs: int, name: str = "indices", also: str = "") -> np.ndarray:
    """Positions of the requested cells (all cells when None; boolean masks accepted).

    ``name`` is the argument named in errors; ``also`` names further accepted forms.

    Raises
    ------
    TypeError
        For anything but a boolean mask or integer positions (obs names, fractions), naming
        ``name``.
    """
    if indices is None:
        return np.arange(n_obs, dtype=np.int64)
    idx = np.asarray(indices)
    if idx.ndim == 0 and idx.dtype == bool:  # indices=True: np.asarray gives a 0-d array
        raise TypeError(
            f"{name}={indices!r}: give a boolean mask with one value per cell or integer "
            f"positions{also}, not a single True/False."
        )
    if idx.dtype == bool:
        if idx.shape[0] != n_obs:
            raise ValueError(
                f"{name} is a boolean mask of length {idx.shape[0]}; it needs one value per "
                f"cell ({n_obs})."
            )
        return np.flatnonzero(idx).astype(np.int64)
    idx = idx.ravel()
    if idx.size and not _integral(idx):
        shown = ", ".join(map(repr, idx[:3].tolist())) + (", ..." if idx.size > 3 else "")
        hint = (
            " For obs names use np.flatnonzero(adata.obs_names.isin(names))."
            if idx.dtype.kind in "OUS"
            else ""
        )
        raise TypeError(
            f"{name} got [{shown}]; it takes a boolean mask or integer positions{also}.{hint}"
        )
    idx = idx.astype(np.int64)
    if idx.size and (idx.min() < -n_obs or idx.max() >= n_obs):
        raise IndexError(f"{name} must lie in [0, {n_obs}); got {idx.min()}..{idx.max()}.")
    return idx % n_obs


def _integral(idx: np.ndarray) -> bool:
    """Whether every value is an integer (integer dtypes, whole floats, Python ints)."""
    if idx.dtype.kind in "iu":
        return True
    if idx.dtype.kind == "f":
        return bool(np.all(np.isfinite(idx) & (idx == np.round(idx))))
    if idx.dtype.kind == "O":
        return all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in idx)
    return False


_HALF = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Run with the module in eval mode and autograd off; restore its mode afterwards.

    A module wholly in half precision (trained with ``precision="bf16-true"`` or
    ``"16-true"``) runs in float32 meanwhile: NumPy has no bfloat16, several samplers have no
    half kernels, and the round trip back to half precision is exact."""
    was_training = module.training
    floats = {t.dtype for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()}
    half = floats.pop() if len(floats) == 1 and floats <= set(_HALF) else None
    module.eval()
    if half is not None:
        module.float()
    try:
        with torch.inference_mode(), cached_blocks():
            yield
    finally:
        if half is not None:
            module.to(half)
        module.train(was_training)


def private_rng(device: torch.device):
    """Random streams of the CPU and of ``device`` (if a GPU) restored on exit, so that a
    seeded output leaves the caller's streams where they were."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def inference_batches(
    model,
    adata=None,
    indices=None,
    batch_size: int | None = None,
    sparse_x: bool = False,
    elements_per_cell: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield minibatches (on the model's device) of the cells ``indices`` of ``adata``.

    The data are gathered once into a :class:`~cellvi.dataloaders.TensorStore`; each
    minibatch is one vectorised gather, so memory grows with ``batch_size`` only. Without
    ``batch_size``, the size comes from :func:`inference_batch_size` for the caller's
    largest per-cell tensor: ``elements_per_cell`` values (e.g. genes x samples when decoding
    several posterior samples), at least the number of genes.

    With ``sparse_x=True`` sparse counts stay sparse (:class:`~cellvi.dataloaders.SparseRows`)
    when the module accepts them (``module.accepts_sparse_x``): for analyses that only encode
    and decode, which then never build a dense ``(cells, genes)`` block of the input.
    """
    if not getattr(model, "is_trained", True):
        if getattr(model, "query_freezing_", None) is not None:  # from load_query_data
            what = (
                "on its query yet: its outputs use the reference's weights, with the query's "
                "new categories (e.g. batches) at their initial values"
            )
        else:
            what = "yet: its outputs come from randomly initialised weights"
        warnings.warn(
            f"This {type(model).__name__} has not been trained {what}. Call model.train() first.",
            CellviWarning,
            stacklevel=4,
        )
    if batch_size is not None:
        batch_size = check_count(batch_size, "batch_size")
    manager = model._manager_for(adata)
    store = model._tensor_store(manager)
    idx = resolve_indices(indices, manager.summary_stats["n_cells"])
    n_vars = manager.summary_stats["n_vars"]
    size = batch_size or inference_batch_size(max(n_vars, elements_per_cell or 0))
    device = model.device
    accepts = sparse_x and getattr(model.module, "accepts_sparse_x", False)
    sparse_keys = (REGISTRY_KEYS.X_KEY,) if accepts else ()
    dtype = _module_float_dtype(model.module)
    try:
        for start in range(0, len(idx), size):
            chunk = torch.as_tensor(idx[start : start + size])
            batch = store.gather(chunk, sparse_keys)
            yield {k: _to_module(v, device, dtype) for k, v in batch.items()}
    finally:  # counts read from disk: their files are not held open after the call
        close_disk_sources(manager.adata)


def _module_float_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of the module's floating-point weights (float32 unless trained otherwise,
    e.g. with ``precision="64-true"``)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def _to_module(value, device: torch.device, dtype: torch.dtype):
    """A minibatch entry on the module's device, floating-point dense tensors in its dtype
    (as Lightning's precision plugin casts them in training; sparse rows cast their values
    at the product)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(device, dtype, non_blocking=True)
    return value.to(device, non_blocking=True)
