"""Library sizes and the gene-gene correlation of denoised expression (``analysis.md`` §3)."""

from __future__ import annotations

import numpy as np
import pytest

import cellvi
from cellvi.errors import CellviWarning
from cellvi.model import SCVI


@pytest.fixture(scope="module")
def sim():
    return cellvi.data.simulate(
        n_cells=600, n_genes=80, n_batches=2, n_cell_types=3, n_de_genes_per_type=8, seed=4
    )


def _trained(adata, **kwargs):
    adata = adata.copy()
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=4, **kwargs)
    with cellvi.settings.override(progress_bar_style="none"):
        model.train(max_epochs=25, save_resume_checkpoint=False)
    return model


def test_observed_library_is_the_total_count(sim):
    model = _trained(sim)
    lib = model.get_latent_library_size(give_mean=False)
    totals = np.asarray(model.adata.X.sum(1)).reshape(-1, 1)
    assert lib.shape == (sim.n_obs, 1)
    np.testing.assert_allclose(lib, totals, rtol=1e-5)
    with pytest.raises(ValueError, match="use_observed_lib_size=True"):
        model.get_latent_library_size(give_mean=True)


def test_with_size_factors_the_observed_library_is_still_the_total_count(sim):
    adata = sim.copy()
    totals = np.asarray(adata.X.sum(1)).reshape(-1, 1)
    adata.obs["sf"] = totals.ravel() / totals.mean()
    SCVI.setup_anndata(adata, batch_key="batch", size_factor_key="sf")
    model = SCVI(adata, n_latent=4)  # untrained: the totals do not depend on the weights
    with pytest.warns(CellviWarning, match="has not been trained"):
        lib = model.get_latent_library_size(give_mean=False, indices=np.arange(30))
    np.testing.assert_allclose(lib, totals[:30], rtol=1e-5)  # it returned the size factors


def test_learned_library_mean_tracks_the_total_count(sim):
    model = _trained(sim, use_observed_lib_size=False)
    mean = model.get_latent_library_size(give_mean=True)
    draw = model.get_latent_library_size(give_mean=False, indices=np.arange(50))
    totals = np.asarray(model.adata.X.sum(1)).ravel()
    assert mean.shape == (sim.n_obs, 1) and draw.shape == (50, 1)
    assert (mean > 0).all() and (draw > 0).all()
    assert np.corrcoef(np.log(mean.ravel()), np.log(totals))[0, 1] > 0.8


@pytest.mark.parametrize("kind", ["spearman", "pearson"])
def test_markers_of_one_type_correlate_more_than_markers_of_two(sim, kind):
    model = _trained(sim)
    corr = model.get_feature_correlation_matrix(
        n_samples=3, correlation_type=kind, transform_batch=["batch_0", "batch_1"]
    )
    genes = model.adata.var_names
    assert corr.shape == (len(genes), len(genes)) and list(corr.index) == list(genes)
    np.testing.assert_allclose(np.diag(corr), 1.0, atol=1e-6)
    np.testing.assert_allclose(corr.to_numpy(), corr.to_numpy().T, atol=1e-6)
    lfc = model.adata.varm["true_lfc"]
    up = {t: np.flatnonzero(lfc[t].to_numpy() > 1) for t in ("type_0", "type_1")}
    c = corr.to_numpy()
    within = np.mean([c[i, j] for i in up["type_0"] for j in up["type_0"] if i != j])
    across = np.mean([c[i, j] for i in up["type_0"] for j in up["type_1"]])
    # the Gamma draws carry the count model's own noise (CV 1/sqrt(θ)), so the shared type
    # signal is a modest but clear excess (measured 0.055 within vs -0.047 across)
    assert within > 0 and within > across + 0.05
    with pytest.raises(ValueError, match="correlation_type='kendall'"):
        model.get_feature_correlation_matrix(correlation_type="kendall")


def test_batch_representation_is_each_cells_learned_batch_embedding(sim):
    adata = sim.copy()
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(
        adata,
        n_latent=4,
        batch_representation="embedding",
        batch_embedding_kwargs={"embedding_dim": 3},
    )
    with cellvi.settings.override(progress_bar_style="none"):
        model.train(max_epochs=2, save_resume_checkpoint=False)
    rep = model.get_batch_representation(indices=np.arange(40))
    codes = adata.obs["batch"].cat.codes.to_numpy()[:40]
    table = model.module.batch_embedding.weight.detach().numpy()
    assert rep.shape == (40, 3)
    np.testing.assert_array_equal(rep, table[codes])
    assert not np.allclose(table[0], table[1])  # the two batches differ
    one_hot = _trained(sim)
    with pytest.raises(ValueError, match="batch_representation='embedding'"):
        one_hot.get_batch_representation()
