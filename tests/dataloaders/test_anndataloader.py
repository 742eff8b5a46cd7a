"""AnnDataLoader: scvi-tools' public loader over cellvi's tensor stores (data.md §3.1-3.2)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import cellvi
from cellvi.dataloaders import AnnDataLoader


def _manager(sparse: bool = False, adata=None):
    if adata is None:
        adata = cellvi.data.synthetic_iid(batch_size=40, n_genes=15, n_batches=2, n_labels=3)
        adata.obs["cont"] = np.linspace(0.0, 1.0, adata.n_obs)
        if sparse:
            adata.X = sp.csr_matrix(adata.X)
    cellvi.model.SCVI.setup_anndata(
        adata, batch_key="batch", labels_key="labels", continuous_covariate_keys=["cont"]
    )
    return cellvi.model.SCVI(adata).adata_manager


def _dense(key, manager):
    value = manager.get_from_registry(key)
    value = value.toarray() if sp.issparse(value) else np.asarray(value)
    return value.reshape(len(value), -1)


@pytest.fixture(scope="module")
def manager():
    return _manager()


@pytest.mark.parametrize("sparse", [False, True])
def test_values_equal_the_registered_arrays_for_given_indices(sparse):
    manager = _manager(sparse)
    idx = [5, 3, 70, 0, 41, 12, 79]
    loader = AnnDataLoader(manager, indices=idx, batch_size=3)
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(b["X"]) for b in batches] == [3, 3, 1]  # a 1-cell last batch is kept
    assert set(batches[0]) == set(manager.data_registry)
    for key in manager.data_registry:
        got = torch.cat([b[key] for b in batches]).numpy()
        np.testing.assert_array_equal(got, _dense(key, manager)[idx])


def test_default_and_requested_dtypes(manager):
    batch = next(iter(AnnDataLoader(manager, batch_size=8)))
    dtypes = {k: v.dtype for k, v in batch.items()}
    assert dtypes == {
        "X": torch.float32,
        "batch": torch.int64,
        "labels": torch.int64,
        "extra_continuous_covs": torch.float32,
    }
    listed = next(iter(AnnDataLoader(manager, data_and_attributes=["X", "batch", "ind_x"])))
    assert list(listed) == ["X", "batch", "ind_x"]
    assert listed["ind_x"].ravel().tolist() == list(range(80))
    chosen = AnnDataLoader(manager, data_and_attributes={"X": np.float64, "labels": np.int32})
    batch = next(iter(chosen))
    assert (batch["X"].dtype, batch["labels"].dtype) == (torch.float64, torch.int32)
    np.testing.assert_array_equal(batch["X"].numpy(), _dense("X", manager))


def test_boolean_mask_indices_become_positions(manager):
    mask = np.arange(80) % 7 == 0
    loader = AnnDataLoader(manager, indices=mask, batch_size=5, drop_last=True)
    np.testing.assert_array_equal(loader.indices, np.flatnonzero(mask))
    ids = [b["batch"] for b in loader]
    assert [len(b) for b in ids] == [5, 5]  # 12 cells: the last 2 dropped
    expected = _dense("batch", manager)[np.flatnonzero(mask)[:10]]
    np.testing.assert_array_equal(torch.cat(ids).numpy(), expected)


def test_shuffle_is_seeded_and_changes_each_pass(manager):
    def passes(loader, n=2):
        return [torch.cat([b["ind_x"].ravel() for b in loader]).tolist() for _ in range(n)]

    keys = ["ind_x"]
    first = passes(AnnDataLoader(manager, batch_size=16, shuffle=True, data_and_attributes=keys))
    again = passes(AnnDataLoader(manager, batch_size=16, shuffle=True, data_and_attributes=keys))
    assert first == again  # reproducible (settings.seed)
    assert first[0] != first[1]  # a new order every pass
    assert sorted(first[0]) == list(range(80)) and first[0] != list(range(80))
    with cellvi.settings.override(seed=5):
        seeded = AnnDataLoader(manager, batch_size=16, shuffle=True, data_and_attributes=keys)
        other = passes(seeded)
    assert other != first
    loader = AnnDataLoader(manager, batch_size=16, shuffle=True, data_and_attributes=keys)
    loader.sampler.set_epoch(0)  # Lightning selects the epoch: the same order again
    assert passes(loader, 1)[0] == first[0]


def test_drop_last(manager):
    kept = AnnDataLoader(manager, batch_size=30)
    dropped = AnnDataLoader(manager, batch_size=30, drop_last=True)
    assert [len(b["X"]) for b in kept] == [30, 30, 20] and len(kept) == 3
    assert [len(b["X"]) for b in dropped] == [30, 30] and len(dropped) == 2


def test_sparse_tensors_are_torch_csr():
    manager = _manager(sparse=True)
    idx = [1, 9, 2, 30]
    batch = next(iter(AnnDataLoader(manager, indices=idx, load_sparse_tensor=True)))
    x = batch["X"]
    assert x.layout == torch.sparse_csr and x.dtype == torch.float32 and x.shape == (4, 15)
    np.testing.assert_array_equal(x.to_dense().numpy(), _dense("X", manager)[idx])
    assert batch["batch"].layout == torch.strided  # dense keys stay dense


def test_iter_ndarray_yields_numpy():
    manager = _manager(sparse=True)
    batch = next(iter(AnnDataLoader(manager, batch_size=10, iter_ndarray=True)))
    assert all(isinstance(v, np.ndarray) for v in batch.values())
    assert batch["batch"].dtype == np.int64 and batch["X"].dtype == np.float32
    np.testing.assert_array_equal(batch["X"], _dense("X", manager)[:10])
    sparse_batch = next(iter(AnnDataLoader(manager, iter_ndarray=True, load_sparse_tensor=True)))
    assert sp.issparse(sparse_batch["X"]) and sparse_batch["X"].format == "csr"
    np.testing.assert_array_equal(sparse_batch["X"].toarray(), _dense("X", manager))


def test_user_samplers_yield_positions_into_indices(manager):
    idx = np.array([10, 20, 30, 40, 50])
    batches = torch.utils.data.BatchSampler(range(5), batch_size=2, drop_last=False)
    loader = AnnDataLoader(manager, indices=idx, sampler=batches, data_and_attributes=["ind_x"])
    assert [b["ind_x"].ravel().tolist() for b in loader] == [[10, 20], [30, 40], [50]]
    singles = AnnDataLoader(
        manager, indices=idx, sampler=[4, 0, 2], batch_size=2, data_and_attributes=["ind_x"]
    )
    assert len(singles) == 2
    assert [b["ind_x"].ravel().tolist() for b in singles] == [[50, 10], [30]]
    bad = AnnDataLoader(manager, indices=idx, sampler=[[0, 5]], data_and_attributes=["ind_x"])
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        list(bad)


def test_distributed_sampler_shards_by_rank(manager, tmp_path):
    with pytest.raises(RuntimeError, match="init_process_group"):
        AnnDataLoader(manager, distributed_sampler=True)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        loader = AnnDataLoader(manager, batch_size=32, distributed_sampler=True)
        assert (loader.sampler.rank, loader.sampler.world_size) == (0, 1)
        assert [len(b["X"]) for b in loader] == [32, 32, 16]
    finally:
        torch.distributed.destroy_process_group()


def test_on_disk_data(tmp_path):
    adata = cellvi.data.synthetic_iid(batch_size=40, n_genes=15, n_batches=2, n_labels=3)
    adata.X = sp.csr_matrix(adata.X)
    adata.obs["cont"] = np.linspace(0.0, 1.0, adata.n_obs)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = cellvi.data.read_backed(tmp_path / "a.h5ad")
    manager, memory = _manager(adata=backed), _manager(adata=adata)
    idx = [70, 3, 41, 0, 12]
    got = next(iter(AnnDataLoader(manager, indices=idx)))
    np.testing.assert_array_equal(got["X"].numpy(), _dense("X", memory)[idx])
    np.testing.assert_array_equal(got["batch"].numpy(), _dense("batch", memory)[idx])
    sparse_batch = next(iter(AnnDataLoader(manager, indices=idx, load_sparse_tensor=True)))
    np.testing.assert_array_equal(sparse_batch["X"].to_dense().numpy(), _dense("X", memory)[idx])
    keys = ["X", "ind_x"]
    for load_sparse in (False, True):  # block-shuffled reads from disk
        loader = AnnDataLoader(
            manager,
            batch_size=16,
            shuffle=True,
            load_sparse_tensor=load_sparse,
            data_and_attributes=keys,
        )
        batches = list(loader)
        cells = torch.cat([b["ind_x"].ravel() for b in batches]).numpy()
        assert sorted(cells.tolist()) == list(range(80)) and cells.tolist() != list(range(80))
        x = torch.cat([b["X"].to_dense() if load_sparse else b["X"] for b in batches])
        np.testing.assert_array_equal(x.numpy(), _dense("X", memory)[cells])


def test_worker_settings_come_from_cellvi_settings(manager):
    assert AnnDataLoader(manager).num_workers == cellvi.settings.dl_num_workers
    with cellvi.settings.override(dl_num_workers=1, dl_persistent_workers=True):
        loader = AnnDataLoader(manager, batch_size=40)
        assert loader.num_workers == 1 and loader.persistent_workers
        assert [len(b["X"]) for b in loader] == [40, 40]
    assert AnnDataLoader(manager, num_workers=0, pin_memory=False).num_workers == 0


def test_bad_arguments_give_clear_errors(manager):
    with pytest.raises(KeyError, match=r"'counts'.*registered keys are \['X'"):
        AnnDataLoader(manager, data_and_attributes=["X", "counts"])
    with pytest.raises(TypeError, match="numeric numpy dtype"):
        AnnDataLoader(manager, data_and_attributes={"X": object})
    with pytest.raises(TypeError, match="list of registry keys"):
        AnnDataLoader(manager, data_and_attributes="X")
    with pytest.raises(ValueError, match="distributed_sampler"):
        AnnDataLoader(manager, sampler=[0, 1], distributed_sampler=True)
    with pytest.raises(ValueError, match="shuffle"):
        AnnDataLoader(manager, sampler=[0, 1], shuffle=True)
    with pytest.raises(ValueError, match="batch_size"):
        AnnDataLoader(manager, batch_size=0)
    with pytest.raises(TypeError, match="batch_sampler"):
        AnnDataLoader(manager, batch_sampler=[[0]])
    with pytest.raises(IndexError, match="position 80"):
        AnnDataLoader(manager, indices=[0, 80])
    with pytest.raises(ValueError, match="boolean mask"):
        AnnDataLoader(manager, indices=np.ones(5, dtype=bool))
    with pytest.raises(ValueError, match="integer cell positions"):
        AnnDataLoader(manager, indices=[0.5])
    with pytest.raises(ValueError, match="collate_fn"):
        AnnDataLoader(manager, iter_ndarray=True, collate_fn=list)


def test_a_model_output_takes_the_loader_like_scvi_tools():
    adata = cellvi.data.simulate(n_cells=120, n_genes=30, n_de_genes_per_type=5, seed=0)
    cellvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = cellvi.model.SCVI(adata, n_hidden=8, n_latent=2)
    with cellvi.settings.override(progress_bar_style="none"):
        model.train(max_epochs=1, save_resume_checkpoint=False)
    cells = np.array([5, 0, 17, 3])
    loader = AnnDataLoader(model.adata_manager, indices=cells, batch_size=3)
    np.testing.assert_array_equal(  # it was refused as not a data module's loader
        model.get_latent_representation(dataloader=loader),
        model.get_latent_representation(indices=cells),
    )
    assert model.get_normalized_expression(dataloader=loader).shape == (4, 30)
