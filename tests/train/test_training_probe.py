"""Training defects found by a probe: SCANVI's train_loss and classification_ratio settings,
scvi-tools' adversarial_classifier argument, plan_kwargs given as a config object, and
training from non-finite weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cellvi
from cellvi.errors import NonFiniteLossError
from cellvi.model import SCANVI, SCVI
from cellvi.train import TrainingPlanConfig
from cellvi.train._config import SemiSupervisedTrainingPlanConfig

NO_WARMUP = {"n_epochs_kl_warmup": None}  # KL weight 1: train_loss's ELBO part is elbo_train


@pytest.fixture
def sim():
    return cellvi.data.simulate(
        n_cells=300, n_genes=60, n_batches=2, n_cell_types=3, n_de_genes_per_type=5, seed=0
    )


def _scanvi(adata) -> SCANVI:
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[np.random.default_rng(0).random(len(labels)) > 0.5] = "Unknown"
    adata.obs["labels"] = labels
    SCANVI.setup_anndata(adata, labels_key="labels", unlabeled_category="Unknown")
    return SCANVI(adata, n_hidden=16, n_latent=4)


def _scvi(adata) -> SCVI:
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_hidden=16, n_latent=4)


def _gap(model) -> float:
    """train_loss minus elbo_train of the first epoch."""
    h = model.history
    return float(h["train_loss"].iloc[0, 0] - h["elbo_train"].iloc[0, 0])


def test_scanvi_train_loss_is_the_optimised_loss_with_the_classification_term(sim):
    model = _scanvi(sim)
    model.train(max_epochs=1, plan_kwargs={**NO_WARMUP, "on_step": True})
    h = model.history
    ce = float(h["train_classification_loss"].iloc[0, 0])
    # scvi-tools logs SCANVAE's loss, which adds classification_ratio x cross-entropy
    assert _gap(model) == pytest.approx(50 * ce, rel=0.3)
    # and the epoch value is the cell-weighted mean of the per-step losses
    assert float(h["train_loss"].iloc[0, 0]) == pytest.approx(
        float(h["train_loss_step"]["train_loss_step"].mean()), rel=0.02
    )
    # validation_loss and the ELBO metrics stay without it
    assert "validation_loss" not in h


def test_scanvi_takes_classification_ratio_from_plan_config(sim):
    model = _scanvi(sim)
    model.train(max_epochs=1, plan_config={"classification_ratio": 0.0, **NO_WARMUP})
    assert model.trainer.lightning_module.classification_ratio == 0.0
    assert _gap(model) == pytest.approx(0.0, abs=1e-3)


def test_scanvi_plan_kwargs_ratio_wins_over_a_structured_config(sim):
    model = _scanvi(sim)
    config = SemiSupervisedTrainingPlanConfig(classification_ratio=3.0, lr=2e-3)
    model.train(max_epochs=2, plan_config=config, plan_kwargs={"classification_ratio": 7.0})
    plan = model.trainer.lightning_module
    assert plan.classification_ratio == 7.0
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == 2e-3
    # the config's default warm-up (400 epochs) is still adapted to max_epochs
    assert model.history["kl_weight"]["kl_weight"].iloc[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("ratio", ["x", -1.0, math.nan, math.inf, True])
def test_a_bad_classification_ratio_is_refused_before_training(sim, ratio):
    model = _scanvi(sim)
    with pytest.raises(ValueError, match="classification_ratio"):
        model.train(max_epochs=1, plan_kwargs={"classification_ratio": ratio})
    assert not model.is_trained
    with pytest.raises((ValueError, TypeError), match="classification_ratio"):
        SemiSupervisedTrainingPlanConfig(classification_ratio=ratio)


def test_scanvi_accepts_scvi_tools_adversarial_classifier_argument(sim):
    model = _scanvi(sim)
    with pytest.raises(ValueError, match="adversarial_classifier=True"):
        model.train(max_epochs=1, adversarial_classifier=True)
    model.train(max_epochs=1, adversarial_classifier=False)
    assert model.is_trained


def test_a_config_object_given_as_plan_kwargs_sets_only_its_own_fields(sim):
    model = _scvi(sim)
    # like plan_config=TrainingPlanConfig(lr=...): the default warm-up is adapted, no warning
    model.train(max_epochs=2, plan_kwargs=TrainingPlanConfig(lr=1e-2))
    assert model.trainer.optimizers[0].param_groups[0]["lr"] == 1e-2
    assert model.history["kl_weight"]["kl_weight"].iloc[-1] == pytest.approx(1.0)


def test_training_from_non_finite_weights_is_refused_before_training(sim):
    model = _scvi(sim)
    weight = model.module.z_encoder.encoder.blocks[0].linear.linear.weight
    with torch.no_grad():
        weight[0, 0] = math.nan
    with pytest.raises(NonFiniteLossError, match="already NaN/inf before training"):
        model.train(max_epochs=1)
    assert not model.is_trained and not model.history


def test_a_nan_in_the_first_epoch_says_the_starting_weights_were_restored(sim):
    model = _scvi(sim)
    start = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.raises(NonFiniteLossError) as err:
        model.train(max_epochs=2, plan_kwargs={"lr": 1e6})
    assert "epoch 1" in str(err.value)
    assert "those this run started from" in str(err.value)
    assert "previous epoch" not in str(err.value)
    for key, value in model.module.state_dict().items():
        torch.testing.assert_close(value, start[key])


def test_scanvi_predict_of_no_cells_and_of_a_mask(sim):
    model = _scanvi(sim)
    model.train(max_epochs=1)
    assert model.predict(indices=[]).shape == (0,)
    soft = model.predict(indices=[], soft=True)
    assert soft.shape == (0, len(model.labels_)) and list(soft.columns) == model.labels_
    mask = np.arange(sim.n_obs) % 2 == 0
    by_mask = model.predict(indices=mask, soft=True)
    assert list(by_mask.index) == list(sim.obs_names[mask])
    np.testing.assert_allclose(by_mask.to_numpy(), model.predict(soft=True).to_numpy()[mask])


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_an_impossible_gradient_clip_value_is_refused_before_training(sim, value):
    model = _scvi(sim)
    with pytest.raises(ValueError, match="gradient_clip_val=.* must be a finite number >= 0"):
        model.train(max_epochs=1, gradient_clip_val=value)
    assert not model.is_trained
