"""DE argument handling found by probing: every bad group or option is named, never a pandas or
torch error from deep inside, and nothing the caller passes is silently ignored."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cellvi
from cellvi.analysis import check_de_request
from cellvi.model import SCVI

FAST = {"n_samples_overall": 40}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    adata = cellvi.data.simulate(
        n_cells=90, n_genes=24, n_batches=2, n_cell_types=3, n_de_genes_per_type=4, seed=0
    )
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=3, n_hidden=16)
    with cellvi.settings.override(
        progress_bar_style="none", logging_dir=tmp_path_factory.mktemp("runs")
    ):
        model.train(max_epochs=2, save_resume_checkpoint=False)
    return model


def test_a_query_that_is_not_a_condition_on_obs_is_named(small):
    de = small.differential_expression
    # a column, not a condition: was "a group is empty" (every non-empty string is truthy)
    with pytest.raises(ValueError, match=r"idx1='cell_type' evaluates to a \w+ column"):
        de(idx1="cell_type", **FAST)
    with pytest.raises(ValueError, match="idx1='true_library' evaluates to a float64 column"):
        de(idx1="true_library", **FAST)
    # an assignment evaluates to a DataFrame: was an IndexError about 'indices'
    with pytest.raises(ValueError, match="idx2='z = 1' evaluates to DataFrame"):
        de(idx1=[0, 1], idx2="z = 1", **FAST)
    # an unknown column: was pandas' UndefinedVariableError
    with pytest.raises(ValueError, match=r"idx1=\"celltype == 'x'\" is not a valid obs query"):
        de(idx1="celltype == 'x'", **FAST)
    with pytest.raises(ValueError, match="obs columns: \\['batch', 'cell_type'"):
        check_de_request(small.adata, idx1="celltype == 'x'")


def test_a_query_with_missing_values_leaves_those_cells_out(small):
    adata = small.adata.copy()
    flag = pd.array([True, None, False] * (adata.n_obs // 3), dtype="boolean")
    adata.obs["flag"] = flag
    table = small.differential_expression(adata, idx1="flag == True", idx2=[1, 2], **FAST)
    by_mask = small.differential_expression(
        adata, idx1=np.arange(adata.n_obs) % 3 == 0, idx2=[1, 2], **FAST
    )
    pd.testing.assert_frame_equal(table, by_mask)


def test_empty_groups_name_the_argument_that_selected_them(small):
    de, n = small.differential_expression, small.adata.n_obs
    with pytest.raises(ValueError, match=r"idx1=\[\] selects no cells"):
        de(idx1=[], **FAST)
    with pytest.raises(ValueError, match="idx1=.* selects no cells"):
        de(idx1=np.zeros(n, dtype=bool), **FAST)
    with pytest.raises(ValueError, match=f"selects all {n} cells, so idx2=None"):
        de(idx1=np.ones(n, dtype=bool), **FAST)
    with pytest.raises(ValueError, match="idx2=\"cell_type == 'zzz'\" selects no cells"):
        de(idx1=[0], idx2="cell_type == 'zzz'", **FAST)
    # the check without a model raises what the call raises (it passed before)
    with pytest.raises(ValueError, match=r"idx1=\[\] selects no cells"):
        check_de_request(small.adata, idx1=[])


def test_idx2_without_idx1_is_refused_rather_than_ignored(small):
    # was: idx2 dropped silently and a one-vs-rest table of every category returned
    with pytest.raises(ValueError, match="idx2 is given without idx1"):
        small.differential_expression(groupby="cell_type", idx2=[1, 2, 3], **FAST)
    with pytest.raises(ValueError, match="idx2 is given without idx1"):
        check_de_request(small.adata, groupby="cell_type", idx2=[1, 2, 3])


def test_group1_naming_nothing_and_a_list_for_group2_are_named(small):
    de = small.differential_expression
    with pytest.raises(ValueError, match=r"group1=\[\] names no category"):
        de(groupby="cell_type", group1=[], **FAST)  # was pandas' "No objects to concatenate"
    with pytest.raises(ValueError, match=r"group2=\['type_1', 'type_2'\]: give one value"):
        de(groupby="cell_type", group1="type_0", group2=["type_1", "type_2"], **FAST)
    # the way the message suggests gives the comparison with the union of the categories
    rest = de(groupby="cell_type", group1="type_0", **FAST)
    union = de(idx1="cell_type == 'type_0'", idx2="cell_type in ['type_1', 'type_2']", **FAST)
    pd.testing.assert_frame_equal(rest.drop(columns=["comparison", "group1", "group2"]), union)


def test_a_group_compared_with_itself_is_refused(small):
    de = small.differential_expression
    with pytest.raises(ValueError, match="group1 and group2 both name 'type_1'"):
        de(groupby="cell_type", group1="type_1", group2="type_1", **FAST)
    with pytest.raises(ValueError, match="both name 'type_0'"):
        de(groupby="cell_type", group1=["type_0", "type_2"], group2="type_0", **FAST)
    with pytest.raises(ValueError, match="compared with itself"):  # before any training
        check_de_request(small.adata, groupby="cell_type", group1="type_2", group2="type_2")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"fdr_target": "0.05"}, "fdr_target='0.05' must be a number"),
        ({"fdr_target": None}, "fdr_target=None must be a number"),
        ({"delta": "0.25"}, "delta='0.25' must be a number"),
        ({"delta": True}, "delta=True must be a number"),
    ],
)
def test_delta_and_fdr_target_that_are_not_numbers_are_named(small, kwargs, match):
    with pytest.raises(TypeError, match=match):
        small.differential_expression(idx1=[0, 1], mode="change", **kwargs, **FAST)
    with pytest.raises(TypeError, match=match):
        check_de_request(small.adata, idx1=[0, 1], mode="change", **kwargs)


def test_numpy_numbers_for_delta_and_fdr_target_are_accepted(small):
    table = small.differential_expression(
        idx1=[0, 1], mode="change", delta=np.float32(0.5), fdr_target=np.float64(0.1), **FAST
    )
    assert "is_de_fdr_0.1" in table.columns
    assert np.allclose(table["delta"], 0.5)


@pytest.mark.parametrize(
    "bad, error", [(0, ValueError), (-1, ValueError), (2.5, TypeError), (None, TypeError)]
)
def test_importance_max_cells_must_be_a_positive_count(small, bad, error):
    # was: torch.cat on no tensors (0), numpy's "negative dimensions" (-1), a torch TypeError
    with pytest.raises(error, match=f"max_cells={bad!r} must be a positive integer"):
        small.differential_expression(
            groupby="cell_type",
            group1="type_0",
            weights="importance",
            importance_weighting_kwargs={"max_cells": bad, "n_mc_samples": 2},
            **FAST,
        )


def test_threshold_counts_sets_the_unexpressed_genes_of_the_pseudocount(small):
    from cellvi.analysis import differential_expression, get_normalized_expression

    adata = small.adata
    i1 = np.flatnonzero(adata.obs["cell_type"] == "type_0")
    i2 = np.flatnonzero(adata.obs["cell_type"] != "type_0")
    kwargs = {"groupby": "cell_type", "group1": "type_0", "mode": "change", **FAST}
    default = differential_expression(small, **kwargs)
    assert np.allclose(default["pseudocounts"], 1e-10)  # every gene is expressed
    # with a threshold above every mean count, every gene counts as unexpressed (§4.4 step 1)
    table = differential_expression(small, **kwargs, threshold_counts=1e9)
    s1 = get_normalized_expression(small, None, i1, n_samples_overall=40, seed=0)
    s2 = get_normalized_expression(small, None, i2, n_samples_overall=40, seed=1000)
    q = max(np.quantile(s1.max(0), 0.9), np.quantile(s2.max(0), 0.9))
    assert np.allclose(table["pseudocounts"], q / adata.n_vars, rtol=1e-5)
    with pytest.raises(ValueError, match="threshold_counts=-1 must be >= 0"):
        differential_expression(small, **kwargs, threshold_counts=-1)
    with pytest.raises(TypeError, match="threshold_counts='x' must be a number"):
        check_de_request(adata, **kwargs, threshold_counts="x")
    # and through the model method
    by_model = small.differential_expression(**kwargs, threshold_counts=1e9)
    pd.testing.assert_series_equal(by_model["pseudocounts"], table["pseudocounts"])


def test_diagnostics_take_scvi_tools_positional_order(small):
    """(adata, indices, batch_size, dataloader, return_mean) as in scvi-tools."""
    idx = np.arange(10)
    per_cell = small.get_elbo(None, idx, 5, None, False)
    assert per_cell.shape == (10,)
    errors = small.get_reconstruction_error(None, idx, 5, None, False)
    assert next(iter(errors.values())).shape == (10,)
    assert small.get_marginal_ll(None, idx, 4, 5, False, None).shape == (10,)


def test_feature_correlation_needs_two_draws(small):
    with pytest.raises(ValueError, match="selects 0 cell"):
        small.get_feature_correlation_matrix(indices=[])
    with pytest.raises(ValueError, match="selects 1 cell.*n_samples=1"):
        small.get_feature_correlation_matrix(indices=[3], n_samples=1)
    corr = small.get_feature_correlation_matrix(indices=[3], n_samples=4)
    assert corr.shape == (small.adata.n_vars, small.adata.n_vars)
