"""Defects found by probing setup_anndata, the splitters and the loaders (one test each)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cellvi
from cellvi.data import check_count_matrix, read_collection
from cellvi.dataloaders import CSRTensor, DataSplitter, SemiSupervisedDataSplitter
from cellvi.errors import InvalidDataError, MissingKeyError
from cellvi.model import SCANVI, SCVI


def _sim(n_cells=200):
    return cellvi.data.simulate(n_cells=n_cells, n_genes=60, n_batches=2, n_cell_types=2, seed=0)


def _scvi_manager(adata, **setup):
    SCVI.setup_anndata(adata, **setup)
    return SCVI(adata).adata_manager


# --------------------------------------------------------------------- registration
def test_failed_setup_does_not_leave_the_previous_setup_reading_other_codes():
    adata = _sim()
    manager = _scvi_manager(adata, batch_key="batch")
    codes = manager.get_from_registry("batch").ravel().copy()
    adata.obs["other"] = np.r_[np.ones(100, int), np.zeros(100, int)]
    with pytest.raises(MissingKeyError):  # batch codes are written before size factors fail
        SCVI.setup_anndata(adata, batch_key="other", size_factor_key="absent")
    np.testing.assert_array_equal(manager.get_from_registry("batch").ravel(), codes)


def test_get_from_registry_follows_its_own_setup_after_another_setup_of_the_object():
    adata = _sim()
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata)
    codes = model.get_from_registry(adata, "batch").ravel().copy()
    adata.obs["other"] = np.r_[np.ones(100, int), np.zeros(100, int)]
    SCVI.setup_anndata(adata, batch_key="other")
    np.testing.assert_array_equal(model.get_from_registry(adata, "batch").ravel(), codes)


def test_missing_column_message_lists_only_the_users_columns():
    adata = _sim()
    with pytest.raises(MissingKeyError) as err:
        SCVI.setup_anndata(adata, batch_key="batch", size_factor_key="absent")
    assert "_cellvi_" not in str(err.value)


def test_missing_values_hint_is_code_that_fills_them():
    adata = _sim()
    adata.obs["donor"] = pd.Categorical(["a", "b"] * 100)
    adata.obs.loc[adata.obs_names[0], "donor"] = np.nan
    with pytest.raises(InvalidDataError, match=r"\.astype\(object\)\.fillna") as err:
        SCVI.setup_anndata(adata, batch_key="donor")
    hint = str(err.value).split("(e.g. ")[1].split(") or drop")[0]
    exec(hint, {"adata": adata})  # the suggested line leaves no missing value
    assert not adata.obs["donor"].isna().any()


@pytest.mark.parametrize("value", [1e40, -1e40])
def test_continuous_covariate_beyond_float32_is_refused(value):
    adata = _sim()
    adata.obs["big"] = np.full(adata.n_obs, value)
    with pytest.raises(InvalidDataError, match="float32"):
        SCVI.setup_anndata(adata, continuous_covariate_keys=["big"])


@pytest.mark.parametrize("value", [1e-50, 1e40])
def test_size_factors_that_float32_makes_zero_or_infinite_are_refused(value):
    adata = _sim()
    adata.obs["sf"] = np.full(adata.n_obs, value)
    with pytest.raises(InvalidDataError, match="float32"):
        SCVI.setup_anndata(adata, size_factor_key="sf")


def test_setup_without_cells_or_genes_is_a_clear_error():
    adata = _sim()
    with pytest.raises(InvalidDataError, match=r"shape \(0, 60\).*at least one cell"):
        SCVI.setup_anndata(adata[:0].copy())
    with pytest.raises(InvalidDataError, match=r"shape \(200, 0\).*one gene"):
        SCVI.setup_anndata(adata[:, :0].copy())


def test_zero_count_hint_on_data_on_disk_is_valid_code(tmp_path):
    adata = _sim()
    x = adata.X.toarray()
    x[3] = 0
    adata.X = sp.csr_matrix(x)
    adata.write_h5ad(tmp_path / "a.h5ad")
    backed = cellvi.data.read_backed(tmp_path / "a.h5ad")
    with pytest.raises(InvalidDataError, match="zero total counts") as err:
        SCVI.setup_anndata(backed)
    hint = str(err.value).split("e.g. `")[1].split("`")[0]
    scope = {"adata": backed, "cellvi": cellvi}
    exec(hint, scope)
    assert scope["adata"].n_obs == 199


# --------------------------------------------------------------- repeated CSR entries
def _csr_with_repeats():
    # row 0: gene 0 stored twice (1 + 2); row 1: gene 1 stored twice (0.5 + 0.5)
    data = np.array([1.0, 2.0, 3.0, 0.5, 0.5], dtype=np.float32)
    return sp.csr_matrix((data, np.array([0, 0, 1, 1, 1]), np.array([0, 3, 5])), shape=(2, 3))


def test_count_check_sums_repeated_sparse_entries():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0.5 + 0.5 is the whole count 1
        assert check_count_matrix(_csr_with_repeats(), "adata.X") == 0


def test_device_gather_sums_repeated_sparse_entries():
    matrix = _csr_with_repeats()
    rows = CSRTensor(matrix)._rows_torch(torch.tensor([1, 0]))  # the path used on a GPU
    np.testing.assert_array_equal(rows.numpy(), matrix.toarray()[[1, 0]])


# --------------------------------------------------------------------------- splitter
@pytest.mark.parametrize("batch_size", [0, -5, 2.5])
def test_splitter_refuses_a_batch_size_that_is_not_a_positive_integer(batch_size):
    manager = _scvi_manager(_sim())
    with pytest.raises((TypeError, ValueError), match="batch_size"):
        DataSplitter(manager, batch_size=batch_size)


def test_external_indexing_refuses_fractional_positions():
    manager = _scvi_manager(_sim())
    train = np.arange(150) + 0.5
    splitter = DataSplitter(manager, external_indexing=[train, np.arange(150, 200)])
    with pytest.raises(ValueError, match="integer cell positions"):
        splitter.setup()


def test_external_indexing_accepts_boolean_masks():
    manager = _scvi_manager(_sim())
    mask = np.arange(200) < 150
    splitter = DataSplitter(manager, external_indexing=[mask, ~mask])
    splitter.setup()
    np.testing.assert_array_equal(splitter.train_idx, np.arange(150))
    np.testing.assert_array_equal(splitter.val_idx, np.arange(150, 200))


def test_split_sum_error_says_train_size_defaults_to_0_9():
    manager = _scvi_manager(_sim())
    with pytest.raises(ValueError, match="defaults to 0.9"):
        DataSplitter(manager, validation_size=0.3)


def _scanvi_manager(n_labeled=50):
    adata = _sim()
    adata.obs["lab"] = adata.obs["cell_type"].astype(str)
    adata.obs.loc[adata.obs_names[n_labeled:], "lab"] = "Unknown"
    SCANVI.setup_anndata(adata, labels_key="lab", unlabeled_category="Unknown")
    return SCANVI(adata).adata_manager


@pytest.mark.parametrize("n", [0, -1])
def test_semisupervised_refuses_a_non_positive_n_samples_per_label(n):
    with pytest.raises(ValueError, match="n_samples_per_label"):
        SemiSupervisedDataSplitter(_scanvi_manager(), n_samples_per_label=n)


def test_semisupervised_split_moves_the_cells_its_warning_announces():
    with pytest.warns(cellvi.errors.TrainingWarning, match="Moved 1 cell") as record:
        splitter = SemiSupervisedDataSplitter(_scanvi_manager(), batch_size=179)
    assert len(record) == 1
    splitter.setup()
    assert len(splitter.train_idx) == 179
    assert len(splitter.val_idx) == 21
    cells = np.concatenate([splitter.train_idx, splitter.val_idx, splitter.test_idx])
    assert sorted(cells.tolist()) == list(range(200))
    assert splitter.labeled_mask[splitter.train_idx].sum() == 45  # labeled cells kept


# ------------------------------------------------------------------------- collection
def test_collection_keeps_the_files_category_order(tmp_path):
    adata = _sim()
    site = np.r_[["z"] * 100, ["a"] * 100]
    for i, part in enumerate((slice(0, 120), slice(120, 200))):
        piece = adata[part].copy()  # same categories in both files, 'm' unused
        piece.obs["site"] = pd.Categorical(site[part], categories=["z", "a", "m"])
        piece.write_h5ad(tmp_path / f"p{i}.h5ad")
    joined = read_collection([tmp_path / "p0.h5ad", tmp_path / "p1.h5ad"])
    assert list(joined.obs["site"].cat.categories) == ["z", "a", "m"]
    assert joined.obs["site"].tolist() == site.tolist()


def test_collection_appends_new_categories_of_later_files(tmp_path):
    adata = _sim()
    first, second = adata[:100].copy(), adata[100:].copy()
    first.obs["site"] = pd.Categorical(["z", "y"] * 50, categories=["z", "y"])
    second.obs["site"] = pd.Categorical(["x", "z"] * 50, categories=["x", "z"])
    first.write_h5ad(tmp_path / "p1.h5ad")
    second.write_h5ad(tmp_path / "p2.h5ad")
    joined = read_collection([tmp_path / "p1.h5ad", tmp_path / "p2.h5ad"])
    assert list(joined.obs["site"].cat.categories) == ["z", "y", "x"]
    assert joined.obs["site"].tolist() == ["z", "y"] * 50 + ["x", "z"] * 50


def test_categories_that_a_model_file_cannot_store_are_refused_at_setup():
    adata = _sim()
    adata.obs["day"] = pd.to_datetime(np.r_[[0] * 100, [1] * 100], unit="D")
    with pytest.raises(InvalidDataError, match=r"'day' holds Timestamp values.*astype\(str\)"):
        SCVI.setup_anndata(adata, batch_key="day")
