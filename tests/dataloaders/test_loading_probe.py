"""Defects found by probing splitting, loading and data kept on disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cellvi
from cellvi.dataloaders import AnnDataModule, DataSplitter, split_sizes
from cellvi.model import SCVI


@pytest.fixture
def sim():
    return cellvi.data.simulate(
        n_cells=300, n_genes=60, n_batches=2, n_cell_types=3, n_de_genes_per_type=5, seed=0
    )


@pytest.fixture
def manager(sim):
    SCVI.setup_anndata(sim, batch_key="batch")
    return SCVI(sim, n_hidden=8, n_latent=2).adata_manager


def test_inference_dataloader_takes_a_boolean_mask_as_positions(sim):
    dm = AnnDataModule(sim, batch_key="batch")
    mask = np.zeros(sim.n_obs, dtype=bool)
    mask[[3, 7, 250]] = True
    loader = dm.inference_dataloader(indices=mask)
    np.testing.assert_array_equal(loader.indices, [3, 7, 250])
    cells = torch.cat([b["ind_x"].ravel() for b in loader]).tolist()
    assert cells == [3, 7, 250]
    with pytest.raises(ValueError, match="one entry per cell"):
        dm.inference_dataloader(indices=mask[:10])
    with pytest.raises(ValueError, match="integer cell positions"):
        dm.inference_dataloader(indices=[1.5, 2.0])


@pytest.mark.parametrize("x", ["dense", "absent"])
def test_read_backed_layer_with_a_dense_or_absent_X(sim, tmp_path, x):
    """Counts in a layer, X normalised and dense (or absent): X is left out, not refused."""
    adata = sim.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = np.log1p(adata.X.toarray()).astype(np.float32) if x == "dense" else None
    path = tmp_path / "a.h5ad"
    adata.write_h5ad(path)
    backed = cellvi.data.read_backed(path, layer="counts")
    assert backed.X is None and backed.shape == (300, 60)
    assert list(backed.obs_names) == list(sim.obs_names)
    rows = np.array([299, 0, 5])
    assert (backed.layers["counts"][rows] != sim.X[rows]).nnz == 0
    with pytest.raises(cellvi.errors.InvalidDataError):
        cellvi.data.read_backed(path)  # X itself still has to be CSR


def test_read_collection_of_one_path_and_of_dotted_file_names(sim, tmp_path):
    one = tmp_path / "only.h5ad"
    sim.write_h5ad(one)
    coll = cellvi.data.read_collection(str(one))  # one file, not a list of its characters
    assert coll.shape == (300, 60) and list(coll.obs["dataset"].cat.categories) == ["only"]
    paths = [tmp_path / "run.v1.h5ad", tmp_path / "run.v2.h5ad"]
    sim[:100].copy().write_h5ad(paths[0])
    sim[100:].copy().write_h5ad(paths[1])
    coll = cellvi.data.read_collection(paths, label="file")
    assert list(coll.obs["file"].cat.categories) == ["run.v1", "run.v2"]
    same = [tmp_path / "d1" / "x.h5ad", tmp_path / "d2" / "x.h5ad"]
    for path, part in zip(same, (sim[:50].copy(), sim[50:].copy())):
        path.parent.mkdir()
        part.write_h5ad(path)
    # equal file names in different folders: the paths name them
    coll = cellvi.data.read_collection(same)
    assert list(coll.obs["dataset"].cat.categories) == [str(p) for p in same]
    with pytest.raises(ValueError, match="distinct names"):  # one file twice
        cellvi.data.read_collection([same[0], same[0]])


def test_split_sizes_never_promise_more_cells_than_remain(manager):
    # 0.56 * 25 = 14.000000000000002: ceil gives 15 while floor(0.44 * 25) = 11 remain 14
    for n, train, val in [(25, 0.56, 0.44), (50, 0.28, 0.72), (50, 0.14, 0.86)]:
        n_train, n_val = split_sizes(n, train, val)
        assert n_train + n_val <= n
    splitter = DataSplitter(manager, train_size=0.6, validation_size=0.4, batch_size=64)
    splitter.setup()
    assert splitter.n_train == len(splitter.train_idx)
    assert splitter.n_val == len(splitter.val_idx)


def test_drop_last_with_a_batch_larger_than_the_training_set_is_refused(manager):
    with pytest.raises(ValueError, match="no training minibatch"):
        DataSplitter(manager, batch_size=1000, drop_last=True)
    external = [np.arange(100, 300), np.arange(100)]
    with pytest.raises(ValueError, match="no training minibatch"):
        DataSplitter(manager, batch_size=256, drop_last=True, external_indexing=external).setup()
    ok = DataSplitter(manager, batch_size=200, drop_last=True)  # one full minibatch
    ok.setup()
    assert [len(b["ind_x"]) for b in ok.train_dataloader()] == [200]


def test_splitter_accepts_scvi_tools_loader_arguments(manager):
    plain = DataSplitter(manager, batch_size=64)
    other = DataSplitter(manager, batch_size=64, load_sparse_tensor=True, persistent_workers=False)
    for splitter in (plain, other):
        splitter.setup()
    for a, b in zip(plain.train_dataloader(), other.train_dataloader(), strict=True):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_train_takes_load_sparse_tensor_and_trains_the_same(sim, tmp_path):
    SCVI.setup_anndata(sim, batch_key="batch")
    latents = []
    for flag in (False, True):
        model = SCVI(sim, n_hidden=8, n_latent=2)
        with cellvi.settings.override(progress_bar_style="none", logging_dir=tmp_path):
            model.train(max_epochs=1, load_sparse_tensor=flag)
        latents.append(model.get_latent_representation())
    np.testing.assert_array_equal(*latents)
    with pytest.raises(TypeError, match="load_sparse_tensor='yes' must be True or False"):
        model.train(max_epochs=1, load_sparse_tensor="yes")


def test_outputs_on_a_view_of_backed_data(sim, tmp_path):
    import anndata

    SCVI.setup_anndata(sim, batch_key="batch")
    model = SCVI(sim, n_hidden=8, n_latent=2)
    with cellvi.settings.override(progress_bar_style="none", logging_dir=tmp_path):
        model.train(max_epochs=1)
    path = tmp_path / "data.h5ad"
    sim.write_h5ad(path)
    backed = anndata.read_h5ad(path, backed="r")
    try:
        view_latent = model.get_latent_representation(backed[:50])
    finally:
        backed.file.close()
    np.testing.assert_allclose(view_latent, model.get_latent_representation(indices=range(50)))
