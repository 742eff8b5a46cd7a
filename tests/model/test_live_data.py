"""Outputs read the AnnData as it is at the call: arrays replaced after training are used."""

from __future__ import annotations

import warnings

import numpy as np

import cellvi
from cellvi.model import SCVI


def test_outputs_follow_a_count_matrix_replaced_after_training():
    adata = cellvi.data.simulate(n_cells=300, n_genes=60, n_batches=2, n_cell_types=3, seed=0)
    adata.obs["depth"] = np.log(np.asarray(adata.X.sum(1)).ravel())
    SCVI.setup_anndata(adata, batch_key="batch", continuous_covariate_keys=["depth"])
    model = SCVI(adata, n_latent=3)
    with cellvi.settings.override(progress_bar_style="none"):
        model.train(max_epochs=3, save_resume_checkpoint=False)
    z0 = model.get_latent_representation()
    np.testing.assert_array_equal(model.get_latent_representation(), z0)  # reused as is
    store = model._tensor_store(model.adata_manager)
    assert model._tensor_store(model.adata_manager) is store  # not rebuilt per call

    adata.X = adata.X * 3  # the store read before training would still hold the old counts
    z1 = model.get_latent_representation()
    assert np.abs(z1 - z0).max() > 0.05
    totals = np.asarray(adata.X.sum(1)).ravel()
    scaled = model.get_normalized_expression(library_size="latent", return_numpy=True)
    np.testing.assert_allclose(scaled.sum(1), totals, rtol=1e-4)
    # the covariates were copied at setup (as in scvi-tools): a later obs edit is not read
    adata.obs["depth"] = adata.obs["depth"] + 1.0
    np.testing.assert_array_equal(model.get_latent_representation(), z1)


def test_outputs_after_more_training_use_the_new_weights():
    # fused Adam updates weights without bumping their version counters: a first-layer block
    # cache kept across calls served the weights of before the second training
    adata = cellvi.data.simulate(n_cells=300, n_genes=60, n_batches=2, n_cell_types=3, seed=1)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=3)
    with cellvi.settings.override(progress_bar_style="none"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This SCVI is already trained")
        model.train(max_epochs=2, save_resume_checkpoint=False)
        before = model.get_latent_representation()
        model.train(max_epochs=2, save_resume_checkpoint=False)
    after = model.get_latent_representation()
    copy = SCVI(adata, n_latent=3)
    copy.module.load_state_dict(model.module.state_dict())
    copy.is_trained_ = True
    np.testing.assert_array_equal(after, copy.get_latent_representation())
    assert np.abs(after - before).max() > 0.05
