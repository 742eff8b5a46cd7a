"""True/False obs columns as continuous covariates (read as 1/0, as scvi-tools does)."""

import numpy as np
import pandas as pd
import pytest

import cellvi
from cellvi.errors import InvalidDataError
from cellvi.model import SCVI


@pytest.fixture
def adata():
    data = cellvi.data.simulate(
        n_cells=120, n_genes=40, n_batches=2, n_cell_types=2, n_de_genes_per_type=5, seed=0
    )
    flags = np.arange(data.n_obs) % 3 == 0
    data.obs["flag"] = flags
    data.obs["nullable_flag"] = pd.array(flags, dtype="boolean")
    return data


def test_boolean_columns_are_registered_as_ones_and_zeros(adata, tmp_path):
    SCVI.setup_anndata(adata, continuous_covariate_keys=["flag", "nullable_flag"])
    covs = adata.obsm["_cellvi_extra_continuous_covs"]
    expected = (np.arange(adata.n_obs) % 3 == 0).astype(np.float32)
    np.testing.assert_array_equal(covs["flag"].to_numpy(), expected)
    np.testing.assert_array_equal(covs["nullable_flag"].to_numpy(), expected)
    model = SCVI(adata, n_latent=3)
    with cellvi.settings.override(progress_bar_style="none", logging_dir=tmp_path):
        model.train(max_epochs=1)
    assert np.isfinite(model.get_latent_representation()).all()


def test_missing_flags_and_flag_size_factors_are_refused(adata):
    adata.obs.loc[adata.obs_names[4], "nullable_flag"] = pd.NA
    with pytest.raises(InvalidDataError, match="'nullable_flag' has 1 NaN"):
        SCVI.setup_anndata(adata, continuous_covariate_keys=["nullable_flag"])
    with pytest.raises(InvalidDataError, match="'flag' must hold positive numbers"):
        SCVI.setup_anndata(adata, size_factor_key="flag")
