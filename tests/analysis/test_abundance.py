"""Aggregated posteriors and differential abundance (scvi-tools' VAEMixin methods)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import distributions as dist

from cellvi.analysis import _abundance, mixture_log_prob


def _reference_log_prob(points, loc, scale, dof):
    loc, scale = loc.double(), scale.double()
    comp = dist.Normal(loc, scale) if dof is None else dist.StudentT(dof, loc, scale)
    weights = dist.Categorical(logits=torch.zeros(len(loc), dtype=torch.float64))
    mixture = dist.MixtureSameFamily(weights, dist.Independent(comp, 1))
    return mixture.log_prob(points.double())


@pytest.mark.parametrize("dof", [None, 3.0, 0.5])
def test_mixture_log_prob_matches_torch_mixture(dof, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    loc = torch.randn(57, 6, generator=gen)
    scale = torch.rand(57, 6, generator=gen) + 0.05
    points = 3 * torch.randn(40, 6, generator=gen)
    expected = _reference_log_prob(points, loc, scale, dof)
    assert torch.allclose(mixture_log_prob(points, loc, scale, dof), expected, atol=1e-9)
    # blocks of a few rows give the same values
    monkeypatch.setattr(_abundance, "_CHUNK_ELEMENTS", 300)
    assert torch.allclose(mixture_log_prob(points, loc, scale, dof), expected, atol=1e-9)


def test_mixture_log_prob_far_point_is_finite():
    loc, scale = torch.zeros(3, 2), torch.full((3, 2), 0.01)
    value = mixture_log_prob(torch.tensor([[50.0, -50.0]]), loc, scale)
    assert torch.isfinite(value).all() and value.item() < -1e6


def test_aggregated_posterior_is_the_cells_posteriors(fitted):
    idx = np.arange(0, 600, 7)
    mixture = fitted.get_aggregated_posterior(indices=idx)
    assert isinstance(mixture, dist.MixtureSameFamily)
    means, variances = fitted.get_latent_representation(indices=idx, return_dist=True)
    comp = mixture.component_distribution.base_dist
    assert isinstance(comp, dist.StudentT) and float(comp.df[0, 0]) == 3.0
    np.testing.assert_allclose(comp.loc.numpy(), means, rtol=1e-6)
    # the scale is the posterior's standard deviation (scvi-tools 1.4.2 passes the variance)
    np.testing.assert_allclose(comp.scale.numpy(), np.sqrt(variances), rtol=1e-6)
    assert mixture.mixture_distribution.probs.shape == (len(idx),)
    normal = fitted.get_aggregated_posterior(indices=idx, dof=None)
    assert isinstance(normal.component_distribution.base_dist, dist.Normal)
    at = torch.from_numpy(means[:5]).double()
    expected = mixture_log_prob(at, torch.from_numpy(means), torch.from_numpy(np.sqrt(variances)))
    assert torch.allclose(normal.log_prob(at), expected, atol=1e-8)


@pytest.mark.parametrize("dof", [0, -1.0, float("nan"), "3", True])
def test_aggregated_posterior_refuses_bad_dof(fitted, dof):
    with pytest.raises(ValueError, match="dof"):
        fitted.get_aggregated_posterior(indices=[0, 1], dof=dof)


def test_aggregated_posterior_of_no_cells_is_refused(fitted):
    with pytest.raises(ValueError, match="no cells"):
        fitted.get_aggregated_posterior(indices=np.array([], dtype=int))


@pytest.fixture
def donors(fitted):
    """The fitted model's data with six donors; cells of the first type only in d0-d2."""
    adata = fitted.adata.copy()
    rng = np.random.default_rng(0)
    types = adata.obs["cell_type"].astype(str).to_numpy()
    first = types == sorted(set(types))[0]
    donor = rng.integers(0, 6, adata.n_obs)
    donor[first] = rng.integers(0, 3, int(first.sum()))
    adata.obs["donor"] = pd.Categorical([f"d{d}" for d in donor])
    return adata, first


def test_differential_abundance_finds_a_type_missing_from_some_donors(fitted, donors):
    adata, first = donors
    da = fitted.differential_abundance(adata, sample_key="donor")
    assert da.shape == (adata.n_obs, 6)
    assert list(da.columns) == list(pd.unique(adata.obs["donor"].to_numpy()))
    assert da.index.equals(adata.obs_names)
    assert np.isfinite(da.to_numpy()).all()
    pd.testing.assert_frame_equal(adata.obsm["da_log_probs"], da)
    enrichment = da[["d0", "d1", "d2"]].mean(axis=1) - da[["d3", "d4", "d5"]].mean(axis=1)
    # the first type's region holds only d0-d2 cells: far more likely under their mixtures
    # (seed 0: medians 11.3 and -0.77; 100 % of the first type above every other cell)
    assert enrichment[first].median() > 5.0
    assert abs(enrichment[~first].median()) < 1.5
    assert (enrichment[first] > enrichment[~first].max()).mean() > 0.9


def test_differential_abundance_subsampled_posteriors_are_seeded(fitted, donors):
    adata, _ = donors
    full = fitted.differential_abundance(adata, sample_key="donor", dof=3.0)
    a = fitted.differential_abundance(adata, sample_key="donor", num_cells_posterior=20, dof=3.0)
    b = fitted.differential_abundance(adata, sample_key="donor", num_cells_posterior=20, dof=3.0)
    c = fitted.differential_abundance(
        adata, sample_key="donor", num_cells_posterior=20, dof=3.0, seed=1
    )
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a.to_numpy(), c.to_numpy())
    assert not np.allclose(a.to_numpy(), full.to_numpy())
    # a cap above every sample's size changes nothing
    same = fitted.differential_abundance(
        adata, sample_key="donor", num_cells_posterior=10_000, dof=3.0
    )
    pd.testing.assert_frame_equal(same, full)


def test_differential_abundance_integer_samples_write_to_h5ad(fitted, tmp_path):
    adata = fitted.adata.copy()
    adata.obs["sample"] = np.arange(adata.n_obs) % 3 + 10
    da = fitted.differential_abundance(adata, sample_key="sample")
    assert list(da.columns) == [10, 11, 12]
    assert list(adata.obsm["da_log_probs"].columns) == ["10", "11", "12"]
    adata.write_h5ad(tmp_path / "da.h5ad")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "sample_key="),
        ({"sample_key": "nope"}, KeyError, "not a column of adata.obs"),
        ({"sample_key": "donor", "num_cells_posterior": 0}, ValueError, "num_cells_posterior"),
        ({"sample_key": "donor", "dof": -2}, ValueError, "dof"),
    ],
)
def test_differential_abundance_refuses_bad_arguments(fitted, donors, kwargs, error, match):
    adata, _ = donors
    with pytest.raises(error, match=match):
        fitted.differential_abundance(adata, **kwargs)
    assert "da_log_probs" not in adata.obsm


def test_differential_abundance_refuses_missing_samples(fitted, donors):
    adata, _ = donors
    adata.obs["donor"] = adata.obs["donor"].astype(object)
    adata.obs.iloc[3, adata.obs.columns.get_loc("donor")] = np.nan
    with pytest.raises(ValueError, match="1 missing value"):
        fitted.differential_abundance(adata, sample_key="donor")
