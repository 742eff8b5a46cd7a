"""Fields one at a time: validation, encoding, state, summary statistics and transfer."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellvi.data import (
    CategoricalJointObsField,
    CategoricalObsField,
    LabelsWithUnlabeledObsField,
    LayerField,
    NumericalJointObsField,
    NumericalObsField,
    ObsmField,
)
from cellvi.errors import (
    CellviWarning,
    InvalidDataError,
    MissingKeyError,
    SetupError,
    SmallCategoryWarning,
)


def _adata(n=60, g=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(n, g)).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    obs = pd.DataFrame(
        {
            "batch": rng.choice(["b2", "b1", "b3"], size=n),
            "donor": pd.Categorical(rng.choice(["z", "y"], size=n), categories=["z", "y", "w"]),
            "plate": rng.choice([3, 1, 2], size=n),
            "label": rng.choice(["A", "Unknown", "B", "C"], size=n),
            "age": rng.normal(50, 5, size=n),
            "size": rng.uniform(0.5, 2.0, size=n),
        },
        index=[f"c{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"g{i}" for i in range(g)])
    adata = anndata.AnnData(sp.csr_matrix(x), obs=obs, var=var)
    adata.layers["counts"] = x.copy()
    return adata


# ------------------------------------------------------------------------------ LayerField
def test_layer_field_state_and_summary():
    adata = _adata()
    field = LayerField("X", "counts")
    state = field.register_field(adata)
    assert state == {
        "n_obs": 60,
        "n_vars": 10,
        "column_names": [f"g{i}" for i in range(10)],
        "n_non_integer": 0,
    }
    assert field.get_summary_stats(state) == {"n_cells": 60, "n_vars": 10}
    assert field.data_registry() == {"attr_name": "layers", "attr_key": "counts"}


def test_layer_field_missing_layer_lists_existing_layers():
    with pytest.raises(MissingKeyError, match=r"layer 'raw' not found.*\['counts'\]"):
        LayerField("X", "raw").register_field(_adata())


def test_layer_field_makes_dense_fortran_layer_c_contiguous():
    adata = _adata()
    adata.layers["counts"] = np.asfortranarray(adata.layers["counts"])
    LayerField("X", "counts").register_field(adata)
    assert adata.layers["counts"].flags.c_contiguous


def test_layer_field_warns_that_csc_layer_trains_slower():
    adata = _adata()
    adata.layers["counts"] = sp.csc_matrix(adata.layers["counts"])
    with pytest.warns(CellviWarning, match=r"adata.layers\['counts'\] is a sparse CSC.*CSR"):
        LayerField("X", "counts").register_field(adata)


def test_layer_field_messages_name_the_layer():
    adata = _adata()
    adata.layers["counts"][4, 2] = -1
    with pytest.raises(InvalidDataError, match=r"adata.layers\['counts'\] contains 1 negative"):
        LayerField("X", "counts").register_field(adata)


def test_layer_field_skips_count_check_when_not_count_data():
    adata = _adata()
    adata.layers["counts"] = adata.layers["counts"] - 10.5
    state = LayerField("X", "counts", is_count_data=False).register_field(adata)
    assert state["n_vars"] == 10


def test_layer_transfer_rejects_other_gene_count_with_expected_and_received():
    field = LayerField("X", None)
    state = field.register_field(_adata())
    with pytest.raises(SetupError, match=r"7 genes but the model expects 10.*prepare_query"):
        field.transfer_field(state, _adata()[:, :7].copy())


def test_layer_transfer_rejects_other_gene_order_naming_how_many_and_which():
    field = LayerField("X", None)
    state = field.register_field(_adata())
    target = _adata()[:, [1, 0] + list(range(2, 10))].copy()
    with pytest.raises(
        SetupError,
        match=r"2 of 10 gene names differ.*position 0: 'g1' instead of 'g0', position 1.*"
        r"prepare_query_anndata",
    ):
        field.transfer_field(state, target)


def test_layer_transfer_only_warns_on_other_gene_names_when_asked():
    field = LayerField("X", None)
    state = field.register_field(_adata())
    target = _adata()
    target.var_names = [f"h{i}" for i in range(10)]
    with pytest.warns(CellviWarning, match="10 of 10 gene names differ"):
        new = field.transfer_field(state, target, check_var_names="warn")
    assert new["column_names"][0] == "h0"


# --------------------------------------------------------------------- CategoricalObsField
def test_categorical_field_sorts_plain_columns():
    adata = _adata()
    state = CategoricalObsField("batch", "batch").register_field(adata)
    assert state == {"categorical_mapping": ["b1", "b2", "b3"], "original_key": "batch"}
    expected = pd.Categorical(adata.obs["batch"], categories=["b1", "b2", "b3"]).codes
    np.testing.assert_array_equal(adata.obs["_cellvi_batch"], expected)


def test_categorical_field_keeps_the_columns_own_order_of_used_categories():
    state = CategoricalObsField("batch", "donor").register_field(_adata())
    assert state["categorical_mapping"] == ["z", "y"]  # 'w' has no cells


def test_categorical_field_stores_python_scalars_for_numeric_categories():
    state = CategoricalObsField("batch", "plate").register_field(_adata())
    assert state["categorical_mapping"] == [1, 2, 3]
    assert all(type(c) is int for c in state["categorical_mapping"])


def test_categorical_field_orders_mixed_types_by_text():
    adata = _adata()
    adata.obs["mixed"] = pd.Series([1, "a"] * 30, index=adata.obs_names, dtype=object)
    state = CategoricalObsField("batch", "mixed").register_field(adata)
    assert state["categorical_mapping"] == [1, "a"]


def test_categorical_field_without_key_gives_one_category_of_zeros():
    adata = _adata()
    field = CategoricalObsField("labels", None)
    state = field.register_field(adata)
    assert state["categorical_mapping"] == ["0"]
    assert field.get_summary_stats(state) == {"n_labels": 1}
    assert (field.get_field_data(adata) == 0).all()
    assert field.get_field_data(adata).shape == (60, 1)


def test_categorical_field_missing_column_names_it_and_lists_columns():
    with pytest.raises(MissingKeyError, match=r"'tissue' not found.*\['batch', 'donor'"):
        CategoricalObsField("batch", "tissue").register_field(_adata())


def test_categorical_field_rejects_nan_naming_column_and_count():
    adata = _adata()
    adata.obs.loc[["c1", "c5"], "batch"] = np.nan
    with pytest.raises(InvalidDataError, match=r"'batch' has 2 missing value\(s\)"):
        CategoricalObsField("batch", "batch").register_field(adata)


def test_categorical_field_warns_on_small_category_by_name_and_count():
    adata = _adata()
    adata.obs.loc["c3", "batch"] = "rare"
    with pytest.warns(SmallCategoryWarning, match=r"'batch'.*'rare' \(1 cell\)"):
        CategoricalObsField("batch", "batch").register_field(adata)


def test_categorical_transfer_keeps_source_codes_when_categories_are_missing():
    field = CategoricalObsField("batch", "batch")
    state = field.register_field(_adata())
    target = _adata(seed=1)
    target = target[target.obs["batch"] != "b1"].copy()
    new = field.transfer_field(state, target)
    assert new["categorical_mapping"] == ["b1", "b2", "b3"]
    assert set(target.obs["_cellvi_batch"]) == {1, 2}


def test_categorical_transfer_rejects_unseen_categories_pointing_to_extension():
    field = CategoricalObsField("batch", "batch")
    state = field.register_field(_adata())
    target = _adata(seed=1)
    target.obs["batch"] = target.obs["batch"].replace({"b2": "new2", "b1": "new1"})
    with pytest.raises(
        InvalidDataError, match=r"2 value\(s\).*\['new1', 'new2'\].*extend_categories=True"
    ):
        field.transfer_field(state, target)


def test_categorical_transfer_extension_appends_sorted_unseen_categories():
    field = CategoricalObsField("batch", "batch")
    state = field.register_field(_adata())
    target = _adata(seed=1)
    target.obs["batch"] = target.obs["batch"].replace({"b2": "x2", "b1": "x1"})
    new = field.transfer_field(state, target, extend_categories=True)
    assert new["categorical_mapping"] == ["b1", "b2", "b3", "x1", "x2"]
    assert set(target.obs["_cellvi_batch"]) == {2, 3, 4}


# ------------------------------------------------------------- LabelsWithUnlabeledObsField
def test_unlabeled_category_swaps_with_the_last_category():
    adata = _adata()
    adata.obs["label"] = pd.Categorical(adata.obs["label"], categories=["A", "Unknown", "B", "C"])
    state = LabelsWithUnlabeledObsField("labels", "label", "Unknown").register_field(adata)
    assert state["categorical_mapping"] == ["A", "C", "B", "Unknown"]
    assert state["unlabeled_category"] == "Unknown"
    assert adata.obs["_cellvi_labels"][adata.obs["label"] == "Unknown"].eq(3).all()


def test_unlabeled_category_is_appended_when_absent():
    state = LabelsWithUnlabeledObsField("labels", "batch", "none").register_field(_adata())
    assert state["categorical_mapping"] == ["b1", "b2", "b3", "none"]


def test_rare_unlabeled_category_does_not_warn():
    adata = _adata()
    adata.obs["label"] = adata.obs["label"].replace({"Unknown": "A"})
    adata.obs.loc["c0", "label"] = "Unknown"
    state = LabelsWithUnlabeledObsField("labels", "label", "Unknown").register_field(adata)
    assert state["categorical_mapping"][-1] == "Unknown"


def test_labels_transfer_rejects_unseen_label_asking_to_mark_unlabeled():
    field = LabelsWithUnlabeledObsField("labels", "label", "Unknown")
    state = field.register_field(_adata())
    target = _adata(seed=1)
    target.obs["label"] = target.obs["label"].replace({"C": "D"})
    with pytest.raises(InvalidDataError, match=r"not seen: \['D'\].*unlabeled category 'Unknown'"):
        field.transfer_field(state, target)


def test_labels_transfer_fills_absent_column_with_unlabeled_when_allowed():
    field = LabelsWithUnlabeledObsField("labels", "label", "Unknown")
    state = field.register_field(_adata())
    target = _adata(seed=1)
    del target.obs["label"]
    with pytest.warns(CellviWarning, match="'label' is absent; all cells are marked 'Unknown'"):
        new = field.transfer_field(state, target, allow_missing_labels=True)
    assert new == state
    assert target.obs["_cellvi_labels"].eq(3).all()


def test_labels_transfer_rejects_absent_column_by_default():
    field = LabelsWithUnlabeledObsField("labels", "label", "Unknown")
    state = field.register_field(_adata())
    target = _adata(seed=1)
    del target.obs["label"]
    with pytest.raises(MissingKeyError, match="labels column 'label' not found"):
        field.transfer_field(state, target)


def test_labels_query_transfer_refuses_unseen_labels_and_names_the_fix():
    """data.md §1.3: an unseen label stays a ValueError in query mapping too."""
    field = LabelsWithUnlabeledObsField("labels", "label", "Unknown")
    state = field.register_field(_adata())
    target = _adata(seed=1)
    target.obs["label"] = target.obs["label"].replace({"C": "D"})
    n_d = int((target.obs["label"] == "D").sum())
    with pytest.raises(InvalidDataError, match=rf"not seen: \['D'\] \({n_d} cell") as err:
        field.transfer_field(state, target, allow_missing_labels=True)
    exec(str(err.value).split("e.g. ", 1)[1].rstrip("."), {"adata": target})  # the given fix
    field.transfer_field(state, target, allow_missing_labels=True)
    unknown_code = state["categorical_mapping"].index("Unknown")
    assert (target.obs["_cellvi_labels"] == unknown_code).sum() >= n_d


# ----------------------------------------------------------------------- NumericalObsField
def test_numerical_field_without_key_is_empty():
    field = NumericalObsField("size_factor", None, positive=True)
    assert field.is_empty and field.data_registry() == {}
    assert field.register_field(_adata()) == {}


def test_numerical_field_returns_a_float_column():
    adata = _adata()
    adata.obs["n"] = np.arange(1, 61)
    field = NumericalObsField("size_factor", "n", positive=True)
    field.register_field(adata)
    data = field.get_field_data(adata)
    assert data.shape == (60, 1) and data.dtype == np.float64


def test_numerical_field_missing_column_is_a_key_error():
    with pytest.raises(MissingKeyError, match="'sf' not found"):
        NumericalObsField("size_factor", "sf").register_field(_adata())


def test_numerical_field_rejects_text_column():
    with pytest.raises(InvalidDataError, match="'batch' must be numeric"):
        NumericalObsField("size_factor", "batch").register_field(_adata())


def test_numerical_field_rejects_infinite_values_with_count():
    adata = _adata()
    adata.obs.loc[["c0", "c9", "c10"], "age"] = [np.inf, -np.inf, np.nan]
    with pytest.raises(InvalidDataError, match=r"'age' has 3 NaN/infinite"):
        NumericalObsField("x", "age").register_field(adata)


def test_positive_numerical_field_rejects_zero_and_negative_values():
    adata = _adata()
    adata.obs.loc[["c0", "c1"], "size"] = [0.0, -1.0]
    with pytest.raises(InvalidDataError, match=r"'size' must be > 0.*2 cell\(s\)"):
        NumericalObsField("size_factor", "size", positive=True).register_field(adata)


def test_non_positive_values_are_fine_without_positive():
    adata = _adata()
    adata.obs["age"] -= 100
    assert NumericalObsField("x", "age").register_field(adata) == {}


# ---------------------------------------------------------------- CategoricalJointObsField
def test_joint_categorical_field_stores_codes_frame_and_state():
    adata = _adata()
    field = CategoricalJointObsField("extra_categorical_covs", ["donor", "plate"])
    state = field.register_field(adata)
    assert state == {
        "mappings": {"donor": ["z", "y"], "plate": [1, 2, 3]},
        "field_keys": ["donor", "plate"],
        "n_cats_per_key": [2, 3],
    }
    frame = adata.obsm["_cellvi_extra_categorical_covs"]
    assert list(frame.columns) == ["donor", "plate"]
    np.testing.assert_array_equal(frame["plate"], adata.obs["plate"] - 1)
    assert field.get_summary_stats(state) == {"n_extra_categorical_covs": 2}


def test_empty_joint_categorical_field_reports_zero_keys():
    field = CategoricalJointObsField("extra_categorical_covs", None)
    state = field.register_field(_adata())
    assert field.is_empty and field.data_registry() == {}
    assert field.get_summary_stats(state) == {"n_extra_categorical_covs": 0}
    assert field.view_state_registry(state) is None


def test_joint_categorical_field_rejects_duplicated_keys():
    with pytest.raises(SetupError, match=r"more than once: \['donor'\]"):
        CategoricalJointObsField("extra_categorical_covs", ["donor", "donor"])


def test_joint_categorical_field_rejects_nan_in_any_key():
    adata = _adata()
    adata.obs.loc["c2", "plate"] = np.nan
    field = CategoricalJointObsField("extra_categorical_covs", ["donor", "plate"])
    with pytest.raises(InvalidDataError, match=r"'plate' has 1 missing"):
        field.register_field(adata)


def test_joint_categorical_transfer_rejects_then_extends_unseen_values_per_key():
    field = CategoricalJointObsField("extra_categorical_covs", ["donor", "plate"])
    state = field.register_field(_adata())
    target = _adata(seed=1)
    target.obs.loc["c0", "plate"] = 7
    with pytest.raises(InvalidDataError, match=r"column 'plate' has 1 value\(s\).*\[7\]"):
        field.transfer_field(state, target)
    new = field.transfer_field(state, target, extend_categories=True)
    assert new["mappings"] == {"donor": ["z", "y"], "plate": [1, 2, 3, 7]}
    assert new["n_cats_per_key"] == [2, 4]
    assert target.obsm["_cellvi_extra_categorical_covs"].loc["c0", "plate"] == 3


# ------------------------------------------------------------------ NumericalJointObsField
def test_joint_numerical_field_copies_columns_as_floats():
    adata = _adata()
    field = NumericalJointObsField("extra_continuous_covs", ["age", "plate"])
    state = field.register_field(adata)
    assert state == {"columns": ["age", "plate"]}
    frame = adata.obsm["_cellvi_extra_continuous_covs"]
    assert list(frame.dtypes) == [np.float32, np.float32]
    frame.iloc[0, 0] = -1.0
    assert adata.obs["age"].iloc[0] != -1.0  # a copy, not a view of obs
    assert field.get_summary_stats(state) == {"n_extra_continuous_covs": 2}


def test_joint_numerical_field_rejects_nan_naming_column():
    adata = _adata()
    adata.obs.loc["c4", "age"] = np.nan
    with pytest.raises(InvalidDataError, match=r"'age' has 1 NaN/infinite"):
        NumericalJointObsField("extra_continuous_covs", ["size", "age"]).register_field(adata)


def test_empty_joint_numerical_field_reports_zero_columns():
    field = NumericalJointObsField("extra_continuous_covs", [])
    assert field.get_summary_stats(field.register_field(_adata())) == {"n_extra_continuous_covs": 0}


# ------------------------------------------------------------------------------ ObsmField
def test_obsm_field_missing_key_lists_keys():
    adata = _adata()
    adata.obsm["pro"] = np.ones((60, 3))
    with pytest.raises(MissingKeyError, match=r"obsm key 'protein' not found.*\['pro'\]"):
        ObsmField("proteins", "protein").register_field(adata)


def test_obsm_field_column_names_from_frame_uns_or_positions():
    adata = _adata()
    adata.obsm["arr"] = np.ones((60, 3))
    adata.obsm["df"] = pd.DataFrame(np.ones((60, 2)), index=adata.obs_names, columns=["p", "q"])
    adata.uns["arr_names"] = ["a", "b", "c"]
    assert ObsmField("p", "arr").register_field(adata)["column_names"] == [0, 1, 2]
    assert ObsmField("p", "df").register_field(adata)["column_names"] == ["p", "q"]
    named = ObsmField("p", "arr", column_names_uns_key="arr_names")
    assert named.register_field(adata)["column_names"] == ["a", "b", "c"]
    assert named.get_summary_stats({"column_names": ["a", "b", "c"]}) == {"n_p": 3}


def test_obsm_field_count_check_names_the_location():
    adata = _adata()
    adata.obsm["pro"] = -np.ones((60, 3))
    with pytest.raises(InvalidDataError, match=r"adata.obsm\['pro'\] contains 180 negative"):
        ObsmField("proteins", "pro", is_count_data=True).register_field(adata)


def test_obsm_transfer_rejects_other_columns():
    adata = _adata()
    adata.obsm["df"] = pd.DataFrame(np.ones((60, 2)), index=adata.obs_names, columns=["p", "q"])
    field = ObsmField("proteins", "df")
    state = field.register_field(adata)
    target = _adata(seed=1)
    target.obsm["df"] = pd.DataFrame(np.ones((60, 2)), index=target.obs_names, columns=["q", "p"])
    with pytest.raises(SetupError, match=r"columns \['q', 'p'\].*expects \['p', 'q'\]"):
        field.transfer_field(state, target)
