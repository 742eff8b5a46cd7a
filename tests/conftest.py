"""Shared fixtures: small simulated data sets with fixed seeds."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets beside the checkout; tests using them skip in a user's clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (only present in the development checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def kang_pbmc(shared_data):
    """Control PBMCs of 8 donors (Kang et al. 2018): 12,261 cells x 1,287 genes, raw UMI
    counts, ``obs["donor"]`` and curated ``obs["cell_type"]``, genes named by symbol.
    Tests copy it before registering."""
    import anndata as ad

    adata = ad.read_h5ad(shared_data / "kang_muscat" / "kang_pbmc_ctrl_8donors.h5ad")
    adata.var_names = adata.var["symbol"].astype(str).to_numpy()
    adata.var_names_make_unique()
    adata.obs["donor"] = adata.obs["donor"].astype(str)
    adata.obs["cell_type"] = adata.obs["cell_type"].astype(str)
    return adata


@pytest.fixture(autouse=True)
def _isolated_logging_dir(tmp_path, monkeypatch):
    """Each test writes its run directories under its own tmp_path."""
    import cellvi

    with cellvi.settings.override(logging_dir=tmp_path / "cellvi_log", progress_bar_style="none"):
        yield


@pytest.fixture
def sim_small():
    """600 cells x 100 genes, 3 types, 2 batches (fixed seed)."""
    import cellvi

    return cellvi.data.simulate(n_cells=600, n_genes=100, n_batches=2, n_cell_types=3, seed=0)


@pytest.fixture
def sim_tiny():
    """200 cells x 40 genes, 2 types, 2 batches: API and crash tests."""
    import cellvi

    return cellvi.data.simulate(
        n_cells=200, n_genes=40, n_batches=2, n_cell_types=2, n_de_genes_per_type=6, seed=1
    )
