"""The simulator plants what it says and returns the truth."""

from __future__ import annotations

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

import cellvi
from cellvi.errors import InvalidDataError
from cellvi.simulate import synthetic_iid, true_pairwise_log2fc


def test_shapes_types_and_truth():
    adata = cellvi.data.simulate(n_cells=300, n_genes=120, n_batches=3, n_cell_types=4, seed=0)
    assert adata.shape == (300, 120) and sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.int32
    assert list(adata.obs["batch"].cat.categories) == ["batch_0", "batch_1", "batch_2"]
    assert adata.obs["cell_type"].value_counts().min() == 75
    assert adata.varm["true_lfc"].shape == (120, 4)
    assert np.asarray(adata.X.sum(1)).min() > 0
    assert adata.var["is_de"].sum() == 80


def test_same_seed_same_data_other_seed_other_data():
    a, b = (cellvi.data.simulate(n_cells=100, n_genes=80, seed=3) for _ in range(2))
    assert (a.X != b.X).nnz == 0
    assert (a.X != cellvi.data.simulate(n_cells=100, n_genes=80, seed=4).X).nnz > 0


def test_planted_markers_have_large_true_lfc():
    adata = cellvi.data.simulate(n_cells=100, n_genes=200, n_cell_types=3, seed=1)
    lfc = adata.varm["true_lfc"]
    for t, genes in adata.uns["simulation"]["de_genes"].items():
        # markers are scaled by 2^U(1,2); against the mean of two other types the log2 ratio
        # stays above ~0.4 even when the other types' values differ
        assert (lfc.loc[genes, t].abs() > 0.4).all()
    null = lfc.loc[~adata.var["is_de"]]
    assert null.abs().to_numpy().max() < 0.1  # only renormalisation moves non-markers


def test_counts_follow_the_planted_profiles():
    adata = cellvi.data.simulate(n_cells=3000, n_genes=100, batch_effect_sd=0.0, seed=2)
    x = adata.X.toarray() / adata.obs["true_library"].to_numpy()[:, None]
    profiles = adata.uns["simulation"]["type_profiles"]
    for t, name in enumerate(adata.obs["cell_type"].cat.categories):
        empirical = x[adata.obs["cell_type"] == name].mean(0)
        assert np.corrcoef(np.log(empirical + 1e-6), np.log(profiles[t]))[0, 1] > 0.95


def test_batch_effect_is_planted_only_when_asked():
    def batch_gap(sd):
        a = cellvi.data.simulate(
            n_cells=4000,
            n_genes=50,
            n_cell_types=1,
            n_de_genes_per_type=0,
            batch_effect_sd=sd,
            seed=3,
        )
        x = a.X.toarray() / a.obs["true_library"].to_numpy()[:, None]
        m = [x[a.obs["batch"] == b].mean(0) for b in a.obs["batch"].cat.categories]
        return np.abs(np.log(m[0] + 1e-4) - np.log(m[1] + 1e-4)).mean()

    assert batch_gap(0.5) > 2 * batch_gap(0.0)


def test_counts_are_overdispersed():
    adata = cellvi.data.simulate(
        n_cells=4000,
        n_genes=50,
        n_cell_types=1,
        n_de_genes_per_type=0,
        n_batches=1,
        library_size_log_sd=0.0,
        seed=4,
    )
    x = adata.X.toarray()
    top = x.mean(0).argsort()[-5:]
    assert (x[:, top].var(0) > 1.5 * x[:, top].mean(0)).all()


def test_zero_inflation_adds_zeros():
    base = cellvi.data.simulate(n_cells=500, n_genes=80, seed=5)
    zi = cellvi.data.simulate(n_cells=500, n_genes=80, zero_inflation=0.5, seed=5)
    zeros = lambda a: 1 - a.X.nnz / np.prod(a.shape)  # noqa: E731
    expected = zeros(base) + 0.5 * (1 - zeros(base))
    assert zeros(zi) == pytest.approx(expected, abs=0.03)


def test_argument_errors_name_argument():
    with pytest.raises(InvalidDataError, match="n_de_genes_per_type=30.*must be <= n_genes"):
        cellvi.data.simulate(n_genes=50, n_cell_types=2, n_de_genes_per_type=30)
    with pytest.raises(InvalidDataError, match=r"zero_inflation=1.0 .*\[0, 1\)"):
        cellvi.data.simulate(zero_inflation=1.0)


def test_h5ad_round_trip_keeps_truth(tmp_path):
    adata = cellvi.data.simulate(n_cells=50, n_genes=30, n_de_genes_per_type=4, seed=6)
    adata.write_h5ad(tmp_path / "sim.h5ad")
    back = anndata.read_h5ad(tmp_path / "sim.h5ad")
    np.testing.assert_allclose(back.varm["true_lfc"], adata.varm["true_lfc"])
    np.testing.assert_allclose(
        back.uns["simulation"]["type_profiles"], adata.uns["simulation"]["type_profiles"]
    )
    lfc = true_pairwise_log2fc(back, "type_0", "type_1")
    assert lfc.shape == (30,)


def test_synthetic_iid_layout_and_moments():
    adata = synthetic_iid(
        batch_size=500,
        n_genes=40,
        n_batches=2,
        sparse_format="csr_matrix",
        generate_coordinates=True,
    )
    assert adata.shape == (1000, 40) and sp.isspmatrix_csr(adata.X)
    assert (adata.obs["batch"].iloc[:500] == "batch_0").all()
    # NB(5, 0.3) mean 11.67, kept with probability 0.7
    assert adata.X.mean() == pytest.approx(11.67 * 0.7, rel=0.03)
    assert adata.obsm["protein_expression"].shape == (1000, 100)
    assert adata.obsm["coordinates"].shape == (1000, 2)
    assert list(adata.obs["labels"].cat.categories) == ["label_0", "label_1", "label_2"]


def test_synthetic_iid_mudata_needs_the_extra():
    try:
        import mudata  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'cellvi\[mudata\]'"):
            synthetic_iid(return_mudata=True)
    else:
        pytest.skip("mudata is installed, so the missing-extra error cannot occur")


def test_single_cell_type_plants_no_markers():
    adata = cellvi.data.simulate(n_cells=200, n_genes=60, n_cell_types=1, seed=0)
    assert not adata.var["is_de"].any()
    assert adata.uns["simulation"]["de_genes"] == {"type_0": []}
    # the single type's profile is the normalised base expression: nothing was planted
    base = adata.var["base_expression"].to_numpy()
    profile = adata.uns["simulation"]["type_profiles"][0]
    np.testing.assert_allclose(profile, base / base.sum())


def test_every_type_and_batch_gets_a_cell():
    adata = cellvi.data.simulate(
        n_cells=10,
        n_genes=30,
        n_batches=2,
        n_cell_types=3,
        n_de_genes_per_type=2,
        cell_type_proportions=[0.9, 0.05, 0.05],
        seed=0,
    )
    counts = adata.obs["cell_type"].value_counts()
    assert (counts >= 1).all() and counts.sum() == 10
    assert counts["type_0"] == 8
    with pytest.raises(cellvi.errors.InvalidDataError, match="n_cells=2 .*n_cells >= 3"):
        cellvi.data.simulate(n_cells=2, n_genes=30, n_cell_types=3, n_de_genes_per_type=2)
    # a zero share is a request for an empty type, so it does not count
    sparse_types = cellvi.data.simulate(
        n_cells=2,
        n_genes=30,
        n_batches=1,
        n_cell_types=3,
        n_de_genes_per_type=2,
        cell_type_proportions=[1, 0, 1],
    )
    assert sparse_types.obs["cell_type"].value_counts().tolist() == [1, 1, 0]
