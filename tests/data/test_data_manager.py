"""Registration: encodings, registry contents, transfer rules, re-registration, views."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from rich.console import Console

from cellvi.data import (
    AnnDataManager,
    CategoricalJointObsField,
    CategoricalObsField,
    LabelsWithUnlabeledObsField,
    LayerField,
    NumericalJointObsField,
)
from cellvi.data._view import print_registry
from cellvi.errors import CellviWarning, InvalidDataError, SetupError, SmallCategoryWarning


def _adata(n=40, g=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=(n, g)).astype(np.float32) + np.eye(n, g, dtype=np.float32)
    x[:, 0] += 1
    obs = pd.DataFrame(
        {
            "batch": rng.choice(["b2", "b1", "b3"], size=n),
            "donor": pd.Categorical(rng.choice(["z", "y"], size=n), categories=["z", "y"]),
            "label": rng.choice(["A", "Unknown", "B", "C"], size=n),
            "age": rng.normal(50, 5, size=n),
        },
        index=[f"c{i}" for i in range(n)],
    )
    return anndata.AnnData(
        sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(g)])
    )


def _manager(batch_key="batch", cat=None, cont=None):
    return AnnDataManager(
        [
            LayerField("X", None),
            CategoricalObsField("batch", batch_key),
            CategoricalJointObsField("extra_categorical_covs", cat),
            NumericalJointObsField("extra_continuous_covs", cont),
        ],
        {
            "model_name": "SCVI",
            "setup_method_name": "setup_anndata",
            "setup_args": {"batch_key": batch_key},
        },
    )


def test_categories_are_sorted_unless_the_column_is_categorical():
    adata = _adata()
    manager = _manager(cat=["donor"]).register_fields(adata)
    assert manager.get_state_registry("batch")["categorical_mapping"] == ["b1", "b2", "b3"]
    codes = manager.get_from_registry("batch").ravel()
    expected = pd.Categorical(adata.obs["batch"], categories=["b1", "b2", "b3"]).codes
    np.testing.assert_array_equal(codes, expected)
    assert manager.get_state_registry("extra_categorical_covs")["mappings"] == {"donor": ["z", "y"]}


def test_missing_batch_key_gives_one_category():
    manager = _manager(batch_key=None).register_fields(_adata())
    assert manager.summary_stats.n_batch == 1
    assert set(manager.get_from_registry("batch").ravel()) == {0}


def test_summary_stats_and_registry_are_plain_json():
    manager = _manager(cat=["donor"], cont=["age"]).register_fields(_adata())
    stats = manager.summary_stats
    assert (stats.n_cells, stats.n_vars, stats.n_batch) == (40, 8, 3)
    assert stats.n_extra_categorical_covs == 1 and stats.n_extra_continuous_covs == 1
    json.dumps(manager.registry)
    assert set(manager.data_registry) == {
        "X",
        "batch",
        "extra_categorical_covs",
        "extra_continuous_covs",
    }


def test_unlabeled_category_is_swapped_to_the_last_code():
    adata = _adata()
    adata.obs["label"] = pd.Categorical(adata.obs["label"], categories=["A", "Unknown", "B", "C"])
    field = LabelsWithUnlabeledObsField("labels", "label", "Unknown")
    state = field.register_field(adata)
    assert state["categorical_mapping"] == ["A", "C", "B", "Unknown"]


def test_unlabeled_category_is_appended_when_absent():
    adata = _adata()
    state = LabelsWithUnlabeledObsField("labels", "batch", "none").register_field(adata)
    assert state["categorical_mapping"] == ["b1", "b2", "b3", "none"]


def test_small_category_warning_names_category_and_count():
    adata = _adata()
    adata.obs.iloc[:2, 0] = "rare"
    with pytest.warns(SmallCategoryWarning, match=r"'rare' \(2 cells\)"):
        _manager().register_fields(adata)


def test_transfer_accepts_missing_categories_and_keeps_codes():
    manager = _manager().register_fields(_adata())
    query = _adata(seed=1)
    query = query[query.obs["batch"] != "b1"].copy()
    new = manager.transfer_fields(query)
    assert new.get_state_registry("batch")["categorical_mapping"] == ["b1", "b2", "b3"]
    assert set(new.get_from_registry("batch").ravel()) == {1, 2}


def test_transfer_rejects_unseen_category_unless_extended():
    manager = _manager().register_fields(_adata())
    query = _adata(seed=2)
    query.obs["batch"] = query.obs["batch"].replace({"b3": "b9"})
    with pytest.raises(InvalidDataError, match=r"not seen: \['b9'\].*extend_categories=True"):
        manager.transfer_fields(query)
    new = manager.transfer_fields(query, extend_categories=True)
    assert new.get_state_registry("batch")["categorical_mapping"] == ["b1", "b2", "b3", "b9"]
    assert new.summary_stats.n_batch == 4


def test_transfer_rejects_other_gene_count_and_order():
    manager = _manager().register_fields(_adata())
    with pytest.raises(SetupError, match="7 genes but the model expects 8"):
        manager.transfer_fields(_adata()[:, :7].copy())
    with pytest.raises(SetupError, match=r"8 of 8 gene names differ|gene names differ"):
        manager.transfer_fields(_adata()[:, ::-1].copy())
    with pytest.warns(CellviWarning, match="gene names differ"):
        manager.transfer_fields(_adata()[:, ::-1].copy(), check_var_names="warn")


def test_validate_reregisters_after_another_setup():
    adata = _adata()
    first = _manager().register_fields(adata)
    _manager(batch_key="donor").register_fields(adata)
    first.validate()
    codes = first.get_from_registry("batch").ravel()
    np.testing.assert_array_equal(
        codes, pd.Categorical(adata.obs["batch"], categories=["b1", "b2", "b3"]).codes
    )


def test_register_twice_is_an_error():
    manager = _manager().register_fields(_adata())
    with pytest.raises(SetupError, match="already holds data"):
        manager.register_fields(_adata())


def test_non_csr_sparse_warns_that_csr_is_faster():
    adata = _adata()
    adata.X = adata.X.tocsc()
    with pytest.warns(CellviWarning, match="CSR trains faster"):
        _manager().register_fields(adata)


def test_view_registry_prints_tables():
    manager = _manager(cat=["donor"]).register_fields(_adata())
    console = Console(record=True, width=120)
    print_registry(manager, console=console)
    text = console.export_text()
    for expected in ("Summary Statistics", "Data Registry", "adata.obs['_cellvi_batch']", "b3"):
        assert expected in text
