"""DE's optional machinery (analysis.md §4.1-4.4): outlier filtering, permutation pairs,
custom change functions and regions, credible intervals."""

from __future__ import annotations

import numpy as np
import pytest

from cellvi.analysis import credible_intervals, get_latent_representation, robust_inliers
from cellvi.simulate import true_pairwise_log2fc

GROUPS = dict(groupby="cell_type", group1="type_0", group2="type_1")


def _auroc(scores, positive) -> float:
    order = np.argsort(np.argsort(scores)) + 1
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((order[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _log_fold(x, y, pc):
    return np.log2(x + pc) - np.log2(y + pc)


def test_credible_intervals_are_the_narrowest_windows():
    rng = np.random.default_rng(0)
    rows = np.sort(rng.gamma(2.0, size=(20, 101)), axis=1)
    for level in (0.5, 0.9):
        low, high = credible_intervals(rows, level)
        k = int(np.floor(level * rows.shape[1]))
        for row, lo, hi in zip(rows, low, high, strict=True):
            widths = row[k:] - row[: len(row) - k]  # every window of k gaps, brute force
            assert hi - lo == pytest.approx(widths.min())
            assert ((row >= lo) & (row <= hi)).sum() >= k + 1


def test_robust_inliers_flag_planted_outliers_and_refuse_tiny_groups():
    rng = np.random.default_rng(1)
    cov = np.diag(np.linspace(0.5, 2.0, 10))
    cloud = rng.multivariate_normal(np.zeros(10), cov, size=900)
    far = rng.normal(0, 1, size=(50, 10)) + 12  # 5 % of the points, far away
    keep = robust_inliers(np.vstack([cloud, far]))
    assert not keep[900:].any()
    assert 0.85 <= keep[:900].mean() <= 0.97  # the 10 % contamination rule takes ~5 % more
    assert robust_inliers(rng.normal(size=(15, 10))) is None  # fewer than 2 (p + 1) points


def test_filter_outlier_cells_uses_the_inliers_of_each_group(fitted):
    plain = fitted.differential_expression(**GROUPS, mode="change")
    filtered = fitted.differential_expression(**GROUPS, mode="change", filter_outlier_cells=True)
    cells = np.flatnonzero(fitted.adata.obs["cell_type"] == "type_0")
    keep = robust_inliers(get_latent_representation(fitted, None, cells))
    assert 0.85 <= keep.mean() <= 0.92
    counts = fitted.adata.X[cells[keep]]
    expected = np.asarray(counts.mean(0)).ravel()
    names = fitted.adata.var_names
    assert np.allclose(filtered.loc[names, "raw_mean1"], expected, rtol=1e-5)
    assert not np.allclose(plain.loc[names, "raw_mean1"], expected, rtol=1e-5)
    lfc = true_pairwise_log2fc(fitted.adata, "type_0", "type_1")
    de, null = (lfc.abs() > 1).to_numpy(), (lfc.abs() < 0.3).to_numpy()
    scores = filtered.loc[lfc.index, "proba_de"].to_numpy()
    assert _auroc(scores[de | null], de[de | null]) >= 0.95


@pytest.mark.parametrize("batch_correction", [False, True])
def test_permutation_pairs_give_the_same_answer_from_m_random_pairs(fitted, batch_correction):
    kwargs = dict(GROUPS, batch_correction=batch_correction)
    paired = fitted.differential_expression(**kwargs)
    permuted = fitted.differential_expression(**kwargs, use_permutation=True, m_permutation=1000)
    scaled = permuted["proba_m1"].to_numpy() * 1000  # fractions of exactly 1000 pairs
    assert np.allclose(scaled, np.round(scaled), atol=1e-6)
    p, q = paired["proba_m1"], permuted.loc[paired.index, "proba_m1"]
    assert np.abs(p - q).max() < 0.08  # binomial noise of 1000 pairs
    assert np.allclose(paired["scale1"], permuted.loc[paired.index, "scale1"])


def test_custom_change_fn_and_region_reproduce_the_defaults(fitted):
    default = fitted.differential_expression(**GROUPS, mode="change", delta=0.5)
    custom = fitted.differential_expression(
        **GROUPS, mode="change", delta=0.5, change_fn=_log_fold
    ).loc[default.index]
    for column in ("proba_de", "lfc_mean", "lfc_median", "lfc_min", "lfc_max", "pseudocounts"):
        assert np.allclose(default[column], custom[column], atol=1e-4), column
    region = fitted.differential_expression(
        **GROUPS, mode="change", delta=1.0, m1_domain_fn=lambda r: (r >= 1.0, r < -1.0)
    )
    by_delta = fitted.differential_expression(**GROUPS, mode="change", delta=1.0)
    # the custom path computes the log fold changes in another order: a draw within float32
    # rounding of the boundary may fall on either side (1e-4 per draw of the 10,000)
    assert np.allclose(region.loc[by_delta.index, "proba_de"], by_delta["proba_de"], atol=2.5e-4)
    # a region that is never hit: nothing is DE
    never = fitted.differential_expression(
        **GROUPS, mode="change", m1_domain_fn=lambda r: (r > np.inf, r < -np.inf)
    )
    assert (never["proba_de"] == 0).all() and not never["is_de_fdr_0.05"].any()


def test_bad_custom_functions_fail_before_sampling(fitted):
    with pytest.raises(ValueError, match="change_fn must take exactly 3"):
        fitted.differential_expression(**GROUPS, mode="change", change_fn=lambda x, y: x - y)
    with pytest.raises(ValueError, match="m1_domain_fn must take exactly 1"):
        fitted.differential_expression(**GROUPS, mode="change", m1_domain_fn=lambda a, b: a)
    with pytest.raises(ValueError, match="change_fn='ratio'"):
        fitted.differential_expression(**GROUPS, mode="change", change_fn="ratio")
    with pytest.raises(ValueError, match="change_fn returned shape"):
        fitted.differential_expression(
            **GROUPS, mode="change", change_fn=lambda x, y, pc: (x - y).mean(0)
        )
    with pytest.raises(ValueError, match="cred_interval_lvls"):
        fitted.differential_expression(**GROUPS, mode="change", cred_interval_lvls=[0.9, 1.5])
    with pytest.raises(ValueError, match="m_permutation"):
        fitted.differential_expression(**GROUPS, use_permutation=True, m_permutation=0)


def test_credible_interval_columns_bracket_the_lfc(fitted):
    table = fitted.differential_expression(**GROUPS, mode="change", cred_interval_lvls=[0.5, 0.9])
    lo50, hi50 = table["lfc_confidence_interval_0.5_min"], table["lfc_confidence_interval_0.5_max"]
    lo90, hi90 = table["lfc_confidence_interval_0.9_min"], table["lfc_confidence_interval_0.9_max"]
    assert (table["lfc_min"] <= lo90).all() and (hi90 <= table["lfc_max"]).all()
    assert ((hi90 - lo90) >= (hi50 - lo50) - 1e-6).all()
    inside = (lo90 <= table["lfc_median"]) & (table["lfc_median"] <= hi90)
    assert inside.mean() >= 0.99
    # the same columns from the whole-array path of a custom change function
    custom = fitted.differential_expression(
        **GROUPS, mode="change", cred_interval_lvls=[0.5, 0.9], change_fn=_log_fold
    ).loc[table.index]
    assert np.allclose(custom["lfc_confidence_interval_0.9_min"], lo90, atol=1e-4)


def test_pairwise_likelihood_equals_the_elementwise_densities():
    import torch

    from cellvi.analysis._importance import pairwise_log_likelihood
    from cellvi.distributions import log_nb_positive, log_zinb_positive

    torch.manual_seed(0)
    x = torch.poisson(torch.rand(5, 30) * 3)
    log_rho = torch.log_softmax(torch.randn(7, 30), -1)
    zl = torch.randn(7, 30)
    for theta in (torch.rand(30) + 0.5, torch.rand(7, 30) + 0.5):  # per gene, per draw
        for lik in ("zinb", "nb", "poisson"):
            got = pairwise_log_likelihood(lik, x, log_rho, theta, zl if lik == "zinb" else None)
            for s in range(7):
                th = theta if theta.dim() == 1 else theta[s]
                for a in range(5):
                    mu = log_rho[s].exp() * x[a].sum()
                    if lik == "zinb":
                        want = log_zinb_positive(x[a], mu, th, zl[s]).sum()
                    elif lik == "nb":
                        want = log_nb_positive(x[a], mu, th).sum()
                    else:
                        want = torch.distributions.Poisson(mu).log_prob(x[a]).sum()
                    assert float(got[s, a]) == pytest.approx(float(want), abs=1e-3), (lik, s, a)


IMPORTANCE = dict(max_cells=64, n_mc_samples=50, n_mc_samples_per_pass=25)


def test_importance_weighted_expression_and_de(fitted):
    cells = np.flatnonzero(fitted.adata.obs["cell_type"] == "type_0")
    uniform = fitted.get_normalized_expression(indices=cells, n_samples_overall=2000)
    weighted = fitted.get_normalized_expression(
        indices=cells, n_samples_overall=2000, weights="importance", **IMPORTANCE
    )
    assert weighted.shape == (2000, fitted.adata.n_vars)
    assert np.allclose(weighted.sum(1), 1, atol=1e-4)  # rows are ρ
    again = fitted.get_normalized_expression(
        indices=cells, n_samples_overall=2000, weights="importance", **IMPORTANCE
    )
    assert np.array_equal(weighted, again)
    # the re-weighted draws still describe the same group
    assert np.corrcoef(np.log(weighted.mean(0)), np.log(uniform.mean(0)))[0, 1] > 0.99
    table = fitted.differential_expression(
        **GROUPS, mode="change", weights="importance", importance_weighting_kwargs=IMPORTANCE
    )
    lfc = true_pairwise_log2fc(fitted.adata, "type_0", "type_1")
    de, null = (lfc.abs() > 1).to_numpy(), (lfc.abs() < 0.3).to_numpy()
    scores = table.loc[lfc.index, "proba_de"].to_numpy()
    assert _auroc(scores[de | null], de[de | null]) >= 0.95
    assert np.corrcoef(table.loc[lfc.index, "lfc_mean"], lfc)[0, 1] >= 0.9


def test_importance_weights_concentrate_and_truncation_spreads_them(fitted):
    from cellvi.analysis import _importance

    cells = np.flatnonzero(fitted.adata.obs["cell_type"] == "type_0")
    seen = {}
    original = _importance.get_importance_weights

    def spy(*args, **kwargs):
        seen.setdefault("w", []).append(original(*args, **kwargs))
        return seen["w"][-1]

    _importance.get_importance_weights = spy
    try:
        for truncation in (False, True):
            _importance.importance_resample(
                fitted, None, cells, None, 1000, seed=0, truncation=truncation, **IMPORTANCE
            )
    finally:
        _importance.get_importance_weights = original
    plain, truncated = seen["w"]
    n = len(plain)
    assert n == (1000 // len(cells) + 1) * len(cells)
    for w in (plain, truncated):
        assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    # effective sample size: truncation raises the smallest weights towards the mean
    ess = [1 / np.sum(w**2) for w in (plain, truncated)]
    assert ess[0] < 0.9 * n  # the weights are not uniform
    assert ess[1] >= ess[0] and truncated.min() >= plain.min()
    assert (truncated == truncated.min()).sum() > 1  # the clamped ones share the floor
    assert truncated.min() <= 1 / n


def test_importance_weighting_refuses_what_it_cannot_do(fitted):
    cells = np.flatnonzero(fitted.adata.obs["cell_type"] == "type_0")
    kw = dict(indices=cells, n_samples_overall=100)
    with pytest.raises(ValueError, match="single transform_batch"):
        fitted.get_normalized_expression(
            **kw, weights="importance", transform_batch=["batch_0", "batch_1"]
        )
    with pytest.raises(ValueError, match="needs n_samples_overall"):
        fitted.get_normalized_expression(indices=cells, weights="importance")
    with pytest.raises(TypeError, match="max_cell"):
        fitted.get_normalized_expression(**kw, weights="importance", max_cell=10)
    with pytest.raises(ValueError, match="need weights='importance'"):
        fitted.get_normalized_expression(**kw, max_cells=10)
    with pytest.raises(ValueError, match="need weights='importance'"):
        fitted.differential_expression(**GROUPS, importance_weighting_kwargs={"max_cells": 9})


def test_collapsed_importance_weights_warn(fitted, monkeypatch):
    from cellvi.analysis import _importance
    from cellvi.errors import CellviWarning

    original = _importance.pairwise_log_likelihood

    def one_draw_fits(*args):  # the first draw explains every anchor far better
        ll = original(*args)
        ll[0] += 1000.0
        return ll

    monkeypatch.setattr(_importance, "pairwise_log_likelihood", one_draw_fits)
    cells = np.flatnonzero(fitted.adata.obs["cell_type"] == "type_0")
    with pytest.warns(CellviWarning, match=r"collapsed onto about 1\.0 of"):
        rows = fitted.get_normalized_expression(
            indices=cells, n_samples_overall=300, weights="importance", **IMPORTANCE
        )
    assert np.allclose(rows, rows[0])  # every resampled row is that draw
