"""Bad input is refused at setup with a message that says what to do."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

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
    with pytest.raises(InvalidDataError, match="contains 2 NaN or infinite values"):
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
