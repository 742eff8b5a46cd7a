"""The likelihood of (samples, cells, genes) decodes, as the marginal likelihood uses it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cellvi
from cellvi._constants import REGISTRY_KEYS
from cellvi.distributions import log_nb_positive, log_zinb_positive
from cellvi.model import SCVI


@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
@pytest.mark.parametrize("dispersion", ["gene", "gene-batch", "gene-cell"])
def test_sample_axis_likelihood_equals_the_elementwise_densities(likelihood, dispersion):
    adata = cellvi.data.simulate(n_cells=40, n_genes=100, seed=0)
    SCVI.setup_anndata(adata, batch_key="batch")
    module = SCVI(adata, gene_likelihood=likelihood, dispersion=dispersion).module
    torch.manual_seed(0)
    x = torch.from_numpy(adata.X[:8].toarray().astype(np.float32))
    batch = {
        REGISTRY_KEYS.X_KEY: x,
        REGISTRY_KEYS.BATCH_KEY: torch.tensor([[0], [1]] * 4),
    }
    z = torch.randn(3, 8, module.config.n_latent)
    library = x.sum(1, keepdim=True).log().expand(3, 8, 1)
    with torch.no_grad():
        px = module.generative(z, library, batch)
        got = module.log_likelihood(x, px)
        mu = px["log_rate"].exp()
        if likelihood == "zinb":
            want = log_zinb_positive(x, mu, px["theta"], px["dropout_logits"]).sum(-1)
        elif likelihood == "nb":
            want = log_nb_positive(x, mu, px["theta"]).sum(-1)
        else:
            want = torch.distributions.Poisson(mu).log_prob(x).sum(-1)
    assert got.shape == (3, 8)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-3)
