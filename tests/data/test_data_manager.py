"""Registration: encodings, registry contents, transfer rules, re-registration, views."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from rich.console import Console

import cellvi
from cellvi.data import (
    AnnDataManager,
    CategoricalJointObsField,
    CategoricalObsField,
    LayerField,
    NumericalJointObsField,
    NumericalObsField,
)
from cellvi.data._view import print_registry
from cellvi.errors import (
    CellviWarning,
    InvalidDataError,
    MissingKeyError,
    SetupError,
    SmallCategoryWarning,
)


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


def _manager(batch_key="batch", cat=None, cont=None, size_factor_key=None):
    return AnnDataManager(
        [
            LayerField("X", None),
            CategoricalObsField("batch", batch_key),
            CategoricalObsField("labels", None),
            NumericalObsField("size_factor", size_factor_key, positive=True),
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
        "labels",
        "extra_categorical_covs",
        "extra_continuous_covs",
    }


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
    with pytest.raises(SetupError, match=r"8 of 8 gene names differ"):
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


def test_view_registry_can_hide_state_tables(capsys):
    manager = _manager(cat=["donor"]).register_fields(_adata())
    manager.view_registry(hide_state_registries=True)
    hidden = capsys.readouterr().out
    manager.view_registry()
    shown = capsys.readouterr().out
    assert "setup_anndata(batch_key='batch')" in hidden and "cellvi version" in hidden
    assert "State Registry" not in hidden and "batch State Registry" in shown
    assert "extra_categorical_covs State Registry" in shown


def test_registry_has_the_documented_layout():
    adata = _adata()
    registry = _manager(size_factor_key="age").register_fields(adata).registry
    assert set(registry) == {
        "cellvi_version",
        "model_name",
        "setup_method_name",
        "setup_args",
        "_cellvi_uuid",
        "field_registries",
    }
    assert registry["cellvi_version"] == cellvi.__version__
    assert registry["_cellvi_uuid"] == adata.uns["_cellvi_uuid"]
    batch = registry["field_registries"]["batch"]
    assert batch["data_registry"] == {"attr_name": "obs", "attr_key": "_cellvi_batch"}
    assert batch["summary_stats"] == {"n_batch": 3}
    assert registry["field_registries"]["extra_continuous_covs"]["data_registry"] == {}


def test_setup_args_with_numpy_values_become_json():
    manager = AnnDataManager(
        [LayerField("X", None)],
        {
            "model_name": "SCVI",
            "setup_method_name": "setup_anndata",
            "setup_args": {"keys": ("a", np.str_("b")), "n": np.int64(3)},
        },
    ).register_fields(_adata())
    assert json.loads(json.dumps(manager.registry))["setup_args"] == {"keys": ["a", "b"], "n": 3}


def test_uuid_is_set_once_and_manager_uuid_follows_the_latest_setup():
    adata = _adata()
    first = _manager().register_fields(adata)
    uuid, manager_uuid = adata.uns["_cellvi_uuid"], adata.uns["_cellvi_manager_uuid"]
    _manager().register_fields(adata)
    assert adata.uns["_cellvi_uuid"] == uuid == first.registry["_cellvi_uuid"]
    assert adata.uns["_cellvi_manager_uuid"] != manager_uuid


def test_failed_registration_leaves_no_trace_of_a_setup():
    adata = _adata()
    manager = _manager(batch_key="missing")
    with pytest.raises(MissingKeyError, match="'missing' not found"):
        manager.register_fields(adata)
    assert manager.adata is None and "_cellvi_uuid" not in adata.uns
    with pytest.raises(SetupError, match="No data registered yet"):
        _ = manager.registry


def test_register_rejects_a_view_asking_for_a_copy():
    with pytest.raises(SetupError, match=r"view.*adata\[idx\]\.copy\(\)"):
        _manager().register_fields(_adata()[:20])


def test_transfer_options_need_a_source_registry():
    with pytest.raises(TypeError, match=r"\['extend_categories'\] only apply when transferring"):
        _manager().register_fields(_adata(), extend_categories=True)


def test_unknown_transfer_option_lists_valid_ones():
    manager = _manager().register_fields(_adata())
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['extend'\].*extend_categories"):
        manager.transfer_fields(_adata(seed=1), extend=True)


def test_check_var_names_accepts_only_error_or_warn():
    manager = _manager().register_fields(_adata())
    with pytest.raises(ValueError, match="'error' or 'warn'; got 'ignore'"):
        manager.transfer_fields(_adata(seed=1), check_var_names="ignore")


def test_transfer_from_a_json_round_tripped_registry():
    manager = _manager(cat=["donor"], cont=["age"]).register_fields(_adata())
    registry = json.loads(json.dumps(manager.registry))
    query = _adata(seed=3)
    new = _manager(cat=["donor"], cont=["age"])
    new.register_fields(query, source_registry=registry, check_var_names="error")
    assert new.registry["field_registries"] == registry["field_registries"] | {
        "X": new.registry["field_registries"]["X"]
    }
    assert new.registry["_cellvi_uuid"] != registry["_cellvi_uuid"]


def test_source_registry_without_a_field_is_a_setup_error():
    registry = _manager().register_fields(_adata()).registry
    del registry["field_registries"]["batch"]
    with pytest.raises(SetupError, match="no field 'batch'.*different model"):
        _manager().register_fields(_adata(seed=1), source_registry=registry)


def test_validate_is_a_no_op_while_current():
    adata = _adata()
    manager = _manager().register_fields(adata)
    registry = manager.registry
    manager.validate()
    assert manager.registry is registry


def test_validate_reregisters_silently():
    adata = _adata()
    adata.obs.iloc[:2, 0] = "rare"
    with pytest.warns(SmallCategoryWarning, match="'rare'"):
        first = _manager().register_fields(adata)
    _manager(batch_key="donor").register_fields(adata)
    first.validate()  # warnings are errors in the test suite: none may be raised here
    assert adata.uns["_cellvi_manager_uuid"] == first._manager_uuid
    assert first.get_state_registry("batch")["categorical_mapping"][-1] == "rare"


def test_validate_without_data_is_a_setup_error():
    with pytest.raises(SetupError, match="holds no data"):
        _manager().validate()


def test_duplicated_registry_keys_are_a_setup_error():
    with pytest.raises(SetupError, match=r"duplicated registry keys: \['batch', 'batch'\]"):
        AnnDataManager(
            [CategoricalObsField("batch", "batch"), NumericalJointObsField("batch", None)],
            {"model_name": "M", "setup_method_name": "setup_anndata", "setup_args": {}},
        )


class _ClashingField(NumericalJointObsField):
    def get_summary_stats(self, state):
        return {"n_batch": 0}


def test_duplicated_summary_statistic_is_a_runtime_error():
    manager = AnnDataManager(
        [CategoricalObsField("batch", "batch"), _ClashingField("extra", None)],
        {"model_name": "M", "setup_method_name": "setup_anndata", "setup_args": {}},
    )
    with pytest.raises(RuntimeError, match="'n_batch' is reported twice"):
        manager.register_fields(_adata())
    assert manager.adata is None


def test_get_from_registry_returns_each_kind_of_data():
    adata = _adata()
    adata.obs["sf"] = np.arange(1, 41)
    manager = _manager(cat=["donor"], cont=["age"], size_factor_key="sf").register_fields(adata)
    assert manager.get_from_registry("X") is adata.X
    batch = manager.get_from_registry("batch")
    assert batch.shape == (40, 1) and batch.dtype == np.int64
    size = manager.get_from_registry("size_factor")
    assert size.shape == (40, 1) and size.dtype == np.float64
    assert isinstance(manager.get_from_registry("extra_categorical_covs"), pd.DataFrame)
    assert list(manager.get_from_registry("extra_continuous_covs").columns) == ["age"]


def test_empty_fields_hold_no_data():
    manager = _manager().register_fields(_adata())
    assert "size_factor" not in manager.data_registry
    with pytest.raises(MissingKeyError, match=r"No registry key holding data 'size_factor'"):
        manager.get_from_registry("size_factor")
    assert manager.summary_stats.n_extra_categorical_covs == 0


def test_state_registry_and_setup_args_lookups():
    manager = _manager().register_fields(_adata())
    assert manager.get_setup_arg("batch_key") == "batch"
    with pytest.raises(MissingKeyError, match=r"No setup argument 'layer'.*\['batch_key'\]"):
        manager.get_setup_arg("layer")
    with pytest.raises(MissingKeyError, match="No registered field 'proteins'"):
        manager.get_state_registry("proteins")


def test_summary_stats_attribute_error_lists_statistics():
    stats = _manager().register_fields(_adata()).summary_stats
    with pytest.raises(AttributeError, match="no summary statistic 'n_proteins'"):
        _ = stats.n_proteins


def test_simulators_are_exposed_lazily():
    from cellvi.simulate import simulate, synthetic_iid

    assert cellvi.data.simulate is simulate and cellvi.data.synthetic_iid is synthetic_iid
