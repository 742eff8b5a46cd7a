"""Latent and expression-level outputs against ``analysis.md`` §1-§3 and the scvi-tools API:
argument names and order, averaging over transform batches, library scaling, gene order."""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import pytest

import cellvi
from cellvi.model import SCVI


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with cellvi.settings.override(
        progress_bar_style="none", logging_dir=tmp_path_factory.mktemp("runs")
    ):
        adata = cellvi.data.simulate(
            n_cells=200, n_genes=40, n_batches=2, n_cell_types=2, n_de_genes_per_type=5, seed=0
        )
        SCVI.setup_anndata(adata, batch_key="batch")
        model = SCVI(adata, n_hidden=16, n_latent=4)
        model.train(max_epochs=2, save_resume_checkpoint=False)
    return model


def test_feature_correlation_takes_silent_like_scvi_tools(model):
    """scvi-tools' signature ends ``correlation_type, silent``; ``silent=`` must not raise."""
    corr = model.get_feature_correlation_matrix(n_samples=2, silent=False)
    assert corr.shape == (40, 40)
    params = list(inspect.signature(model.get_feature_correlation_matrix).parameters)
    assert params[params.index("correlation_type") + 1] == "silent"


def test_normalized_expression_arguments_follow_the_spec_order(model):
    """§3: ``... return_mean, return_numpy, silent, **kwargs``; silent given positionally
    must not land in another argument."""
    params = list(inspect.signature(model.get_normalized_expression).parameters)
    assert params[params.index("return_numpy") + 1] == "silent"
    args = (None, [0, 1], None, None, 1, 1, None, None, None, True, True, False)
    out = model.get_normalized_expression(*args)
    assert isinstance(out, np.ndarray) and out.shape == (2, 40)


def test_several_transform_batches_average_the_single_ones(model):
    cats = list(model.adata.obs["batch"].cat.categories)
    single = [model.get_normalized_expression(transform_batch=c, return_numpy=True) for c in cats]
    both = model.get_normalized_expression(transform_batch=cats, return_numpy=True)
    np.testing.assert_allclose(both, np.mean(single, axis=0), rtol=1e-5, atol=1e-8)


def test_latent_library_size_is_the_observed_total_times_rho(model):
    rho = model.get_normalized_expression(return_numpy=True)
    rate = model.get_normalized_expression(return_numpy=True, library_size="latent")
    total = np.asarray(model.adata.X.sum(1)).ravel()
    np.testing.assert_allclose(rate, rho * total[:, None], rtol=1e-4)
    np.testing.assert_allclose(rho.sum(1), 1, atol=1e-5)


def test_gene_list_keeps_the_model_gene_order_and_names(model):
    genes = ["gene_7", "gene_2"]
    frame = model.get_normalized_expression(indices=[4, 1], gene_list=genes, library_size=10)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["gene_2", "gene_7"]
    assert list(frame.index) == ["cell_4", "cell_1"]
    full = model.get_normalized_expression(indices=[4, 1], return_numpy=True)
    np.testing.assert_allclose(frame.to_numpy(), 10 * full[:, [2, 7]], rtol=1e-5)


def test_overall_samples_and_per_sample_arrays_are_numpy(model):
    overall = model.get_normalized_expression(n_samples_overall=30, return_numpy=False)
    assert isinstance(overall, np.ndarray) and overall.shape == (30, 40)
    draws = model.get_normalized_expression(n_samples=3, return_mean=False)
    mean = model.get_normalized_expression(n_samples=3, return_numpy=True)
    assert draws.shape == (3, 200, 40)
    np.testing.assert_allclose(draws.mean(0), mean, rtol=1e-5, atol=1e-8)


def test_rho_computed_in_the_result_equals_the_generic_path(model):
    """The default call writes each minibatch's logits into the result and normalises them
    there; selecting every gene takes the generic path (a temporary, then a copy)."""
    direct = model.get_normalized_expression(batch_size=64, return_numpy=True)
    generic = model.get_normalized_expression(
        batch_size=64, gene_list=list(model.adata.var_names), return_numpy=True
    )
    np.testing.assert_array_equal(direct, generic)  # same seed, same draws of z
    np.testing.assert_allclose(direct.sum(1), 1.0, rtol=1e-5)
