"""Bad input is refused at setup with a message that says what to do."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellvi.data._checks as checks
from cellvi.data import check_count_matrix
from cellvi.errors import CountsWarning, InvalidDataError, MissingKeyError, SetupError
from cellvi.model import SCVI


def _adata(n=60, g=12, seed=0, sparse=True):
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(n, g)).astype(np.float32)
    x[:, 0] += 1
    obs = pd.DataFrame(
        {"batch": pd.Categorical(np.repeat(["a", "b"], n // 2)), "size": rng.uniform(0.5, 2, n)},
        index=[f"c{i}" for i in range(n)],
    )
    return anndata.AnnData(
        X=sp.csr_matrix(x) if sparse else x,
        obs=obs,
        var=pd.DataFrame(index=[f"g{i}" for i in range(g)]),
    )


@pytest.mark.parametrize("sparse", [True, False])
def test_setup_rejects_negative_counts(sparse):
    adata = _adata(sparse=sparse)
    x = adata.X.toarray() if sparse else adata.X
    x[3, 4] = -1
    adata.X = sp.csr_matrix(x) if sparse else x
    with pytest.raises(InvalidDataError, match=r"adata.X contains 1 negative values.*layer="):
        SCVI.setup_anndata(adata)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_setup_rejects_nan_and_inf_counts(value):
    adata = _adata(sparse=False)
    adata.X[0, 0] = value
    adata.X[5, 1] = value
    with pytest.raises(
        InvalidDataError, match="contains 2 NaN or infinite values.*layer=.*fill_value=0"
    ):
        SCVI.setup_anndata(adata)


def test_setup_warns_on_non_integer_counts_with_count():
    adata = _adata()
    adata.X = adata.X.multiply(1.5).tocsr()
    n_frac = int((adata.X.data != np.round(adata.X.data)).sum())
    with pytest.warns(CountsWarning, match=f"contains {n_frac} non-integer values"):
        SCVI.setup_anndata(adata)


def test_count_check_covers_the_whole_matrix():
    adata = _adata(n=50_000, g=4)
    adata.X.data[-1] = -3  # a value in the very last row: a sampled check would miss it
    with pytest.raises(InvalidDataError, match="1 negative values"):
        SCVI.setup_anndata(adata)


def test_setup_rejects_cells_with_zero_counts_and_says_how_to_filter():
    adata = _adata(sparse=False)
    adata.X[[2, 7], :] = 0
    with pytest.raises(InvalidDataError, match=r"2 cell\(s\) .* zero total counts.*filter_cells"):
        SCVI.setup_anndata(adata)


def test_setup_rejects_non_numeric_matrix():
    adata = _adata(sparse=False)
    adata.layers["text"] = adata.X.astype(str).astype(object)
    with pytest.raises(InvalidDataError, match="numeric count matrix"):
        SCVI.setup_anndata(adata, layer="text")


def test_setup_rejects_duplicated_var_names():
    adata = _adata()
    adata.var_names = ["g0", "g0"] + [f"g{i}" for i in range(2, 12)]
    with pytest.raises(InvalidDataError, match=r"1 duplicated name.*var_names_make_unique"):
        SCVI.setup_anndata(adata)


def test_missing_layer_lists_existing_layers():
    adata = _adata()
    adata.layers["raw"] = adata.X.copy()
    with pytest.raises(MissingKeyError, match=r"layer 'counts' not found.*\['raw'\]"):
        SCVI.setup_anndata(adata, layer="counts")


def test_missing_obs_column_lists_columns():
    with pytest.raises(MissingKeyError, match=r"'donor' not found.*\['batch', 'size'\]"):
        SCVI.setup_anndata(_adata(), batch_key="donor")


def test_setup_rejects_nan_batch_naming_column_and_count():
    adata = _adata()
    adata.obs["batch"] = adata.obs["batch"].astype(object)
    adata.obs.iloc[[1, 4, 9], 0] = np.nan
    with pytest.raises(InvalidDataError, match="'batch' has 3 missing value"):
        SCVI.setup_anndata(adata, batch_key="batch")


def test_setup_rejects_non_finite_and_non_positive_size_factors():
    adata = _adata()
    adata.obs.loc["c3", "size"] = 0.0
    with pytest.raises(InvalidDataError, match=r"'size' must be > 0 .*1 cell"):
        SCVI.setup_anndata(adata, size_factor_key="size")
    adata.obs.loc["c3", "size"] = np.nan
    with pytest.raises(InvalidDataError, match="'size' has 1 NaN/infinite"):
        SCVI.setup_anndata(adata, size_factor_key="size")


def test_setup_rejects_non_finite_continuous_covariate():
    adata = _adata()
    adata.obs["score"] = 1.0
    adata.obs.loc["c0", "score"] = np.inf
    with pytest.raises(InvalidDataError, match="'score' has 1 NaN/infinite"):
        SCVI.setup_anndata(adata, continuous_covariate_keys=["score"])


def test_setup_rejects_views():
    adata = _adata()
    with pytest.raises(SetupError, match=r"view.*\.copy\(\)"):
        SCVI.setup_anndata(adata[:10])


def test_model_on_unregistered_data_says_to_run_setup():
    with pytest.raises(SetupError, match=r"not set up for SCVI.*setup_anndata"):
        SCVI(_adata())


def test_model_on_copy_after_setup_explains():
    adata = _adata()
    SCVI.setup_anndata(adata)
    with pytest.raises(SetupError, match="copied after setup"):
        SCVI(adata.copy())


def test_too_few_cells_for_training_is_an_error_before_training():
    adata = _adata(n=2)
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=8, n_latent=2)
    with pytest.raises(InvalidDataError, match="training needs at least 2"):
        model.train(max_epochs=1, train_size=0.5)
    assert model.history == {}


# ------------------------------------------------- check_count_matrix on each storage format
def _counts(n=50, g=6, seed=0):
    x = np.random.default_rng(seed).poisson(2.0, size=(n, g)).astype(np.float32)
    x[:, 0] += 1
    return x


FORMATS = {
    "dense": np.asarray,
    "fortran": np.asfortranarray,
    "csr": sp.csr_matrix,
    "csc": sp.csc_matrix,
    "coo": sp.coo_matrix,
    "csr_array": sp.csr_array,
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_count_check_accepts_clean_counts_in_every_format(fmt):
    check_count_matrix(FORMATS[fmt](_counts()), "adata.X")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_count_check_finds_negative_values_in_every_format(fmt):
    x = _counts()
    x[[0, 49], [1, 5]] = -2
    with pytest.raises(InvalidDataError, match="adata.X contains 2 negative values"):
        check_count_matrix(FORMATS[fmt](x), "adata.X")


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_count_check_finds_empty_cells_in_every_format(fmt):
    x = _counts()
    x[[3, 40], :] = 0
    with pytest.raises(InvalidDataError, match=r"2 cell\(s\).*positions: \[3, 40\]"):
        check_count_matrix(FORMATS[fmt](x), "adata.X")


def test_nan_message_differs_from_negative_message():
    x = _counts()
    x[0, 0] = np.nan
    x[1, 1] = -1  # NaN is reported first: it is the more basic problem
    with pytest.raises(InvalidDataError, match=r"1 NaN or infinite values; counts must be finite"):
        check_count_matrix(x, "adata.layers['counts']")


def test_non_integer_warning_counts_entries_and_names_location():
    x = _counts()
    x[:3, 2] += 0.5
    with pytest.warns(CountsWarning, match=r"adata.layers\['c'\] contains 3 non-integer.*layer="):
        check_count_matrix(sp.csr_matrix(x), "adata.layers['c']")


def test_integer_matrices_are_checked_without_warnings():
    check_count_matrix(_counts().astype(np.int64), "adata.X")
    check_count_matrix(sp.csr_matrix(_counts().astype(np.uint16)), "adata.X")


def test_negative_integers_are_found():
    x = _counts().astype(np.int32)
    x[7, 3] = -1
    with pytest.raises(InvalidDataError, match="1 negative values"):
        check_count_matrix(x, "adata.X")


def test_empty_cell_hint_uses_the_location():
    x = _counts()
    x[5] = 0
    with pytest.raises(InvalidDataError, match=r"np.asarray\(adata.layers\['c'\].sum\(axis=1\)\)"):
        check_count_matrix(x, "adata.layers['c']")


def test_stored_zeros_do_not_count_as_expression():
    x = sp.csr_matrix(_counts())
    x.data[x.indptr[4] : x.indptr[5]] = 0  # row 4 keeps explicit zeros only
    with pytest.raises(InvalidDataError, match=r"1 cell\(s\).*\[4\]"):
        check_count_matrix(x, "adata.X")


def test_count_check_rejects_matrices_that_are_not_two_dimensional():
    with pytest.raises(InvalidDataError, match=r"must be a 2-D matrix .*\(5,\)"):
        check_count_matrix(np.ones(5), "adata.obsm['p']")


def test_count_check_rejects_complex_values():
    with pytest.raises(InvalidDataError, match="complex dtype"):
        check_count_matrix(np.ones((3, 2), dtype=complex), "adata.X")


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_count_check_positions_are_right_across_chunks(monkeypatch, fmt):
    monkeypatch.setattr(checks, "CHUNK_ROWS", 7)
    monkeypatch.setattr(checks, "CHUNK_VALUES", 6 * 7)
    x = _counts()
    x[[6, 7, 48], :] = 0
    x[13, 2] = -1
    x[20, 1] = -4
    with pytest.raises(InvalidDataError, match="2 negative values"):
        check_count_matrix(FORMATS[fmt](x), "adata.X")
    x[[13, 20], [2, 1]] = 1
    with pytest.raises(InvalidDataError, match=r"3 cell\(s\).*\[6, 7, 48\]"):
        check_count_matrix(FORMATS[fmt](x), "adata.X")


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_count_check_reads_backed_data_in_row_chunks(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(checks, "CHUNK_ROWS", 8)
    monkeypatch.setattr(checks, "CHUNK_VALUES", 6 * 8)
    x = _counts()
    x[49, 5] = -1  # last row, last chunk
    adata = anndata.AnnData(X=sp.csr_matrix(x) if fmt == "csr" else x)
    adata.write_h5ad(tmp_path / "d.h5ad")
    backed = anndata.read_h5ad(tmp_path / "d.h5ad", backed="r")
    try:
        with pytest.raises(InvalidDataError, match="1 negative values"):
            check_count_matrix(backed.X, "adata.X")
    finally:
        backed.file.close()


def test_an_unseen_category_message_lists_the_known_ones_or_says_how_many_more():
    from cellvi.data._fields import CategoricalObsField

    obs = pd.DataFrame(
        {"donor": [f"d{i % 10}" for i in range(40)]}, index=list(map(str, range(40)))
    )
    adata = anndata.AnnData(np.ones((40, 3), np.float32), obs=obs)
    field = CategoricalObsField("batch", "donor")
    state = field.register_field(adata)
    query = adata.copy()
    query.obs["donor"] = ["new"] * 40
    known = r"\(\['d0', 'd1', 'd2', 'd3', 'd4', 'd5', 'd6', 'd7', \.\.\. \(2 more\)\]"
    with pytest.raises(InvalidDataError, match=r"\['new'\]\. Map them onto known ones " + known):
        field.transfer_field(state, query)
