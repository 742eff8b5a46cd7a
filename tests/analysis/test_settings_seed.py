"""``cellvi.settings.seed = n`` seeds the global generators, as scvi-tools' setting does."""

from __future__ import annotations

import numpy as np
import torch

import cellvi
from cellvi.model import SCVI


def test_assigning_the_seed_seeds_the_global_generators():
    adata = cellvi.data.simulate(
        n_cells=200, n_genes=40, n_batches=2, n_cell_types=2, n_de_genes_per_type=5, seed=0
    )
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=4)
    model.train(max_epochs=1)
    draws = []
    for _ in range(2):
        with cellvi.settings.override(seed=11):
            draws.append(model.posterior_predictive_sample(indices=np.arange(20)).toarray())
            draws.append(model.get_elbo())
    np.testing.assert_array_equal(draws[0], draws[2])
    assert draws[1] == draws[3]
    assert isinstance(draws[1], float) and draws[1].item() == draws[1]  # .item() as on a tensor
    with cellvi.settings.override(seed=12):
        other = model.posterior_predictive_sample(indices=np.arange(20)).toarray()
    assert not np.array_equal(draws[0], other)
    cellvi.settings.seed = 5
    first = torch.rand(3), np.random.rand()
    cellvi.settings.seed = 5
    assert torch.equal(first[0], torch.rand(3)) and first[1] == np.random.rand()
    cellvi.settings.seed = 0
