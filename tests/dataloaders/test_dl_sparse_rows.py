"""Sparse minibatch rows: the same numbers as the dense path, without densifying."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.nn import functional as F

from cellvi.dataloaders import SparseRows, TensorStore


def _counts(n=40, g=25, seed=0):
    rng = np.random.default_rng(seed)
    dense = ((rng.random((n, g)) < 0.3) * rng.integers(1, 30, (n, g))).astype(np.float32)
    dense[[0, 7, n - 1]] = 0  # empty rows, first and last included
    return dense


def _rows(dense: np.ndarray) -> SparseRows:
    csr = sp.csr_matrix(dense)
    return SparseRows(
        torch.from_numpy(csr.data),
        torch.from_numpy(csr.indices),
        torch.from_numpy(csr.indptr),
        dense.shape[1],
    )


def test_dense_view_sums_and_values():
    dense = _counts()
    rows = _rows(dense)
    assert rows.shape == dense.shape
    np.testing.assert_array_equal(rows.to_dense().numpy(), dense)
    np.testing.assert_array_equal(rows.row_sums().numpy().ravel(), dense.sum(1))
    logged = rows.map_values(torch.log1p)
    np.testing.assert_allclose(logged.to_dense().numpy(), np.log1p(dense), rtol=1e-6)


# 8: one block; 64: exactly one CPU block; 130: two full blocks and a partial one
@pytest.mark.parametrize("n_out", [8, 64, 130])
def test_linear_equals_dense_linear_with_a_dense_tail(n_out):
    torch.manual_seed(0)
    dense = _counts()
    rows = _rows(dense).map_values(torch.log1p)
    x = torch.log1p(torch.from_numpy(dense))
    tail = torch.randn(dense.shape[0], 3)
    weight, bias = torch.randn(n_out, dense.shape[1] + 3), torch.randn(n_out)
    expected = F.linear(torch.cat([x, tail], dim=1), weight, bias)
    torch.testing.assert_close(rows.linear(weight, bias, tail), expected, rtol=1e-5, atol=1e-5)
    no_tail = F.linear(x, weight[:, : dense.shape[1]])
    got = rows.linear(weight[:, : dense.shape[1]])
    assert got.shape == (dense.shape[0], n_out) and got.is_contiguous()
    torch.testing.assert_close(got, no_tail, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[[0, 7, dense.shape[0] - 1]], torch.zeros(3, n_out))  # empty rows
    with pytest.raises(ValueError, match="expected 28"):
        rows.linear(torch.randn(n_out, 30), tail=tail)


def test_zero_rows_and_mismatched_buffers():
    empty = SparseRows(
        torch.zeros(0), torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), 5
    )
    assert empty.shape == (0, 5)
    assert empty.linear(torch.randn(4, 5)).shape == (0, 4)
    assert empty.row_sums().shape == (0, 1)
    rows = _rows(_counts())
    assert rows.linear(torch.randn(0, rows.shape[1])).shape == (rows.shape[0], 0)
    with pytest.raises(ValueError, match="one shape"):
        SparseRows(torch.zeros(3), torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]), 5)


@pytest.mark.parametrize(
    "idx",
    [[5, 6, 7, 8, 9], [0], [39], [3, 3, 0, 39, 20], list(range(40)), [12, 11, 10]],
    ids=["range", "first", "last", "gather-with-repeat", "all", "reversed"],
)
@pytest.mark.parametrize("device_path", [False, True], ids=["scipy", "torch"])
def test_csr_sparse_rows_equal_dense_rows(idx, device_path):
    dense = _counts()
    store = TensorStore({"X": sp.csr_matrix(dense), "batch": np.zeros(40, dtype=np.int64)})
    csr = store.tensors["X"]
    tensor_idx = torch.tensor(idx)
    if device_path:  # the torch-only gather, as used on a GPU
        pos, lengths = csr._positions(tensor_idx)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        rows = SparseRows(csr.data[pos], csr.indices[pos], offsets, csr.shape[1])
    else:
        rows = csr.sparse_rows(tensor_idx)
    np.testing.assert_array_equal(rows.to_dense().numpy(), dense[idx])
    batch = store.gather(tensor_idx, sparse_keys=("X",))
    assert isinstance(batch["X"], SparseRows)
    assert isinstance(batch["batch"], torch.Tensor)
    assert isinstance(store.gather(tensor_idx)["X"], torch.Tensor)  # dense unless asked


def test_csr_sparse_rows_reject_rows_out_of_range():
    store = TensorStore({"X": sp.csr_matrix(_counts())})
    for bad in ([38, 39, 40], [2, 45]):
        with pytest.raises(IndexError, match=r"\[0, 40\)"):
            store.tensors["X"].sparse_rows(torch.tensor(bad))


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.float32, np.float64, np.int64])
@pytest.mark.parametrize("idx", [[5, 6, 7], [12, 3, 3, 39]], ids=["range", "gather"])
def test_integer_counts_are_shared_not_copied_and_read_as_float32(dtype, idx):
    dense = _counts()
    matrix = sp.csr_matrix(dense.astype(dtype))
    csr = TensorStore({"X": matrix}).tensors["X"]
    shared = dtype in (np.int32, np.uint8, np.float32)
    # int32 counts (and float32) stay in the caller's buffer; other types become float32 once
    assert np.shares_memory(csr.data.numpy(), matrix.data) == shared
    assert csr.data.dtype == (torch.from_numpy(matrix.data).dtype if shared else torch.float32)
    tensor_idx = torch.tensor(idx)
    for rows in (csr.rows(tensor_idx), csr._rows_torch(tensor_idx)):
        assert rows.dtype == torch.float32
        np.testing.assert_array_equal(rows.numpy(), dense[idx])
    sparse = csr.sparse_rows(tensor_idx)  # integer values stay integer, read as float32
    assert sparse.to_dense().dtype == torch.float32
    np.testing.assert_array_equal(sparse.to_dense().numpy(), dense[idx])
    np.testing.assert_allclose(sparse.row_sums().ravel().numpy(), dense[idx].sum(1))
    weight = torch.randn(3, dense.shape[1])
    torch.testing.assert_close(
        sparse.map_values(torch.log1p).linear(weight),
        torch.log1p(torch.from_numpy(dense[idx])) @ weight.T,
    )


def test_the_weight_blocks_are_reused_until_the_weight_changes():
    """Inference reuses a weight's column blocks across minibatches; an optimiser step (an
    in-place change) invalidates them, and with gradients no cached copy is used."""
    dense = _counts(g=30)
    rows, x = _rows(dense), torch.from_numpy(dense)
    layer = torch.nn.Linear(30, 150)  # three blocks of columns on a CPU
    with torch.no_grad():
        for _ in range(2):  # the second product reads the cached blocks
            torch.testing.assert_close(
                rows.linear(layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias)
            )
        layer.weight.mul_(-2.0)  # as an optimiser step does between two inference passes
        torch.testing.assert_close(
            rows.linear(layer.weight, layer.bias), F.linear(x, layer.weight, layer.bias)
        )
    with torch.inference_mode():  # a weight made here has no version counter: no cache
        weight = layer.weight * 3
        torch.testing.assert_close(rows.linear(weight), F.linear(x, weight))
    rows.linear(layer.weight, layer.bias).sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones(150, 40) @ x)
