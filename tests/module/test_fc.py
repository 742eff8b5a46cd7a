"""Covariate injection equals a linear layer on the one-hot-concatenated input."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from cellvi.nn import CovariateLinear, FCLayers


def test_covariate_linear_equals_one_hot_concatenation():
    torch.manual_seed(0)
    layer = CovariateLinear(6, 4, [3, 1, 5])  # the 1-category covariate is skipped
    x = torch.randn(10, 6)
    c1, c2, c3 = (
        torch.randint(0, 3, (10, 1)),
        torch.zeros(10, 1, dtype=torch.long),
        torch.randint(0, 5, (10, 1)),
    )
    one_hot = torch.cat([F.one_hot(c1[:, 0], 3), F.one_hot(c3[:, 0], 5)], dim=1).float()
    weight = torch.cat([layer.linear.weight, layer.cov_weight.T], dim=1)
    expected = torch.cat([x, one_hot], dim=1) @ weight.T + layer.linear.bias
    torch.testing.assert_close(layer(x, [c1, c2, c3]), expected)


def test_fc_layers_inject_covariates_only_first_block_when_asked():
    shallow = FCLayers(6, 4, n_cat_list=[3], n_layers=3, n_hidden=8, inject_covariates=False)
    deep = FCLayers(6, 4, n_cat_list=[3], n_layers=3, n_hidden=8, inject_covariates=True)
    with_cov = [b["linear"].cov_weight is not None for b in shallow.blocks]
    assert with_cov == [True, False, False]
    assert all(b["linear"].cov_weight is not None for b in deep.blocks)


def test_fc_layers_accept_sample_axis_and_continuous_covariates():
    torch.manual_seed(0)
    fc = FCLayers(6, 4, n_cat_list=[3], n_cont=2, n_layers=2, n_hidden=8, dropout_rate=0.0)
    fc.eval()
    x = torch.randn(5, 10, 6)
    cat = torch.randint(0, 3, (10, 1))
    cont = torch.randn(10, 2)
    out = fc(x, cat, cont=cont)
    assert out.shape == (5, 10, 4)
    torch.testing.assert_close(out[2], fc(x[2], cat, cont=cont))


def test_fc_layers_on_sparse_rows_equal_dense_input():
    """The first block's product over stored values only gives the dense product."""
    import scipy.sparse as sp

    from cellvi.dataloaders import SparseRows

    torch.manual_seed(0)
    fc = FCLayers(12, 4, n_cat_list=[3], n_cont=2, n_layers=2, n_hidden=8)
    fc.eval()
    x = torch.poisson(torch.full((10, 12), 0.7))
    csr = sp.csr_matrix(x.numpy())
    rows = SparseRows(
        torch.from_numpy(csr.data), torch.from_numpy(csr.indices), torch.from_numpy(csr.indptr), 12
    )
    cat, cont = torch.randint(0, 3, (10, 1)), torch.randn(10, 2)
    torch.testing.assert_close(fc(rows, cat, cont=cont), fc(x, cat, cont=cont))
