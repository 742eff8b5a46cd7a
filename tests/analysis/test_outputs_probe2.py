"""Outputs and fit diagnostics of non-default models (SCANVI, learned library, covariates)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import cellvi
from cellvi.errors import CellviWarning
from cellvi.model import SCANVI


@pytest.fixture(scope="module")
def scanvi(tmp_path_factory):
    """SCANVI on 240 simulated cells (3 types, 2 batches, 40 genes), 30 % labeled."""
    adata = cellvi.data.simulate(
        n_cells=240, n_genes=40, n_batches=2, n_cell_types=3, n_de_genes_per_type=6, seed=1
    )
    rng = np.random.default_rng(0)
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[rng.random(adata.n_obs) < 0.7] = "Unknown"
    adata.obs["labels"] = pd.Categorical(labels)
    with cellvi.settings.override(
        logging_dir=tmp_path_factory.mktemp("runs"), progress_bar_style="none"
    ):
        SCANVI.setup_anndata(
            adata, labels_key="labels", unlabeled_category="Unknown", batch_key="batch"
        )
        model = SCANVI(adata, n_latent=4, n_hidden=32)
        model.train(max_epochs=15, plan_kwargs={"n_epochs_kl_warmup": 5})
    return model


def _mean_of_calls(fn, n: int) -> float:
    torch.manual_seed(0)
    return float(np.mean([fn() for _ in range(n)]))


def test_scanvi_marginal_ll_bounds_its_own_elbo(scanvi):
    # one importance draw is an unbiased estimate of the SCANVI ELBO's bound: on average it
    # is at least the ELBO (the N(0, I) prior on z1 used before gave ~3 nats less), and
    # more draws raise it
    elbo = _mean_of_calls(scanvi.get_elbo, 10)
    one = _mean_of_calls(lambda: scanvi.get_marginal_ll(n_mc_samples=1), 10)
    many = scanvi.get_marginal_ll(n_mc_samples=200, n_mc_samples_per_pass=50)
    assert one > elbo - 0.5
    assert many > one + 1.0


def test_scanvi_marginal_ll_depends_on_the_hierarchical_prior(scanvi):
    # p(z1 | z2, y) is part of the SCANVI model, so changing it changes log p(x)
    idx = np.arange(40)
    torch.manual_seed(0)
    before = scanvi.get_marginal_ll(indices=idx, n_mc_samples=20, return_mean=False)
    bias = scanvi.module.pz1_mean.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.add_(3.0)
        torch.manual_seed(0)
        after = scanvi.get_marginal_ll(indices=idx, n_mc_samples=20, return_mean=False)
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert before.shape == after.shape == (40,)
    assert after.mean() < before.mean() - 2.0
    assert np.mean(after < before) > 0.9


def test_scanvi_importance_weights_use_the_prior_of_its_marginal_ll(scanvi):
    # the draws' prior term and the anchors' log p(x) come from the same (hierarchical)
    # prior, so resampled rows are decoded frequencies of the group
    from cellvi.analysis import _importance

    cells = np.arange(60)

    def resample():
        with warnings.catch_warnings():  # a 15-epoch model's weights may collapse (warned)
            warnings.simplefilter("ignore", CellviWarning)
            return _importance.importance_resample(
                scanvi, None, cells, None, 120, seed=0, max_cells=30, n_mc_samples=10
            )

    rho = resample()
    assert rho.shape == (120, scanvi.adata.n_vars)
    np.testing.assert_allclose(rho.sum(1), 1.0, rtol=1e-4)
    # p(z1 | z2, y) enters the weights: shifting it changes the resampled rows (under the
    # N(0, I) prior used before, they did not move)
    bias = scanvi.module.pz1_mean.bias
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.add_(3.0)
        shifted = resample()
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert not np.allclose(shifted, rho)
    draws = {"z": torch.zeros(3, 4)}
    log_pz = _importance.log_prior_z(scanvi.module, draws["z"], draws["z"])
    assert log_pz.shape == (3,) and torch.isfinite(log_pz).all()


def test_scanvi_predictions_and_outputs_on_selected_cells(scanvi):
    idx = np.flatnonzero(scanvi.adata.obs["labels"].to_numpy() == "Unknown")[:25]
    soft = scanvi.predict(indices=idx, soft=True)
    hard = scanvi.predict(indices=idx)
    assert list(soft.index) == list(scanvi.adata.obs_names[idx])
    assert sorted(soft.columns) == ["type_0", "type_1", "type_2"]
    np.testing.assert_allclose(soft.to_numpy().sum(1), 1.0, rtol=1e-5)
    assert (soft.columns[soft.to_numpy().argmax(1)] == hard).all()
    elbo = scanvi.get_elbo(indices=idx, return_mean=False)
    mll = scanvi.get_marginal_ll(indices=idx, n_mc_samples=5, return_mean=False, batch_size=7)
    assert elbo.shape == mll.shape == (25,)
    rec = scanvi.get_reconstruction_error(indices=idx, batch_size=7)["reconstruction_loss"]
    assert np.isfinite(rec)
