"""Outputs stored where the ecosystem looks for them: scanpy's neighbours, UMAP and Leiden run
directly on ``obsm["X_scVI"]`` and on the normalized expression in ``layers``."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import scipy.sparse as sp

import cellvi
from cellvi.analysis import adjusted_rand_index
from cellvi.analysis._metrics import knn_label_accuracy
from cellvi.model import SCVI

sc = pytest.importorskip("scanpy")


@pytest.fixture(scope="module")
def trained():
    adata = cellvi.data.simulate(
        n_cells=1200, n_genes=200, n_batches=2, n_cell_types=4, n_de_genes_per_type=15, seed=3
    )
    cellvi.settings.seed = 0
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=8)
    with cellvi.settings.override(progress_bar_style="none"):
        model.train(max_epochs=40, save_resume_checkpoint=False)
    return adata, model


def test_scanpy_neighbors_umap_leiden_on_the_stored_latent(trained):
    adata, model = trained
    adata = adata.copy()
    adata.obsm["X_scVI"] = model.get_latent_representation()
    sc.pp.neighbors(adata, use_rep="X_scVI", n_neighbors=15, random_state=0)
    sc.tl.umap(adata, random_state=0)
    pytest.importorskip("igraph")
    sc.tl.leiden(
        adata, flavor="igraph", n_iterations=2, directed=False, resolution=0.3, random_state=0
    )
    assert adata.obsm["X_umap"].shape == (adata.n_obs, 2)
    assert np.isfinite(adata.obsm["X_umap"]).all()
    types = adata.obs["cell_type"].to_numpy()
    # the graph scanpy built from the latent recovers the planted types
    assert adjusted_rand_index(types, adata.obs["leiden"].to_numpy()) >= 0.8
    assert knn_label_accuracy(adata.obsm["X_umap"], types) >= 0.9


def test_scanpy_reads_normalized_expression_from_a_layer(trained):
    adata, model = trained
    adata = adata.copy()
    adata.layers["cellvi_normalized"] = model.get_normalized_expression(
        library_size=1e4, return_numpy=True
    )
    sc.pp.log1p(adata, layer="cellvi_normalized")
    sc.tl.rank_genes_groups(
        adata, "cell_type", layer="cellvi_normalized", method="t-test", use_raw=False
    )
    lfc = adata.varm["true_lfc"]["type_0"].to_numpy()
    planted_up = set(adata.var_names[lfc > 1])
    assert len(planted_up) >= 6
    ranked = sc.get.rank_genes_groups_df(adata, group="type_0")["names"].to_numpy()
    # the ranking scanpy computes on the stored values puts type_0's planted genes on top
    assert len(planted_up & set(ranked[: len(planted_up)])) >= 0.75 * len(planted_up)


def test_scanpy_reads_the_knn_graph_of_the_installed_pynndescent():
    """From 8,192 cells, ``sc.pp.neighbors`` takes its kNN graph from pynndescent's
    transformer: a ``csr_matrix`` up to pynndescent 0.6, a ``csr_array`` from 0.7, which
    scanpy 1.11.5 cannot read under scipy 1.17 (no ``getnnz``; the ``scanpy`` extra pins
    pynndescent < 0.7). Running NNDescent costs a JIT compile of about 100 s, so the graph
    of the type the installed pynndescent returns is handed to scanpy's reader directly."""
    pytest.importorskip("pynndescent")
    reader = getattr(
        pytest.importorskip("scanpy.neighbors._common"),
        "_get_indices_distances_from_sparse_matrix",
        None,
    )
    if reader is None:
        pytest.skip("scanpy moved its sparse kNN reader")
    version = tuple(int(p) for p in importlib.metadata.version("pynndescent").split(".")[:2])
    kind = sp.csr_array if version >= (0, 7) else sp.csr_matrix
    # four points on a line; each row holds the point itself and its nearest neighbour
    rows, cols = np.repeat(np.arange(4), 2), np.array([0, 1, 1, 0, 2, 1, 3, 2])
    dist = np.array([0, 1, 0, 1, 0, 1, 0, 1], dtype=np.float32)
    indices, distances = reader(kind((dist, (rows, cols)), shape=(4, 4)), 2)
    assert indices.shape == distances.shape == (4, 2)
    assert [set(row) for row in indices.tolist()] == [{0, 1}, {0, 1}, {1, 2}, {2, 3}]
    assert sorted(distances.ravel().tolist()) == [0] * 4 + [1] * 4
