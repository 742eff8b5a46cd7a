"""TileDB-SOMA: a local experiment from simulated data, trained and inferred via a registry."""

from __future__ import annotations

import numpy as np
import pytest

import cellvi
from cellvi.dataloaders import AnnDataModule, SomaDataModule
from cellvi.errors import MissingKeyError, SetupError
from cellvi.model import SCANVI, SCVI

soma = pytest.importorskip("tiledbsoma")
soma_io = pytest.importorskip("tiledbsoma.io")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    adata = cellvi.data.simulate(n_cells=600, n_genes=80, n_batches=2, n_cell_types=3, seed=2)
    del adata.varm["true_lfc"]  # a DataFrame in varm is not SOMA-ingestible
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 3 == 0, "d1", "d2")
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[np.random.default_rng(0).random(adata.n_obs) < 0.5] = "Unknown"
    adata.obs["labels"] = labels
    uri = str(tmp_path_factory.mktemp("soma") / "exp")
    soma_io.from_anndata(uri, adata, measurement_name="RNA", X_layer_name="raw")
    return uri, adata


def test_reads_the_query_exactly(experiment):
    uri, adata = experiment
    sub = cellvi.data.read_soma(
        uri, obs_value_filter="donor == 'd1'", var_value_filter="is_de == False"
    )
    expected = adata[adata.obs["donor"] == "d1"][:, ~adata.var["is_de"].to_numpy()]
    assert list(sub.obs_names) == list(expected.obs_names)
    assert list(sub.var_names) == list(expected.var_names)
    X = expected.X.tocsr()
    for rows in (np.arange(sub.n_obs), np.array([7, 3, 3, 0])):
        assert (sub.X.read_rows(rows) != X[rows]).nnz == 0


def test_scvi_trains_infers_saves_and_loads_through_the_registry(experiment, tmp_path):
    uri, adata = experiment
    dm = SomaDataModule(uri, batch_column_names=["batch", "donor"], train_size=0.8)
    assert dm.n_batch == 4 and dm.registry["setup_method_name"] == "setup_datamodule"
    assert set(dm.adata.obs["_cellvi_soma_batch"]) == {
        f"{b}//{d}" for b in ("batch_0", "batch_1") for d in ("d1", "d2")
    }
    model = SCVI(adata=None, registry=dm.registry, n_latent=8)
    model.train(max_epochs=40, datamodule=dm, plan_kwargs={"n_epochs_kl_warmup": 10})
    assert len(model.train_indices) == 480
    z = model.get_latent_representation(dataloader=dm.inference_dataloader())
    types = adata.obs["cell_type"].to_numpy()
    assert cellvi.analysis.knn_label_accuracy(z, types) >= 0.95
    with pytest.raises(SetupError, match="dataloader="):
        model.get_latent_representation()  # no AnnData: say how to pass data
    with pytest.raises(ValueError, match="either"):
        model.get_latent_representation(adata, dataloader=dm.inference_dataloader())

    model.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m")
    np.testing.assert_array_equal(
        loaded.get_latent_representation(dataloader=dm.inference_dataloader()), z
    )
    subset = loaded.get_normalized_expression(dataloader=dm.inference_dataloader([4, 1]))
    assert list(subset.index) == [adata.obs_names[4], adata.obs_names[1]]


def test_scanvi_transfers_labels_over_a_query(experiment):
    uri, adata = experiment
    dm = SomaDataModule(
        uri, batch_column_names=["batch"], labels_column="labels", unlabeled_category="Unknown"
    )
    model = SCANVI(adata=None, registry=dm.registry, n_latent=8)
    model.train(max_epochs=20, datamodule=dm)
    predicted = model.predict(dataloader=dm.inference_dataloader())
    unlabeled = adata.obs["labels"].to_numpy() == "Unknown"
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    assert (predicted[unlabeled] == truth[unlabeled]).mean() >= 0.9


def test_mismatched_query_and_bad_names_are_clear(experiment):
    uri, adata = experiment
    dm = SomaDataModule(uri, batch_column_names=["batch"])
    model = SCVI(adata=None, registry=dm.registry)
    fewer_genes = SomaDataModule(
        uri, batch_column_names=["batch"], var_value_filter="is_de == True"
    )
    with pytest.raises(SetupError, match="gene set"):
        model.get_latent_representation(dataloader=fewer_genes.inference_dataloader())
    other_batches = SomaDataModule(uri, batch_column_names=["donor"])
    with pytest.raises(SetupError, match="batch categories"):
        model.train(max_epochs=1, datamodule=other_batches)
    with pytest.raises(MissingKeyError, match="layer"):
        SomaDataModule(uri, X_name="normalized")
    with pytest.raises(KeyError, match="tissue"):
        SomaDataModule(uri, batch_column_names=["tissue"])
    with pytest.raises(cellvi.errors.InvalidDataError, match="selects 0 cells"):
        SomaDataModule(uri, obs_value_filter="donor == 'nobody'")


def test_an_in_memory_data_module_gives_the_same_registry_path(experiment):
    _, adata = experiment
    dm = AnnDataModule(adata.copy(), batch_key="batch", batch_size=64)
    model = SCVI(adata=None, registry=dm.registry, n_hidden=16, n_latent=4)
    model.train(max_epochs=2, datamodule=dm)
    assert model.is_trained
    with pytest.raises(SetupError, match="datamodule"):
        SCVI(adata=None, registry=dm.registry).train(max_epochs=1)
    with_covariate = adata.copy()
    SCVI.setup_anndata(
        with_covariate, batch_key="batch", continuous_covariate_keys=["true_library"]
    )
    with pytest.raises(SetupError, match="covariates"):
        SCVI(with_covariate).train(max_epochs=1, datamodule=dm)


def test_scanvi_refuses_a_registry_without_labels(experiment):
    uri, _ = experiment
    dm = SomaDataModule(uri, batch_column_names=["batch"])
    with pytest.raises(SetupError, match="unlabeled_category"):
        SCANVI(adata=None, registry=dm.registry)


def test_soma_is_never_read_after_a_fork(experiment):
    """TileDB cannot be used in a forked child: workers are spawned, fork strategies refused."""
    uri, _ = experiment
    dm = SomaDataModule(uri, batch_column_names=["batch"], batch_size=200)
    assert not dm.store.fork_safe
    model = SCVI(adata=None, registry=dm.registry, n_hidden=16, n_latent=4)
    model.train(max_epochs=1, datamodule=dm, datasplitter_kwargs={"num_workers": 1})
    assert np.isfinite(model.history["elbo_train"]["elbo_train"]).all()
    with pytest.raises(SetupError, match="torchrun"):
        model.train(
            max_epochs=1, datamodule=dm, accelerator="cpu", devices=2, strategy="ddp_notebook"
        )


def test_a_model_created_without_data_is_built_by_its_data_module(experiment, tmp_path):
    uri, adata = experiment
    dm = SomaDataModule(
        uri, batch_column_names=["batch"], labels_column="labels", unlabeled_category="Unknown"
    )
    with pytest.warns(cellvi.errors.CellviWarning, match="experimental"):
        model = SCVI(n_hidden=16, n_latent=4)
    with pytest.raises(SetupError, match="no data yet"):
        _ = model.summary_stats
    with pytest.raises(SetupError, match="before saving"):
        model.save(tmp_path / "untrained")
    model.train(max_epochs=2, datamodule=dm)
    assert model.summary_stats["n_vars"] == adata.n_vars and model.is_trained
    with pytest.warns(cellvi.errors.CellviWarning, match="experimental"):
        scanvi = SCANVI(n_hidden=16, n_latent=4)
    scanvi.train(max_epochs=2, datamodule=dm)
    assert set(scanvi.predict(dataloader=dm.inference_dataloader())) <= set(scanvi.labels_)


def test_train_arguments_override_the_data_module_split(experiment):
    _, adata = experiment
    dm = AnnDataModule(adata.copy(), batch_key="batch", train_size=0.5, batch_size=64)
    model = SCVI(adata=None, registry=dm.registry, n_hidden=16, n_latent=4)
    model.train(max_epochs=1, datamodule=dm, batch_size=32, train_size=0.8)
    assert len(model.train_indices) == 480
    with pytest.warns(cellvi.errors.TrainingWarning, match="already trained"):
        model.train(max_epochs=1, datamodule=dm)  # the module's own split
    assert len(model.train_indices) == 300
