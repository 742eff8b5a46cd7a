"""Outputs of a model trained in float64 (``precision="64-true"``)."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import cellvi
from cellvi.model import SCVI


@pytest.fixture(scope="module")
def model64():
    adata = cellvi.data.simulate(n_cells=200, n_genes=40, n_batches=2, n_cell_types=2, seed=4)
    adata.obs["depth"] = np.log(np.asarray(adata.X.sum(1)).ravel())
    SCVI.setup_anndata(adata, batch_key="batch", continuous_covariate_keys=["depth"])
    model = SCVI(adata, n_latent=3)
    with cellvi.settings.override(progress_bar_style="none"):
        model.train(max_epochs=2, precision="64-true", save_resume_checkpoint=False)
    return model


def test_training_in_float64_leaves_a_float64_module(model64):
    assert {p.dtype for p in model64.module.parameters()} == {torch.float64}


def test_every_output_of_a_float64_model_runs_on_float32_data(model64):
    n, g = model64.adata.n_obs, model64.adata.n_vars
    assert model64.get_latent_representation().shape == (n, 3)
    assert model64.get_latent_representation(give_mean=False).shape == (n, 3)
    assert model64.get_normalized_expression().shape == (n, g)
    assert model64.get_normalized_expression(n_samples=2, transform_batch=["batch_0"]).shape == (
        n,
        g,
    )
    assert np.isfinite(model64.get_elbo())
    assert np.isfinite(model64.get_reconstruction_error()["reconstruction_loss"])
    assert np.isfinite(model64.get_marginal_ll(n_mc_samples=3))
    assert model64.posterior_predictive_sample().shape == (n, g)
    assert set(model64.get_likelihood_parameters()) >= {"mean", "dispersions"}
    de = model64.differential_expression(groupby="cell_type", group1="type_0", mode="change")
    assert np.isfinite(de["proba_de"]).all()


def test_a_float64_model_gives_the_latent_space_of_its_float32_copy(model64):
    single = copy.copy(model64)
    single.module = copy.deepcopy(model64.module).float()
    z64 = model64.get_latent_representation()
    z32 = single.get_latent_representation()
    assert z64.dtype == np.float64
    np.testing.assert_allclose(z64, z32, atol=1e-4)


def test_scanvi_trained_in_float64_predicts():
    from cellvi.model import SCANVI

    adata = cellvi.data.simulate(n_cells=150, n_genes=50, n_batches=2, n_cell_types=2, seed=5)
    SCANVI.setup_anndata(
        adata, batch_key="batch", labels_key="cell_type", unlabeled_category="unknown"
    )
    model = SCANVI(adata, n_latent=3)
    with cellvi.settings.override(progress_bar_style="none"):
        model.train(max_epochs=2, precision="64-true", save_resume_checkpoint=False)
    assert len(model.predict()) == adata.n_obs
    assert np.isfinite(model.predict(soft=True).to_numpy()).all()
    assert model.get_latent_representation().dtype == np.float64


def test_outputs_of_a_bfloat16_model_are_float32_and_leave_it_bfloat16():
    adata = cellvi.data.simulate(n_cells=150, n_genes=50, n_batches=2, n_cell_types=2, seed=6)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=3)
    with cellvi.settings.override(progress_bar_style="none"):
        model.train(max_epochs=2, precision="bf16-true", save_resume_checkpoint=False)
    weights = {k: v.clone() for k, v in model.module.state_dict().items()}
    was_training = model.module.training
    z = model.get_latent_representation()
    assert z.dtype == np.float32 and np.isfinite(z).all()
    assert np.isfinite(model.get_reconstruction_error()["reconstruction_loss"])
    assert model.posterior_predictive_sample().shape == adata.shape
    assert model.get_likelihood_parameters()["mean"].dtype == np.float32
    after = model.module.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in weights.items())
    assert model.module.training == was_training


def test_training_again_at_the_default_precision_returns_the_weights_to_float32(model64):
    model = copy.deepcopy(model64)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    with cellvi.settings.override(progress_bar_style="none"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This SCVI is already trained")
        # float64 weights and float32 minibatches used to fail inside Lightning
        model.train(max_epochs=1, save_resume_checkpoint=False, plan_kwargs={"lr": 1e-12})
        assert {p.dtype for p in model.module.parameters()} == {torch.float32}
        for name, value in model.module.named_parameters():  # lr 1e-12: only the cast shows
            torch.testing.assert_close(value, before[name].float(), msg=name)
        model.train(max_epochs=1, precision="bf16-true", save_resume_checkpoint=False)
        assert {p.dtype for p in model.module.parameters()} == {torch.bfloat16}
        model.train(max_epochs=1, precision="bf16-mixed", save_resume_checkpoint=False)
    assert {p.dtype for p in model.module.parameters()} == {torch.float32}
    assert np.isfinite(model.history["elbo_train"]["elbo_train"]).all()


def test_float16_training_keeps_finite_epoch_metrics():
    # an epoch's summed losses pass float16's largest value (65504) and read inf if they are
    # added up in float16; early stopping then quit after epoch 1 ("became non-finite")
    adata = cellvi.data.simulate(n_cells=1000, n_genes=100, n_batches=2, n_cell_types=3, seed=0)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=3)
    with cellvi.settings.override(progress_bar_style="none"):
        model.train(
            max_epochs=3, precision="16-true", early_stopping=True, save_resume_checkpoint=False
        )
    history = model.history
    assert len(history["elbo_train"]) == 3  # no early stop on a spurious inf
    for key in ("train_loss", "elbo_train", "validation_loss", "elbo_validation"):
        values = history[key][key].to_numpy()
        assert np.isfinite(values).all() and (values > 0).all(), key
    assert float(history["elbo_train"].iloc[0, 0]) * 900 > 65504  # the sum needs float32
