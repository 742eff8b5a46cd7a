"""The trained model the analysis tests share (one training run for the package)."""

from __future__ import annotations

import pytest

import cellvi
from cellvi.model import SCVI


@pytest.fixture(scope="package")
def fitted(tmp_path_factory):
    """SCVI on 600 simulated cells (3 types, 2 batches, 200 genes), 100 epochs, seed 0."""
    with cellvi.settings.override(
        logging_dir=tmp_path_factory.mktemp("runs"), progress_bar_style="none"
    ):
        adata = cellvi.data.simulate(n_cells=600, n_genes=200, n_batches=2, n_cell_types=3, seed=0)
        SCVI.setup_anndata(adata, batch_key="batch")
        model = SCVI(adata)
        model.train(max_epochs=100, plan_kwargs={"n_epochs_kl_warmup": 10})
    return model
