"""The posterior mean of a logistic-normal latent: deterministic, batch-invariant, accurate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cellvi
from cellvi.analysis._latent import normal_points
from cellvi.model import SCVI


@pytest.fixture(scope="module")
def ln_model():
    adata = cellvi.data.simulate(n_cells=300, n_genes=60, n_batches=3, n_cell_types=3, seed=2)
    SCVI.setup_anndata(adata, batch_key="batch")
    with cellvi.settings.override(progress_bar_style="none", seed=0):
        model = SCVI(adata, n_latent=4, latent_distribution="ln")
        model.train(max_epochs=3, save_resume_checkpoint=False)
    return model


def test_the_mean_does_not_depend_on_the_call_the_batching_or_the_storage(ln_model):
    z = ln_model.get_latent_representation()
    assert np.array_equal(z, ln_model.get_latent_representation())
    assert np.allclose(z, ln_model.get_latent_representation(batch_size=37), atol=1e-6)
    subset = np.arange(120, 250)
    assert np.allclose(z[subset], ln_model.get_latent_representation(indices=subset), atol=1e-6)
    dense = ln_model.adata.copy()
    dense.X = np.asarray(dense.X.toarray(), dtype=np.float32)
    assert np.allclose(z, ln_model.get_latent_representation(dense), atol=1e-6)
    assert np.allclose(z.sum(1), 1.0, atol=1e-5) and (z > 0).all()


def test_the_mean_is_close_to_the_exact_logistic_normal_mean(ln_model):
    mu, var = (torch.from_numpy(v) for v in ln_model.get_latent_representation(return_dist=True))
    gen = torch.Generator().manual_seed(1)
    # 300k independent draws: the reference is good to about 1e-3
    chunks = [
        torch.softmax(mu + var.sqrt() * torch.randn(20_000, *mu.shape, generator=gen), -1).mean(0)
        for _ in range(15)
    ]
    exact = torch.stack(chunks).mean(0).numpy()
    error = np.abs(ln_model.get_latent_representation() - exact).max()
    # 5,000 independent draws miss by about 1e-2 here; the quasi-random points by about 1e-3
    assert error < 4e-3, error


def test_normal_points_are_standard_normal_and_reproducible():
    pts = normal_points(8192, 3)
    assert torch.equal(pts, normal_points(8192, 3)) and torch.isfinite(pts).all()
    assert torch.allclose(pts.mean(0), torch.zeros(3), atol=1e-3)
    assert torch.allclose(pts.std(0), torch.ones(3), atol=2e-3)
    assert not torch.equal(pts, normal_points(8192, 3, seed=1))


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_a_bad_sample_count_is_named(ln_model, bad):
    with pytest.raises((ValueError, TypeError), match="mc_samples"):
        ln_model.get_latent_representation(mc_samples=bad)


def test_marginal_likelihood_of_a_logistic_normal_model_is_estimated_in_the_gaussian_space(
    ln_model,
):
    idx = np.arange(200)
    elbo = ln_model.get_elbo(indices=idx)
    # one importance draw is an unbiased estimate of the ELBO (the KL lives in u-space) ...
    one = ln_model.get_marginal_ll(indices=idx, n_mc_samples=1, return_mean=False)
    spread = one.std() / np.sqrt(len(one))
    assert abs(one.mean() - elbo) < 4 * spread, (one.mean(), elbo, spread)
    # ... and many draws tighten it towards log p(x)
    many = ln_model.get_marginal_ll(indices=idx, n_mc_samples=200, n_mc_samples_per_pass=50)
    assert many > elbo


def test_importance_weighted_de_runs_on_a_logistic_normal_model(ln_model):
    de = ln_model.differential_expression(
        groupby="cell_type",
        group1="type_0",
        mode="change",
        weights="importance",
        importance_weighting_kwargs={"max_cells": 64, "n_mc_samples": 50},
    )
    assert len(de) == ln_model.adata.n_vars and np.isfinite(de["proba_de"]).all()
