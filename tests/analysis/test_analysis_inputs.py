"""Argument handling of the outputs: scvi-tools-style inputs work, bad ones get clear errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import cellvi
from cellvi.errors import CellviWarning
from cellvi.model import SCVI


@pytest.fixture(scope="module")
def model():
    adata = cellvi.data.simulate(n_cells=300, n_genes=60, n_batches=3, n_cell_types=3, seed=2)
    SCVI.setup_anndata(adata, batch_key="batch")
    m = SCVI(adata, n_latent=4)
    with cellvi.settings.override(progress_bar_style="none"):
        m.train(max_epochs=3, save_resume_checkpoint=False)
    return m


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_a_batch_size_that_is_not_a_positive_integer_is_refused(model, bad):
    for call in (
        model.get_latent_representation,
        model.get_normalized_expression,
        model.get_likelihood_parameters,
    ):
        with pytest.raises((ValueError, TypeError), match="batch_size"):
            call(batch_size=bad)


def test_sample_counts_delta_and_fdr_target_are_checked(model):
    with pytest.raises(ValueError, match="n_samples=0"):
        model.get_normalized_expression(n_samples=0)
    with pytest.raises(ValueError, match="n_samples=-2"):
        model.posterior_predictive_sample(n_samples=-2)
    de = {"groupby": "cell_type", "group1": "type_0"}
    with pytest.raises(ValueError, match="delta=-0.1"):
        model.differential_expression(**de, mode="change", delta=-0.1)
    with pytest.raises(ValueError, match="fdr_target=2"):
        model.differential_expression(**de, mode="change", fdr_target=2)
    with pytest.raises(ValueError, match="library_size='foo'"):
        model.get_normalized_expression(library_size="foo")
    for bad in (-1, float("nan")):  # all-NaN LFCs or proba_de 0 everywhere, silently
        with pytest.raises(ValueError, match="pseudocounts=.* must be a finite number >= 0"):
            model.differential_expression(**de, mode="change", pseudocounts=bad)
    with pytest.raises(TypeError, match="has no data-loader options"):
        model.get_normalized_expression(data_loader_kwargs={"num_workers": 0})
    with pytest.raises(TypeError, match="indices=True: give a boolean mask"):
        model.get_latent_representation(indices=True)  # was an IndexError


def test_lone_names_are_one_name_not_a_list_of_letters(model):
    genes = model.adata.var_names
    one = model.get_normalized_expression(gene_list=genes[5])
    assert list(one.columns) == [genes[5]]
    arr = model.get_normalized_expression(transform_batch=np.array(["batch_0", "batch_1"]))
    pair = model.get_normalized_expression(transform_batch=["batch_0", "batch_1"])
    np.testing.assert_allclose(arr.to_numpy(), pair.to_numpy())
    with pytest.raises(ValueError, match=r"batchid1='batch_9' is not a batch"):
        model.differential_expression(
            groupby="cell_type", group1="type_0", batch_correction=True, batchid1="batch_9"
        )
    one_batch = model.differential_expression(
        groupby="cell_type",
        group1="type_0",
        batch_correction=True,
        batchid1="batch_0",
        batchid2="batch_0",
    )
    assert len(one_batch) == model.adata.n_vars


def test_transform_batch_none_in_a_list_is_the_cells_own_batch(model):
    own = model.get_normalized_expression(transform_batch=None, return_numpy=True)
    b0 = model.get_normalized_expression(transform_batch="batch_0", return_numpy=True)
    mixed = model.get_normalized_expression(transform_batch=[None, "batch_0"], return_numpy=True)
    np.testing.assert_allclose(mixed, (own + b0) / 2, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"transform_batch=\[\] names no batch"):
        model.get_normalized_expression(transform_batch=[])


def test_partly_overlapping_batch_sets_warn(model):
    with pytest.warns(CellviWarning, match="share some batches but not all"):
        model.differential_expression(
            groupby="cell_type",
            group1="type_0",
            batch_correction=True,
            batchid1=["batch_0"],
            batchid2=["batch_0", "batch_1"],
        )


def test_de_groups_numeric_labels_masks_and_missing_values(model):
    adata = model.adata.copy()
    codes = adata.obs["cell_type"].cat.codes.to_numpy()
    adata.obs["cluster"] = codes  # integer labels
    by_int = model.differential_expression(adata, groupby="cluster", group1=0)
    assert set(by_int["comparison"]) == {"0 vs Rest"}
    with_nan = adata.obs["cell_type"].astype(object)
    with_nan.iloc[:20] = np.nan
    adata.obs["partial"] = with_nan
    table = model.differential_expression(adata, groupby="partial")
    assert set(table["group1"]) == {"type_0", "type_1", "type_2"}  # no 'nan' group
    # group2 alone: every other category against it (it was refused as compared with itself)
    against = model.differential_expression(groupby="cell_type", group2="type_1")
    assert sorted(set(against["comparison"])) == ["type_0 vs type_1", "type_2 vs type_1"]
    with pytest.raises(ValueError, match="group1 and group2 both name 'type_1'"):
        model.differential_expression(groupby="cell_type", group1="type_1", group2="type_1")
    mask = np.zeros(adata.n_obs, dtype=bool)
    with pytest.raises(ValueError, match="idx1 is a boolean mask of length 100"):
        model.differential_expression(idx1=mask[:100])
    with pytest.raises(IndexError, match="idx2"):
        model.differential_expression(idx1=[0, 1], idx2=[5000])


def test_silent_is_accepted_like_scvi_tools(model):
    assert isinstance(model.get_normalized_expression(silent=True), pd.DataFrame)
    model.posterior_predictive_sample(silent=False)
    model.differential_expression(groupby="cell_type", group1="type_1", silent=True)


def test_an_empty_selection_gives_empty_results_or_names_the_problem(model):
    n_genes = model.adata.n_vars
    assert model.get_latent_representation(indices=[]).shape == (0, 4)
    assert model.get_normalized_expression(indices=[]).shape == (0, n_genes)
    assert model.posterior_predictive_sample(indices=[]).shape == (0, n_genes)
    assert model.posterior_predictive_sample(indices=[], n_samples=3).shape == (0, n_genes, 3)
    params = model.get_likelihood_parameters(indices=[])
    assert sorted(params) == ["dispersions", "dropout", "mean"]
    assert all(v.shape == (0, n_genes) for v in params.values())
    assert model.get_elbo(indices=[], return_mean=False).shape == (0,)
    assert model.get_marginal_ll(indices=[], n_mc_samples=5, return_mean=False).shape == (0,)
    for call in (model.get_elbo, model.get_reconstruction_error, model.get_marginal_ll):
        with pytest.raises(ValueError, match="indices selects no cells"):
            call(indices=[])
    with pytest.raises(ValueError, match="n_mc_samples=0"):
        model.get_marginal_ll(n_mc_samples=0)


def test_a_de_request_is_checked_without_a_model_as_the_call_would(model):
    from cellvi.analysis import check_de_request

    adata = model.adata
    check_de_request(adata, groupby="cell_type", group1="type_0", mode="change")
    check_de_request(adata, idx1=[0, 1, 2])
    bad = [
        ({"groupby": "celltype"}, KeyError, "groupby='celltype' is not an obs column"),
        ({"groupby": "cell_type", "group1": "t0"}, ValueError, "are 't0'"),
        ({"groupby": "cell_type", "grop1": "type_0"}, TypeError, r"unknown argument\(s\)"),
        ({"groupby": "cell_type", "fdr_target": 2}, ValueError, "fdr_target=2"),
        ({"groupby": "cell_type", "pseudocounts": -1}, ValueError, "pseudocounts=-1"),
        ({"idx1": "cell_type == 'type_0'", "idx2": [10**6]}, IndexError, "idx2"),
    ]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            check_de_request(adata, **kwargs)
        if "grop1" not in kwargs:  # the call itself raises the same error
            with pytest.raises(error, match=message):
                model.differential_expression(**kwargs)


def test_the_posterior_mean_draws_nothing_from_the_global_random_stream(model):
    """Means and distributions need no draw of z: asking for them leaves torch's global
    random stream where it was (a draw is still made for give_mean=False)."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    for kwargs in ({}, {"return_dist": True}):
        torch.manual_seed(0)
        model.get_latent_representation(**kwargs)
        torch.testing.assert_close(torch.rand(3), expected)
    torch.manual_seed(0)
    model.get_latent_representation(give_mean=False)
    assert not torch.equal(torch.rand(3), expected)


def test_a_view_is_copied_in_place_at_inference_and_its_parent_is_untouched(model):
    adata = model.adata
    parent_id, parent_columns = adata.uns["_cellvi_uuid"], list(adata.obs.columns)
    view = adata[:50]
    latent = model.get_latent_representation(view)
    np.testing.assert_allclose(latent, model.get_latent_representation(indices=np.arange(50)))
    assert not view.is_view and view.uns["_cellvi_uuid"] != parent_id
    assert adata.uns["_cellvi_uuid"] == parent_id and list(adata.obs.columns) == parent_columns
    assert model.get_normalized_expression(adata[:30]).shape == (30, adata.n_vars)
    table = model.differential_expression(
        adata[adata.obs["cell_type"] != "type_2"], groupby="cell_type", n_samples_overall=50
    )
    assert set(table["group1"]) == {"type_0", "type_1"}
    SCVI(adata)  # the original keeps its setup
    with pytest.raises(ValueError, match=r"view.*\.copy\(\)"):  # setup still wants a copy
        SCVI.setup_anndata(adata[:10], batch_key="batch")
    with pytest.raises(ValueError, match=r"is a view of data set up for SCVI.*\.copy\(\)"):
        SCVI(adata[:10])


def test_a_copy_gets_its_own_id_and_the_original_keeps_its_setup(model):
    copy = model.adata.copy()
    model.get_latent_representation(copy)
    assert copy.uns["_cellvi_uuid"] != model.adata.uns["_cellvi_uuid"]
    SCVI(model.adata)
    SCVI(copy)


def test_one_vs_rest_on_plain_columns_uses_sorted_categories_and_keeps_values(model):
    adata = model.adata.copy()
    adata.obs["letters"] = np.array(["z", "a", "m"])[np.arange(adata.n_obs) % 3]
    adata.obs["ints"] = np.array([2, 0, 1])[np.arange(adata.n_obs) % 3]
    letters = model.differential_expression(adata, groupby="letters", n_samples_overall=50)
    assert list(letters["comparison"].unique()) == ["a vs Rest", "m vs Rest", "z vs Rest"]
    ints = model.differential_expression(adata, groupby="ints", n_samples_overall=50)
    assert list(ints["group1"].unique()) == [0, 1, 2]
    assert pd.api.types.is_integer_dtype(ints["group1"])
    pair = model.differential_expression(
        adata, groupby="ints", group1="2", group2=0, n_samples_overall=50
    )
    assert set(pair["group1"]) == {2} and set(pair["group2"]) == {0}
    assert set(pair["comparison"]) == {"2 vs 0"}


def test_a_cell_given_twice_in_a_group_counts_once(model):
    kwargs = {"idx2": [3, 4, 5], "n_samples_overall": 50}
    repeated = model.differential_expression(idx1=[11, 10, 10, 10], **kwargs)
    once = model.differential_expression(idx1=[10, 11], **kwargs)
    pd.testing.assert_frame_equal(repeated, once)
    x = model.adata.X[[10, 11]].toarray()
    raw = repeated.loc[model.adata.var_names, "raw_mean1"].to_numpy()
    np.testing.assert_allclose(raw, x.mean(0), rtol=1e-6)


def test_obs_names_as_positions_are_refused_with_the_accepted_forms(model):
    names = list(model.adata.obs_names[:5])
    accepted = r"boolean mask or integer positions \(or an obs.query string\)"
    with pytest.raises(TypeError, match=rf"idx1 got \[{names[0]!r}.*{accepted}.*obs_names"):
        model.differential_expression(idx1=names)
    with pytest.raises(TypeError, match=r"idx2 got .*obs.query string"):
        model.differential_expression(idx1=[0, 1], idx2=np.array(names))
    with pytest.raises(TypeError, match=r"indices got .*integer positions\. For obs names"):
        model.get_latent_representation(indices=names)
    with pytest.raises(TypeError, match=r"indices got \[0.5\]"):
        model.get_latent_representation(indices=[0.5])
    whole = model.get_latent_representation(indices=np.array([1.0, 2.0]))
    np.testing.assert_allclose(whole, model.get_latent_representation(indices=[1, 2]))


def test_an_empty_selection_of_distributions_or_overall_samples(model):
    means, variances = model.get_latent_representation(indices=[], return_dist=True)
    assert means.shape == variances.shape == (0, 4)
    assert means.dtype == variances.dtype == np.float32
    with pytest.raises(ValueError, match="n_samples_overall=10 draws .* indices selects no"):
        model.get_normalized_expression(indices=[], n_samples_overall=10)
    with pytest.raises(ValueError, match="n_samples_overall=0"):
        model.get_normalized_expression(n_samples_overall=0)


def test_a_groupby_column_without_two_categories_is_named_for_what_it_has(model):
    adata = model.adata.copy()
    adata.obs["missing"] = np.nan
    adata.obs["one"] = "x"
    with pytest.raises(ValueError, match=r"'missing' has no values \(every cell's value is"):
        model.differential_expression(adata, groupby="missing")
    with pytest.raises(ValueError, match=r"'one' has a single category \('x'\)"):
        model.differential_expression(adata, groupby="one")


def test_normalized_expression_is_seeded_unless_seed_is_none(model):
    first = model.get_normalized_expression(return_numpy=True, indices=np.arange(20))
    state = torch.get_rng_state()
    again = model.get_normalized_expression(return_numpy=True, indices=np.arange(20))
    np.testing.assert_array_equal(first, again)
    assert torch.equal(torch.get_rng_state(), state)  # the global stream left as it was
    fresh = [
        model.get_normalized_expression(return_numpy=True, indices=np.arange(20), seed=None)
        for _ in range(2)
    ]  # the restored global state used to give the same "fresh" draw twice
    assert not np.array_equal(*fresh)
    assert not torch.equal(torch.get_rng_state(), state)
