"""Registered arrays gathered once into contiguous tensors; a minibatch is one gather."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from scipy import sparse

from .._constants import REGISTRY_KEYS

__all__ = ["TensorStore", "CSRTensor"]

_INT_KEYS = {
    REGISTRY_KEYS.BATCH_KEY,
    REGISTRY_KEYS.LABELS_KEY,
    REGISTRY_KEYS.CAT_COVS_KEY,
    REGISTRY_KEYS.INDICES_KEY,
}


class CSRTensor:
    """A CSR matrix held as torch tensors; ``rows(idx)`` densifies rows in one gather.

    ``indptr`` is int64, so matrices with more than 2^31 stored values are safe.
    """

    def __init__(self, matrix: sparse.spmatrix):
        csr = matrix.tocsr() if matrix.format != "csr" else matrix
        if not csr.has_sorted_indices:
            csr = csr.sorted_indices()
        self.shape = csr.shape
        self.indptr = torch.from_numpy(np.asarray(csr.indptr, dtype=np.int64))
        self.indices = torch.from_numpy(np.asarray(csr.indices, dtype=np.int64))
        self.data = torch.from_numpy(np.asarray(csr.data, dtype=np.float32))

    def to(self, device) -> CSRTensor:
        out = object.__new__(CSRTensor)
        out.shape = self.shape
        out.indptr, out.indices, out.data = (
            t.to(device) for t in (self.indptr, self.indices, self.data)
        )
        return out

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dense float32 rows ``idx``, shape ``(len(idx), n_cols)``."""
        starts = self.indptr[idx]
        lengths = self.indptr[idx + 1] - starts
        n = len(idx)
        out = torch.zeros(n, self.shape[1], dtype=torch.float32, device=self.data.device)
        total = int(lengths.sum())
        if total == 0:
            return out
        row_of = torch.repeat_interleave(torch.arange(n, device=idx.device), lengths)
        # position of each stored value: its row's start plus its offset within the row
        offsets = torch.arange(total, device=idx.device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )
        pos = torch.repeat_interleave(starts, lengths) + offsets
        out[row_of, self.indices[pos]] = self.data[pos]
        return out


def _to_tensor(key: str, value) -> torch.Tensor | CSRTensor:
    if sparse.issparse(value):
        return CSRTensor(value)
    if isinstance(value, pd.DataFrame):
        value = value.to_numpy()
    array = np.asarray(value)
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    dtype = np.int64 if key in _INT_KEYS else np.float32
    return torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))


class TensorStore:
    """All registered arrays of a data set as torch tensors, ready for fast minibatches.

    Parameters
    ----------
    arrays
        ``{registry_key: array}`` (numpy, scipy sparse or DataFrame).

    Examples
    --------
    >>> import numpy as np, torch
    >>> store = TensorStore({"X": np.eye(3), "batch": np.array([0, 1, 1])})
    >>> batch = store.gather(torch.tensor([2, 0]))
    >>> batch["X"].tolist(), batch["batch"].ravel().tolist(), batch["ind_x"].ravel().tolist()
    ([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], [1, 0], [2, 0])
    """

    def __init__(self, arrays: Mapping[str, object]):
        self.tensors = {k: _to_tensor(k, v) for k, v in arrays.items()}
        sizes = {k: (t.shape[0]) for k, t in self.tensors.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Registered arrays have different numbers of cells: {sizes}")
        self.n_obs = next(iter(sizes.values())) if sizes else 0

    @classmethod
    def from_manager(cls, manager, keys=None) -> TensorStore:
        """Gather the registered arrays of a manager (all keys holding data by default)."""
        keys = list(manager.data_registry) if keys is None else list(keys)
        return cls({k: manager.get_from_registry(k) for k in keys})

    def to(self, device) -> TensorStore:
        out = object.__new__(TensorStore)
        out.tensors = {k: t.to(device) for k, t in self.tensors.items()}
        out.n_obs = self.n_obs
        return out

    def gather(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Minibatch of cells ``idx``: one vectorised index operation per key, plus ``ind_x``."""
        idx = torch.as_tensor(idx, dtype=torch.int64)
        out = {}
        for key, tensor in self.tensors.items():
            out[key] = tensor.rows(idx) if isinstance(tensor, CSRTensor) else tensor[idx]
        out[REGISTRY_KEYS.INDICES_KEY] = idx.reshape(-1, 1)
        return out
