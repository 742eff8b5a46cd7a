"""Analysis outputs of SCVI models built with non-default module options (likelihood,
dispersion, latent distribution, library size, covariates): combinations that the package's
shared default model does not reach."""

from __future__ import annotations

import numpy as np
import pytest

import cellvi
from cellvi.model import SCVI

IMPORTANCE = dict(max_cells=20, n_mc_samples=20, n_mc_samples_per_pass=10)
# a 3-epoch toy model has far-from-optimal posteriors: its weights may collapse
COLLAPSE = "ignore:The importance weights collapsed"


def _fit(**options):
    adata = cellvi.data.simulate(n_cells=200, n_genes=60, n_batches=2, n_cell_types=2, seed=0)
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = SCVI(adata, n_hidden=16, n_latent=4, **options)
    with cellvi.settings.override(progress_bar_style="none"):
        model.train(max_epochs=3, save_resume_checkpoint=False)
    return model


@pytest.fixture(scope="module")
def poisson(tmp_path_factory):
    with cellvi.settings.override(logging_dir=tmp_path_factory.mktemp("runs")):
        return _fit(gene_likelihood="poisson")


@pytest.mark.filterwarnings(COLLAPSE)
def test_importance_weights_of_a_poisson_model(poisson):
    """A Poisson model has no dispersion θ; importance resampling must not need one."""
    cells = np.arange(40)
    rho = poisson.get_normalized_expression(
        indices=cells, n_samples_overall=50, weights="importance", **IMPORTANCE
    )
    assert rho.shape == (50, 60)
    assert np.isfinite(rho).all() and np.allclose(rho.sum(1), 1, atol=1e-4)
    table = poisson.differential_expression(
        idx1=np.arange(30),
        idx2=np.arange(30, 60),
        n_samples_overall=100,
        weights="importance",
        importance_weighting_kwargs=IMPORTANCE,
    )
    assert table.shape[0] == 60 and np.isfinite(table["bayes_factor"]).all()
