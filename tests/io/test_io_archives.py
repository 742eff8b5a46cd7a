"""Model files written by earlier releases keep loading (one folder per format version)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import cellvi
from cellvi.model import SCVI

ARCHIVES = Path(__file__).resolve().parents[1] / "data" / "archives"


def test_format_1_0_archive_loads_and_reproduces_its_latents():
    # the archive was trained on this exact simulation (see the archive's registry)
    adata = cellvi.data.simulate(
        n_cells=120, n_genes=30, n_batches=2, n_cell_types=2, n_de_genes_per_type=5, seed=11
    )
    model = SCVI.load(ARCHIVES / "scvi_format_1.0", adata=adata)
    assert model.is_trained and model.summary_stats["n_batch"] == 2
    expected = np.load(ARCHIVES / "scvi_format_1.0_latent.npy")
    np.testing.assert_allclose(model.get_latent_representation(), expected, rtol=1e-5, atol=1e-6)
    assert list(model.history["elbo_train"].index) == [0, 1]
