"""Tensor stores, samplers and the splitter."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellvi.dataloaders import (
    BatchIndexSampler,
    DataSplitter,
    TensorStore,
    make_dataloader,
    split_sizes,
)
from cellvi.errors import TrainingWarning


class FakeManager:
    def __init__(self, arrays):
        self.arrays = arrays
        self.data_registry = {k: {} for k in arrays}
        self.summary_stats = {"n_cells": next(iter(arrays.values())).shape[0]}

    def get_from_registry(self, key):
        return self.arrays[key]


def _counts(n=50, g=30, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, g)) < 0.2) * rng.integers(1, 20, (n, g))


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense", "int32csr"])
def test_gather_equals_scipy_indexing(fmt):
    dense = _counts()
    matrix = {
        "csr": sp.csr_matrix(dense.astype(np.float32)),
        "csc": sp.csc_matrix(dense.astype(np.float32)),
        "dense": dense.astype(np.float32),
        "int32csr": sp.csr_matrix(dense.astype(np.int32)),
    }[fmt]
    store = TensorStore({"X": matrix, "batch": np.arange(50) % 3})
    idx = torch.tensor([7, 0, 49, 7, 13])
    batch = store.gather(idx)
    np.testing.assert_array_equal(batch["X"].numpy(), dense[idx.numpy()].astype(np.float32))
    assert batch["X"].dtype == torch.float32 and batch["batch"].dtype == torch.int64
    assert batch["batch"].shape == (5, 1)
    np.testing.assert_array_equal(batch["ind_x"].ravel().numpy(), idx.numpy())


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize(
    "rows",
    [[3, 4, 5, 6], [0], [39], list(range(40)), [7, 0, 39, 7, 13], [5, 4, 3], []],
    ids=["range", "first", "last", "all", "random-dups", "reversed", "empty"],
)
def test_csr_rows_equal_scipy_for_ranges_and_gathers(rows, index_dtype):
    from cellvi.dataloaders import CSRTensor

    dense = sp.random(40, 9, density=0.3, dtype=np.float32, random_state=1).toarray()
    dense[4] = 0  # an empty row inside a range
    matrix = sp.csr_matrix(dense)
    csr = CSRTensor(matrix)
    csr.indptr, csr.indices = csr.indptr.to(index_dtype), csr.indices.to(index_dtype)
    idx = torch.tensor(rows, dtype=torch.int64)
    want = matrix[np.asarray(rows, dtype=np.int64)].toarray()
    np.testing.assert_array_equal(csr.rows(idx).numpy(), want.reshape(len(rows), 9))
    with pytest.raises(IndexError, match="row indices"):
        csr.rows(torch.tensor([0, 40]))


def test_gather_handles_empty_rows():
    matrix = sp.csr_matrix((4, 6), dtype=np.float32)
    assert TensorStore({"X": matrix}).gather(torch.tensor([1, 2]))["X"].abs().sum() == 0


@pytest.mark.parametrize("n, batch_size", [(257, 128), (129, 128), (10, 3), (5, 5)])
def test_no_single_cell_batch_and_every_cell_once(n, batch_size):
    sampler = BatchIndexSampler(np.arange(n), batch_size, shuffle=True, seed=3)
    batches = list(sampler)
    assert all(len(b) > 1 for b in batches)
    assert sorted(torch.cat(batches).tolist()) == list(range(n))
    assert len(sampler) == len(batches)


def test_drop_last_drops_short_batch():
    batches = list(BatchIndexSampler(np.arange(10), 4, shuffle=False, drop_last=True))
    assert [len(b) for b in batches] == [4, 4]


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = BatchIndexSampler(np.arange(100), 10, shuffle=True, seed=1)
    b = BatchIndexSampler(np.arange(100), 10, shuffle=True, seed=1)
    a.set_epoch(3)
    b.load_state_dict({"seed": 1, "epoch": 3})
    assert torch.equal(torch.cat(list(a)), torch.cat(list(b)))
    b.set_epoch(4)
    assert not torch.equal(torch.cat(list(a)), torch.cat(list(b)))


def test_distributed_shards_are_disjoint_and_cover_the_set():
    shards = [
        torch.cat(list(BatchIndexSampler(np.arange(11), 2, True, seed=0, rank=r, world_size=2)))
        for r in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == 6  # ceil(11 / 2), one index repeated
    assert set(shards[0].tolist()) | set(shards[1].tolist()) == set(range(11))
    dropped = [
        torch.cat(
            list(
                BatchIndexSampler(
                    np.arange(11), 2, True, rank=r, world_size=2, drop_dataset_tail=True
                )
            )
        )
        for r in range(2)
    ]
    assert not set(dropped[0].tolist()) & set(dropped[1].tolist())


def test_loader_with_a_worker_process_yields_the_same_batches():
    store = TensorStore({"X": sp.csr_matrix(_counts().astype(np.float32))})
    plain = [b["X"] for b in make_dataloader(store, np.arange(50), 16, shuffle=True, num_workers=0)]
    worker = [
        b["X"] for b in make_dataloader(store, np.arange(50), 16, shuffle=True, num_workers=1)
    ]
    assert all(torch.equal(a, b) for a, b in zip(plain, worker, strict=True))


@pytest.mark.parametrize(
    "n, train, val, expected",
    [
        (100, 0.9, None, (90, 10)),
        (101, 0.9, None, (91, 10)),
        (100, 0.7, 0.2, (70, 20)),
        (7, 0.5, 0.25, (4, 1)),
    ],
)
def test_split_sizes_follow_ceil_and_floor(n, train, val, expected):
    assert split_sizes(n, train, val) == expected


def test_split_size_errors():
    with pytest.raises(ValueError, match=r"train_size=1.5 must be in \(0, 1\]"):
        split_sizes(10, 1.5, None)
    with pytest.raises(ValueError, match="exceeds 1"):
        split_sizes(10, 0.8, 0.5)


def _splitter(n=300, **kwargs):
    return DataSplitter(
        FakeManager({"X": sp.csr_matrix(_counts(n=n).astype(np.float32) + 1)}), **kwargs
    )


def test_split_is_reproducible_and_partitions_cells():
    a, b = _splitter(), _splitter()
    a.setup(), b.setup()
    np.testing.assert_array_equal(a.train_idx, b.train_idx)
    all_idx = np.concatenate([a.train_idx, a.val_idx, a.test_idx])
    assert sorted(all_idx.tolist()) == list(range(300))
    c = _splitter(split_seed=5)
    c.setup()
    assert not np.array_equal(a.train_idx, c.train_idx)
    d = _splitter(seed=5)  # the other name of split_seed
    d.setup()
    np.testing.assert_array_equal(c.train_idx, d.train_idx)
    with pytest.raises(ValueError, match="name the same setting"):
        _splitter(seed=5, split_seed=6)
    with pytest.raises(ValueError, match="split_seed=0.5 must be an integer"):
        _splitter(split_seed=0.5)


def test_default_split_moves_tiny_last_batch_to_validation():
    # n_train = ceil(0.9 * 143) = 129 = 128 + 1 -> one cell moves to validation
    with pytest.warns(TrainingWarning, match="Moved 1 cell"):
        s = _splitter(n=143)
    s.setup()
    assert (len(s.train_idx), len(s.val_idx)) == (128, 15)


def test_explicit_train_size_only_warns_about_tiny_last_batch():
    with pytest.warns(TrainingWarning, match="last training minibatch has 1"):
        s = _splitter(n=129, train_size=1.0)
    s.setup()
    assert len(s.train_idx) == 129


def test_external_indexing_checks():
    with pytest.raises(ValueError, match="the train and validation sets overlap"):
        _splitter(n=10, external_indexing=[np.arange(6), np.arange(5, 10), []]).setup()
    with pytest.raises(ValueError, match="covers 8 of 10 cells"):
        _splitter(n=10, external_indexing=[np.arange(6), np.arange(6, 8)]).setup()
    with pytest.raises(ValueError, match="train set has duplicated"):
        _splitter(n=10, external_indexing=[np.array([0, 0, 1]), np.arange(2, 10)]).setup()
    s = _splitter(n=10, external_indexing=[np.arange(7), np.arange(7, 10)])
    s.setup()
    np.testing.assert_array_equal(s.val_idx, [7, 8, 9])


def test_splitter_state_dict_round_trip():
    a = _splitter(seed=11)
    a.setup()
    b = _splitter(seed=0)
    b.load_state_dict(a.state_dict())
    b.setup()
    np.testing.assert_array_equal(a.train_idx, b.train_idx)
    assert b.split_seed == 11
    # tensors and plain values only: a checkpoint holding it loads with weights_only
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["data_identity"] == a.state_dict()["data_identity"]
    assert loaded["data_identity"]["n_obs"] == 300


def test_device_gather_path_equals_scipy():
    """The torch-only gather (used on GPUs) gives the same rows as scipy."""
    dense = _counts()
    store = TensorStore({"X": sp.csr_matrix(dense.astype(np.float32))})
    idx = torch.tensor([3, 3, 0, 49, 20])
    rows = store.tensors["X"]._rows_torch(idx)
    np.testing.assert_array_equal(rows.numpy(), dense[idx.numpy()].astype(np.float32))


def test_read_only_arrays_are_copied_not_shared():
    # pandas >= 3 (copy-on-write) hands out read-only views of obs columns; torch would warn
    # and share memory it must not write
    labels = np.array([0, 1, 1, 2], dtype=np.int64)
    labels.flags.writeable = False
    dense = np.eye(4, dtype=np.float32)
    dense.flags.writeable = False
    store = TensorStore({"X": dense, "labels": labels})  # warnings are errors in the tests
    batch = store.gather(torch.tensor([3, 1]))
    assert batch["labels"].ravel().tolist() == [2, 1]
    assert batch["X"].tolist() == [[0, 0, 0, 1], [0, 1, 0, 0]]
    store.tensors["labels"][0] = 7  # the store owns its copy
    assert labels[0] == 0


def test_train_takes_split_seed_through_datasplitter_kwargs():
    import cellvi

    adata = cellvi.data.synthetic_iid(batch_size=60, n_genes=20, n_batches=2)
    cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")

    def train_indices(**kwargs):
        model = cellvi.model.SCVI(adata, n_hidden=8, n_latent=2)
        model.train(max_epochs=1, batch_size=40, datasplitter_kwargs=kwargs or None)
        return np.sort(model.train_indices)

    default, seven = train_indices(), train_indices(split_seed=7)
    assert not np.array_equal(default, seven)
    np.testing.assert_array_equal(seven, train_indices(seed=7))
    np.testing.assert_array_equal(default, train_indices(split_seed=0))
