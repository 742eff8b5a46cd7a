"""Probes of the "Where cellvi goes further" rows of data.md and of its data contracts."""

from __future__ import annotations

import anndata
import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellvi
from cellvi.data import check_count_matrix, read_backed, read_collection
from cellvi.errors import InvalidDataError
from cellvi.model import SCANVI, SCVI


def _adata(n=60, g=15, seed=0, n_empty=4, sparse=True):
    """Counts whose first ``n_empty`` cells are all zero, and positive size factors."""
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(n, g)).astype(np.float32)
    x[:, 0] += 1
    x[:n_empty] = 0
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical(np.tile(["a", "b"], n // 2)),
            "labels": pd.Categorical(np.tile(["t1", "t2", "t3", "Unknown"], n // 4)),
            "sf": np.r_[np.full(n_empty, 0.3), rng.uniform(0.5, 2.0, n - n_empty)],
        },
        index=[f"c{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"g{i}" for i in range(g)])
    return anndata.AnnData(X=sp.csr_matrix(x) if sparse else x, obs=obs, var=var)


# ----------------------------------------------------------- zero-count cells with size factors
def test_zero_count_cells_are_still_refused_without_size_factors():
    with pytest.raises(InvalidDataError, match=r"4 cell\(s\).*zero total counts.*size_factor_key"):
        SCVI.setup_anndata(_adata(), batch_key="batch")


@pytest.mark.parametrize("sparse", [True, False])
def test_zero_count_cells_train_with_size_factors_to_finite_losses(sparse):
    adata = _adata(sparse=sparse)
    SCVI.setup_anndata(adata, batch_key="batch", size_factor_key="sf")
    model = SCVI(adata, n_latent=2, n_hidden=16)
    model.train(max_epochs=2, batch_size=16, train_size=0.75, check_val_every_n_epoch=1)
    for key in ("train_loss", "elbo_train", "elbo_validation"):
        assert np.isfinite(model.history[key].to_numpy()).all(), key
    empty = adata[:4].copy()
    assert np.isfinite(model.get_latent_representation(empty)).all()
    assert np.isfinite(model.get_elbo(empty))
    assert np.isfinite(model.get_normalized_expression(empty).to_numpy()).all()


def test_scanvi_trains_on_zero_count_cells_with_size_factors():
    adata = _adata()
    SCANVI.setup_anndata(
        adata, labels_key="labels", unlabeled_category="Unknown", size_factor_key="sf"
    )
    model = SCANVI(adata, n_latent=2, n_hidden=16)
    model.train(max_epochs=1, batch_size=16, check_val_every_n_epoch=1)
    for key in ("train_loss", "validation_loss", "train_classification_loss"):
        assert np.isfinite(model.history[key].to_numpy()).all(), key
    assert set(model.predict(adata[:4].copy())) <= {"t1", "t2", "t3"}


@pytest.mark.parametrize(
    ("value", "match"),
    [(0.0, r"must be > 0.*1 cell.*\[.c0.\].*Recompute"), (np.nan, "has 1 NaN/infinite")],
)
def test_size_factors_stay_positive_and_finite_with_zero_count_cells(value, match):
    adata = _adata()
    adata.obs.loc["c0", "sf"] = value
    with pytest.raises(InvalidDataError, match=rf"obs column 'sf' {match}"):
        SCVI.setup_anndata(adata, size_factor_key="sf")


def test_a_model_with_size_factors_accepts_new_data_with_zero_count_cells():
    train = _adata(n_empty=0)
    SCVI.setup_anndata(train, size_factor_key="sf")
    model = SCVI(train, n_latent=2, n_hidden=16)
    model.train(max_epochs=1, batch_size=16)
    assert np.isfinite(model.get_latent_representation(_adata(seed=1))).all()


def test_zero_count_cells_on_disk_are_accepted_with_size_factors(tmp_path):
    paths = []
    for i in range(2):
        part = _adata(n=20, seed=i, n_empty=2 * i)
        paths.append(tmp_path / f"part{i}.h5ad")
        part.write_h5ad(paths[-1])
    for adata in (read_backed(paths[1]), read_collection(paths)):
        with pytest.raises(InvalidDataError, match="2 cell"):
            SCVI.setup_anndata(adata)
        SCVI.setup_anndata(adata, size_factor_key="sf")
    model = SCVI(adata, n_latent=2, n_hidden=16)
    model.train(max_epochs=1, batch_size=16)
    assert np.isfinite(model.history["train_loss"].to_numpy()).all()


def test_count_check_option_allows_empty_rows_but_not_bad_values():
    x = np.array([[0.0, 0.0], [1.0, 2.0]])
    assert check_count_matrix(x, "adata.X", allow_empty_rows=True) == 0
    x[1, 0] = -1
    with pytest.raises(InvalidDataError, match="negative"):
        check_count_matrix(x, "adata.X", allow_empty_rows=True)


# ------------------------------------------------ data.md: SCANVI resampling with user callbacks
class _LabeledCells(pl.Callback):
    """Records the labeled cells of every training minibatch, per epoch."""

    def __init__(self):
        self.seen: dict[int, set] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        cells = batch["labeled"]["ind_x"].ravel().tolist()
        self.seen.setdefault(trainer.current_epoch, set()).update(cells)


def test_scanvi_redraws_labeled_cells_each_epoch_when_the_user_passes_callbacks():
    adata = cellvi.data.synthetic_iid(batch_size=60, n_genes=20, n_labels=3)
    adata.obs["labels"] = adata.obs["labels"].astype(str)
    adata.obs.loc[adata.obs_names[::4], "labels"] = "Unknown"
    SCANVI.setup_anndata(adata, labels_key="labels", unlabeled_category="Unknown")
    recorder = _LabeledCells()
    model = SCANVI(adata, n_latent=2, n_hidden=16)
    model.train(max_epochs=2, n_samples_per_label=2, batch_size=16, callbacks=[recorder])
    draws = [frozenset(recorder.seen[e]) for e in range(2)]
    assert all(len(d) <= 6 for d in draws)  # 3 classes x 2 cells
    assert draws[0] != draws[1]  # redrawn, not one subset for the whole run


# ------------------------------------------------------------------ data.md §1 edge cases
@pytest.mark.parametrize("unlabeled", [None, np.nan])
def test_a_missing_unlabeled_category_is_refused_with_an_example(unlabeled):
    adata = _adata(n_empty=0)
    with pytest.raises(InvalidDataError, match=r"unlabeled_category=.*e\.g\. unlabeled_category="):
        SCANVI.setup_anndata(adata, labels_key="labels", unlabeled_category=unlabeled)
    assert "_cellvi_labels" not in adata.obs


def _int_batch_model():
    adata = _adata(n_empty=0)
    adata.obs["batch"] = np.tile([1, 2], adata.n_obs // 2)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_latent=2, n_hidden=16)
    model.train(max_epochs=1, batch_size=16)
    return model


def test_batch_values_of_another_type_are_named_not_taken_for_new_batches():
    model = _int_batch_model()
    query = _adata(n_empty=0, seed=1)
    query.obs["batch"] = np.tile(["1", "2"], query.n_obs // 2)  # e.g. read back from a CSV
    fix = r"holds '1' \(str\) where the model has 1 \(int\).*\.astype\(int\)"
    with pytest.raises(InvalidDataError, match=fix):
        model.get_latent_representation(query)
    with pytest.raises(InvalidDataError, match=fix):  # not silently added as new batches
        SCVI.load_query_data(query, model)
    query.obs["batch"] = query.obs["batch"].astype(int)
    assert model.get_latent_representation(query).shape == (query.n_obs, 2)


# ------------------------------------------------- training.md: a strategy set only in a config
def test_a_strategy_given_only_in_trainer_config_decides_distributed_sampling():
    adata = _adata(n=4, n_empty=0)
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_latent=2, n_hidden=8)
    # refused by the distributed splitter before any process starts (1 training cell per rank)
    with pytest.raises(ValueError, match=r"on 2 processes leave 1 cell"):
        model.train(
            max_epochs=1,
            accelerator="cpu",
            devices=2,
            train_size=0.5,
            trainer_config={"strategy": "ddp_notebook"},
        )
    assert not model.is_trained
