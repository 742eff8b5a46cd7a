"""Probes of the simulator's argument checks and truth, synthetic_iid parity and the scores."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest

import cellvi
from cellvi.analysis import (
    adjusted_rand_index,
    batch_mixing,
    kmeans,
    knn_indices,
    knn_label_accuracy,
    normalized_mutual_info,
)
from cellvi.errors import InvalidDataError
from cellvi.simulate import synthetic_iid

SMALL = {"n_cells": 40, "n_genes": 30, "n_de_genes_per_type": 2}


# --- simulate: arguments -------------------------------------------------------------------


def test_numpy_integer_sizes_and_seed_are_accepted():
    a = cellvi.data.simulate(
        n_cells=np.int64(40),
        n_genes=np.int32(30),
        n_de_genes_per_type=np.int64(2),
        seed=np.int64(2),
    )
    b = cellvi.data.simulate(seed=2, **SMALL)
    assert (a.X != b.X).nnz == 0
    assert type(a.uns["simulation"]["seed"]) is int


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_cells": True}, "n_cells"),
        ({"n_de_genes_per_type": 2.5}, "n_de_genes_per_type"),
        ({"n_de_genes_per_type": "3"}, "n_de_genes_per_type"),
        ({"de_log2fc_range": (1.0,)}, "de_log2fc_range"),
        ({"de_log2fc_range": (1.0, np.inf)}, "de_log2fc_range"),
        ({"de_log2fc_range": (1000.0, 2000.0)}, "de_log2fc_range"),
        ({"batch_effect_sd": np.inf}, "batch_effect_sd"),
        ({"batch_effect_sd": "0.3"}, "batch_effect_sd"),
        ({"library_size_log_mean": np.nan}, "library_size_log_mean"),
        ({"library_size_log_mean": -np.inf}, "library_size_log_mean"),
        ({"library_size_log_sd": np.inf}, "library_size_log_sd"),
        ({"dispersion_range": (1.0, np.inf)}, "dispersion_range"),
        ({"cell_type_proportions": [1, np.inf, 1]}, "cell_type_proportions"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bad_arguments_raise_invalid_data_error_naming_them(kwargs, name):
    with pytest.raises(InvalidDataError, match=name):
        cellvi.data.simulate(**{**SMALL, **kwargs})


def test_huge_libraries_raise_instead_of_wrapping_to_negative_counts():
    # e^25 ~ 7e10 reads per cell: counts past 2^31 used to wrap silently to negative int32
    with pytest.raises(InvalidDataError, match="library_size_log_mean.*int32"):
        cellvi.data.simulate(library_size_log_mean=25.0, **SMALL)
    ok = cellvi.data.simulate(library_size_log_mean=float(np.log(1e7)), **SMALL)
    assert ok.X.min() >= 0 and ok.X.max() > 1e5


def test_uns_records_every_argument_and_rebuilds_the_data(tmp_path):
    kwargs = {
        "n_cells": 60,
        "n_genes": 40,
        "n_batches": 3,
        "n_cell_types": 2,
        "n_de_genes_per_type": 4,
        "cell_type_proportions": [1.0, 3.0],
        "zero_inflation": 0.2,
        "seed": 5,
    }
    adata = cellvi.data.simulate(**kwargs)
    adata.write_h5ad(tmp_path / "sim.h5ad")
    sim = dict(anndata.read_h5ad(tmp_path / "sim.h5ad").uns["simulation"])
    for key in ("type_profiles", "batch_factors", "de_genes"):
        sim.pop(key)
    sim = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in sim.items()}
    sim = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in sim.items()}
    again = cellvi.data.simulate(**sim)
    assert (again.X != adata.X).nnz == 0
    assert again.obs.equals(adata.obs)


# --- simulate: statistics against the stored truth ------------------------------------------


def test_counts_mean_is_library_times_batch_rate():
    a = cellvi.data.simulate(n_cells=12000, n_genes=100, seed=11)
    sim = a.uns["simulation"]
    rho = sim["type_profiles"][:, None, :] * sim["batch_factors"][None]
    rho /= rho.sum(2, keepdims=True)
    t, b = a.obs["cell_type"].cat.codes.to_numpy(), a.obs["batch"].cat.codes.to_numpy()
    mu = a.obs["true_library"].to_numpy()[:, None] * rho[t, b]
    x = a.X.toarray()
    var = mu + mu**2 / a.var["true_dispersion"].to_numpy()
    for group in np.unique(t * 10 + b):
        m = t * 10 + b == group
        z = (x[m].mean(0) - mu[m].mean(0)) / np.sqrt(var[m].mean(0) / m.sum())
        # 100 genes x 6 groups of independent z-scores: |z| > 4.5 has probability ~4e-3
        assert np.abs(z).max() < 4.5


def test_empirical_type_log_fold_changes_match_true_lfc():
    a = cellvi.data.simulate(n_cells=12000, n_genes=100, batch_effect_sd=0.0, seed=12)
    x = a.X.toarray() / a.obs["true_library"].to_numpy()[:, None]
    types = a.obs["cell_type"].to_numpy()
    means = {t: x[types == t].mean(0) for t in a.obs["cell_type"].cat.categories}
    expressed = a.uns["simulation"]["type_profiles"].min(0) * 1000 > 0.5
    for t, m in means.items():
        rest = np.mean([v for s, v in means.items() if s != t], axis=0)
        err = np.log2(m / rest) - a.varm["true_lfc"][t].to_numpy()
        assert np.abs(err[expressed]).max() < 0.15
    markers = sum(a.uns["simulation"]["de_genes"].values(), [])
    assert len(markers) == len(set(markers)) == a.var["is_de"].sum()


# --- synthetic_iid ---------------------------------------------------------------------------


def test_synthetic_iid_n_labels_zero_leaves_out_labels_as_scvi_tools():
    adata = synthetic_iid(batch_size=10, n_genes=5, n_labels=0)
    assert list(adata.obs.columns) == ["batch"]


@pytest.mark.parametrize("kwargs", [{"n_batches": 0}, {"batch_size": 0}, {"n_genes": 0}])
def test_synthetic_iid_rejects_empty_sizes(kwargs):
    with pytest.raises(InvalidDataError, match=next(iter(kwargs))):
        synthetic_iid(**kwargs)


# --- scores ----------------------------------------------------------------------------------


def test_ari_nmi_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        a, b = rng.integers(0, 4, n), rng.integers(0, 6, n)
        ref_ari, ref_nmi = (
            metrics.adjusted_rand_score(a, b),
            metrics.normalized_mutual_info_score(a, b),
        )
        assert adjusted_rand_index(a, b) == pytest.approx(ref_ari, abs=1e-12)
        assert normalized_mutual_info(a, b) == pytest.approx(ref_nmi, abs=1e-12)


def test_ari_of_a_single_cell_is_one():
    assert adjusted_rand_index([0], [3]) == 1.0


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        ([0, 0, 1, 1], [0], "4 entries but labels_pred has 1"),
        ([0, 0, 1, 1], [0, 1, 1], "4 entries"),
        (np.array([0.0, 0.0, np.nan, 1.0]), [0, 0, 1, 1], "missing"),
        (pd.Categorical(["a", "a", None, "b"]), [0, 0, 1, 1], "missing"),
        (np.zeros((2, 2)), np.zeros((2, 2)), "1-D"),
    ],
)
def test_cluster_scores_refuse_bad_labels(a, b, match):
    for score in (adjusted_rand_index, normalized_mutual_info):
        with pytest.raises(InvalidDataError, match=match):
            score(a, b)


def test_knn_refuses_bad_k_and_non_finite_embedding():
    x = np.random.default_rng(0).normal(size=(10, 2))
    labels = np.arange(10) % 2
    for k in (0, -1, 10):
        with pytest.raises(InvalidDataError, match="k="):
            knn_label_accuracy(x, labels, k=k)
    x[3, 0] = np.nan
    with pytest.raises(InvalidDataError, match="non-finite"):
        knn_label_accuracy(x, labels, k=3)
    with pytest.raises(InvalidDataError, match="labels has 5 entries"):
        knn_label_accuracy(np.zeros((10, 2)), labels[:5], k=3)


def test_knn_is_exact_far_from_the_origin():
    x = np.random.default_rng(1).normal(size=(300, 5))
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    exact = np.sort(np.argsort(d, 1)[:, :10], 1)
    # the expanded |a|^2 + |b|^2 - 2ab formula lost the digits at an offset of 1e7 (80 % right)
    assert (np.sort(knn_indices(x + 1e7, 10), 1) == exact).all()


def test_batch_mixing_bounds_and_single_batch():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(600, 5))
    batches = np.repeat(["b0", "b1"], 300)
    assert batch_mixing(x, batches) == pytest.approx(0.5, abs=0.06)
    separated = x + (batches == "b1")[:, None] * 100.0
    assert batch_mixing(separated, batches) == 1.0
    assert batch_mixing(separated, pd.Categorical(batches), np.repeat(["t"], 600)) == 1.0
    # one batch: nothing to mix, NaN as with cell types (was 1.0, "no mixing at all")
    assert np.isnan(batch_mixing(x, np.zeros(600)))
    assert np.isnan(batch_mixing(x, np.zeros(600), np.zeros(600)))


def test_kmeans_with_fewer_distinct_points_than_clusters():
    x = np.repeat([[0.0], [1.0]], 10, axis=0)
    codes = kmeans(x, 3, seed=0)
    assert adjusted_rand_index(np.repeat([0, 1], 10), codes) == 1.0
    with pytest.raises(InvalidDataError, match="n_clusters=3"):
        kmeans(x[:2], 3)
