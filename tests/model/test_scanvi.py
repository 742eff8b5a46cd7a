"""SCANVI: label transfer from a few labeled cells, pretraining from SCVI, persistence."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse
import torch

import cellvi
from cellvi.errors import CellviWarning, InvalidDataError, SetupError, SmallCategoryWarning
from cellvi.model import SCANVI, SCVI


@pytest.fixture
def labeled_sim():
    adata = cellvi.data.simulate(n_cells=800, n_genes=150, n_batches=2, n_cell_types=4, seed=5)
    rng = np.random.default_rng(0)
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    hidden = rng.random(adata.n_obs) > 0.15  # 15 % of the cells keep their label
    labels[hidden] = "Unknown"
    adata.obs["labels"] = labels
    return adata, hidden


def test_scanvi_from_scvi_predicts_hidden_labels(labeled_sim):
    adata, hidden = labeled_sim
    SCVI.setup_anndata(adata, batch_key="batch")
    scvi_model = SCVI(adata, n_latent=10)
    scvi_model.train(max_epochs=100, plan_kwargs={"n_epochs_kl_warmup": 10})
    model = SCANVI.from_scvi_model(scvi_model, "Unknown", labels_key="labels")
    for name, value in scvi_model.module.z_encoder.state_dict().items():
        torch.testing.assert_close(model.module.z_encoder.state_dict()[name], value)
    assert model.was_pretrained_
    model.train(max_epochs=20, check_val_every_n_epoch=1)
    assert len(model.history["elbo_train"]) == 20
    acc = model.history["train_accuracy"]["train_accuracy"]
    assert acc.iloc[-1] >= acc.iloc[0] and "validation_accuracy" in model.history
    pred = model.predict()
    truth = adata.obs["cell_type"].astype(str).to_numpy()
    # models.md: accuracy on unlabeled cells >= 0.9 (reference 0.99)
    assert (pred[hidden] == truth[hidden]).mean() >= 0.9
    soft = model.predict(soft=True)
    np.testing.assert_allclose(soft.sum(axis=1), 1, rtol=1e-5)
    assert (soft.columns[soft.to_numpy().argmax(1)] == pred).all()
    # columns in code order: sorted labels with "Unknown" swapped into the last code
    assert list(soft.columns) == model.labels_ == ["type_3", "type_0", "type_1", "type_2"]
    # sparse counts reach the encoder as sparse rows; the same counts made dense agree
    assert scipy.sparse.issparse(adata.X)
    dense = adata.copy()
    dense.X = dense.X.toarray()
    np.testing.assert_allclose(model.predict(dense, soft=True), soft, rtol=1e-4, atol=1e-5)


def test_scanvi_setup_puts_unlabeled_last_and_rejects_unseen_labels(labeled_sim, tmp_path):
    adata, _ = labeled_sim
    SCANVI.setup_anndata(
        adata, labels_key="labels", unlabeled_category="Unknown", batch_key="batch"
    )
    model = SCANVI(adata, n_hidden=16, n_latent=4)
    assert model.get_state_registry("labels")["categorical_mapping"][-1] == "Unknown"
    assert model.n_classes == 4
    model.train(max_epochs=2)
    model.save(tmp_path / "m")
    loaded = SCANVI.load(tmp_path / "m", adata=adata.copy())
    np.testing.assert_array_equal(loaded.predict(), model.predict())
    other = adata.copy()
    other.obs["labels"] = other.obs["labels"].replace({"type_0": "type_9"})
    with pytest.raises(InvalidDataError, match=r"labels the model has not seen: \['type_9'\]"):
        SCANVI.load(tmp_path / "m", adata=other)


def test_from_untrained_scvi_warns_as_scvi_tools_does(labeled_sim):
    adata, _ = labeled_sim
    SCVI.setup_anndata(adata)
    with pytest.warns(CellviWarning, match="has not been trained"):
        model = SCANVI.from_scvi_model(SCVI(adata), "Unknown", labels_key="labels")
    assert not model.is_trained


def test_from_scvi_model_drops_repeated_architecture_with_a_warning(labeled_sim):
    adata, _ = labeled_sim
    SCVI.setup_anndata(adata, batch_key="batch")
    scvi_model = SCVI(adata, n_latent=6)
    with cellvi.settings.override(progress_bar_style="none"):
        scvi_model.train(max_epochs=1, save_resume_checkpoint=False)
    with pytest.warns(CellviWarning, match=r"ignored: n_latent=20 \(the SCVI has 6\)"):
        model = SCANVI.from_scvi_model(
            scvi_model, "Unknown", labels_key="labels", n_latent=20, n_hidden=128
        )
    assert model.module.config.n_latent == 6  # the SCVI's, so its weights fit
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['n_epochs'\]"):
        SCANVI.from_scvi_model(scvi_model, "Unknown", labels_key="labels", n_epochs=3)


def test_from_scvi_model_takes_the_same_activation_written_as_a_torch_object(labeled_sim):
    adata, _ = labeled_sim
    SCVI.setup_anndata(adata, batch_key="batch")
    scvi_model = SCVI(
        adata,
        n_latent=6,
        var_activation="softplus",
        extra_encoder_kwargs={"activation_fn": "leaky_relu"},
    )
    with cellvi.settings.override(progress_bar_style="none"):
        scvi_model.train(max_epochs=1, save_resume_checkpoint=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same choices: nothing to warn about
        model = SCANVI.from_scvi_model(
            scvi_model,
            "Unknown",
            labels_key="labels",
            var_activation=torch.nn.functional.softplus,
            extra_encoder_kwargs={"activation_fn": torch.nn.LeakyReLU},
        )
    assert model.module.config.var_activation == "softplus"
    with pytest.warns(CellviWarning, match=r"ignored: var_activation=<built-in method exp"):
        SCANVI.from_scvi_model(scvi_model, "Unknown", labels_key="labels", var_activation=torch.exp)


def test_scanvi_query_mapping_predicts_labels_of_a_new_batch():
    adata = cellvi.data.simulate(n_cells=900, n_genes=120, n_batches=3, n_cell_types=3, seed=8)
    adata.obs["labels"] = adata.obs["cell_type"].astype(str)
    ref = adata[adata.obs["batch"] != "batch_2"].copy()
    query = adata[adata.obs["batch"] == "batch_2"].copy()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    query.obs["labels"] = "Unknown"
    query.obs.iloc[:5, query.obs.columns.get_loc("labels")] = "novel_type"
    SCANVI.setup_anndata(ref, labels_key="labels", unlabeled_category="Unknown", batch_key="batch")
    reference = SCANVI(ref, n_latent=8)
    reference.train(max_epochs=60, plan_kwargs={"n_epochs_kl_warmup": 10})
    # data.md §1.3: an unseen label is refused, also in query mapping; the message's own
    # code marks the novel cells as unlabeled
    with pytest.raises(InvalidDataError, match=r"not seen: \['novel_type'\] \(5 cell") as err:
        SCANVI.load_query_data(query, reference)
    fix = str(err.value).split("e.g. ", 1)[1].rstrip(".")
    exec(fix, {"adata": query})
    assert (query.obs["labels"] == "Unknown").all()
    q = SCANVI.load_query_data(query, reference)
    assert q.summary_stats["n_batch"] == 3
    classifier_before = {k: v.clone() for k, v in q.module.classifier.state_dict().items()}
    q.train(max_epochs=40, plan_kwargs={"weight_decay": 0.0})
    for name, value in q.module.classifier.state_dict().items():
        if not name.endswith("num_batches_tracked"):  # a counter, not a weight
            assert torch.equal(value, classifier_before[name]), name  # classifier stays frozen
    # three planted types; the frozen classifier labels the mapped batch
    assert (q.predict() == truth).mean() >= 0.9


def test_labels_with_no_known_class_are_refused_before_training():
    adata = cellvi.data.simulate(n_cells=200, n_genes=100, n_batches=2, seed=1)
    adata.obs["labels"] = "Unknown"
    SCANVI.setup_anndata(adata, labels_key="labels", unlabeled_category="Unknown")
    with pytest.raises(SetupError, match=r"every cell of obs\['labels'\] is the unlabeled"):
        SCANVI(adata)
    SCVI.setup_anndata(adata, batch_key="batch")
    scvi_model = SCVI(adata, n_hidden=16, n_latent=4)
    scvi_model.train(max_epochs=1, plan_kwargs={"n_epochs_kl_warmup": 1})
    with pytest.raises(SetupError, match="train SCVI on unlabeled data"):
        SCANVI.from_scvi_model(scvi_model, "Unknown", labels_key="labels")


@pytest.mark.parametrize("n_labeled", [1, 129])
def test_a_labeled_minibatch_of_one_cell_does_not_break_batch_norm(n_labeled):
    # 129 labeled training cells at batch size 128 used to end in a one-cell minibatch,
    # and batch normalisation raised mid-training; a lone labeled cell did the same
    adata = cellvi.data.simulate(n_cells=400, n_genes=100, n_batches=2, n_cell_types=3, seed=2)
    labels = np.full(adata.n_obs, "Unknown", dtype=object)
    labels[:n_labeled] = adata.obs["cell_type"].astype(str).to_numpy()[:n_labeled]
    adata.obs["labels"] = labels
    with warnings.catch_warnings():  # the lone cell's class is tiny, and that is the point
        warnings.simplefilter("ignore", SmallCategoryWarning)
        SCANVI.setup_anndata(adata, labels_key="labels", unlabeled_category="Unknown")
    model = SCANVI(adata, n_hidden=16, n_latent=4)
    with cellvi.settings.override(progress_bar_style="none"):
        model.train(
            max_epochs=2, train_size=1.0, batch_size=128, plan_kwargs={"n_epochs_kl_warmup": 2}
        )
    assert len(model.history["train_accuracy"]) == 2
    assert np.isfinite(model.history["elbo_train"].to_numpy()).all()


def test_an_unlabeled_category_of_the_wrong_type_is_refused(labeled_sim):
    adata, _ = labeled_sim
    adata = adata.copy()
    codes = adata.obs["cell_type"].astype("category").cat.codes.to_numpy().astype(int)
    codes[::3] = -1  # integer labels, -1 for unlabelled cells
    adata.obs["lab"] = codes
    with pytest.raises(InvalidDataError, match=r"unlabeled_category='-1' \(str\).*but -1 \(int\)"):
        SCANVI.setup_anndata(adata, labels_key="lab", unlabeled_category="-1")
    SCANVI.setup_anndata(adata, labels_key="lab", unlabeled_category=-1)
    assert SCANVI(adata, n_hidden=8, n_latent=2).n_classes == 4  # -1 is not a class
