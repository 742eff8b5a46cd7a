"""train() arguments: trainer configs, log_save_dir, bad input refused before training, and the
state a failed run leaves."""

from __future__ import annotations

import pickle

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import pytest

from cellvi.errors import CellviWarning, SetupError, TrainingWarning
from cellvi.model import SCVI
from cellvi.train import TrainerConfig


def _model(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_hidden=16, n_latent=4)


def _untouched(model) -> bool:
    return not model.is_trained and model.history == {}


# ------------------------------------------------------------------ trainer_config
@pytest.mark.parametrize(
    ("config", "kwargs", "expected"),
    [
        (TrainerConfig(extra_kwargs={"log_every_n_steps": 5}), {}, 5),
        ({"extra_kwargs": {"log_every_n_steps": 5}}, {}, 5),
        ({"log_every_n_steps": 5}, {}, 5),  # a Lightning argument, as in **trainer_kwargs
        ({"log_every_n_steps": 5, "extra_kwargs": {"log_every_n_steps": 9}}, {}, 5),
        ({"log_every_n_steps": 5}, {"log_every_n_steps": 3}, 3),  # train()'s kwargs win
    ],
)
def test_trainer_config_takes_lightning_arguments(sim_tiny, config, kwargs, expected):
    model = _model(sim_tiny)
    model.train(max_epochs=1, trainer_config=config, **kwargs)
    assert model.trainer.log_every_n_steps == expected


def test_trainer_config_max_epochs_accelerator_devices_yield_to_train(sim_tiny):
    model = _model(sim_tiny)
    with pytest.warns(TrainingWarning, match=r"max_epochs=5, which is ignored.*max_epochs=1"):
        model.train(max_epochs=1, trainer_config={"max_epochs": 5})
    assert len(model.history["train_loss"]) == 1
    other = _model(sim_tiny.copy())  # the same values as train()'s: nothing to say
    other.train(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        trainer_config=TrainerConfig(extra_kwargs={"accelerator": "cpu", "devices": 1}),
    )
    assert other.is_trained


def test_a_misspelt_trainer_config_key_is_refused_with_a_suggestion(sim_tiny):
    model = _model(sim_tiny)
    with pytest.raises(
        TypeError,
        match=r"trainer_config got an unknown argument 'log_every_n_step'.*"
        r"Did you mean 'log_every_n_steps'",
    ):
        model.train(max_epochs=1, trainer_config={"log_every_n_step": 5})
    assert _untouched(model)


# -------------------------------------------------------------------- log_save_dir
def test_log_save_dir_writes_each_runs_history_to_a_new_version(sim_tiny, tmp_path):
    models = []
    for _ in range(2):
        model = _model(sim_tiny.copy())
        model.train(max_epochs=2, log_save_dir=str(tmp_path))
        models.append(model)
    for k, model in enumerate(models, start=1):
        folder = tmp_path / "lightning_logs" / f"version_{k}"
        with open(folder / "history.pkl", "rb") as fh:
            history = pickle.load(fh)
        assert sorted(history) == sorted(model.history)
        pd.testing.assert_frame_equal(history["elbo_train"], model.history["elbo_train"])
        table = pd.read_csv(folder / "history.csv")
        assert list(table["epoch"]) == [0, 1]
        np.testing.assert_allclose(table["train_loss"], model.history["train_loss"]["train_loss"])


def test_log_save_dir_that_is_a_file_is_refused_before_training(sim_tiny, tmp_path):
    path = tmp_path / "history"
    path.write_text("")
    model = _model(sim_tiny)
    with pytest.raises(ValueError, match=r"log_save_dir=.*history' is a file"):
        model.train(max_epochs=1, log_save_dir=path)
    assert _untouched(model)


# ------------------------------------------------------------------- bad input
class _NotACellviDataModule(pl.LightningDataModule):
    def train_dataloader(self):
        return None


def test_a_foreign_datamodule_is_refused_naming_what_it_lacks(sim_tiny):
    model = _model(sim_tiny)
    with pytest.raises(ValueError, match=r"datamodule=_NotACellviDataModule lacks manager, n_obs"):
        model.train(max_epochs=None, datamodule=_NotACellviDataModule())
    assert _untouched(model)


@pytest.mark.parametrize(
    ("callbacks", "message"),
    [
        ([object()], r"callbacks holds 1 object\(s\) that are not Lightning callbacks: <object"),
        ("abc", r"callbacks='abc' must be a list of Lightning callbacks"),
        (5, r"callbacks=5 must be a list of Lightning callbacks"),
    ],
)
def test_callbacks_that_are_not_lightning_callbacks_are_refused(sim_tiny, callbacks, message):
    model = _model(sim_tiny)
    with pytest.raises(TypeError, match=message):
        model.train(max_epochs=1, callbacks=callbacks)
    assert _untouched(model)


def test_a_single_callback_needs_no_list(sim_tiny):
    class Count(pl.Callback):
        epochs = 0

        def on_train_epoch_end(self, trainer, pl_module):
            Count.epochs += 1

    model = _model(sim_tiny)
    model.train(max_epochs=2, callbacks=Count())
    assert Count.epochs == 2


@pytest.mark.parametrize(
    ("plan_kwargs", "error", "message"),
    [
        ({"loss_kwargs": {"foo": 1}}, TypeError, r"loss_kwargs has argument\(s\) \['foo'\]"),
        ({"loss_kwargs": {"kl_weight": 0.5}}, ValueError, "loss_kwargs sets 'kl_weight'"),
        ({"lr": float("nan")}, ValueError, r"plan_kwargs .*lr=nan must be a finite number > 0"),
        ({"lr": float("inf")}, ValueError, r"plan_kwargs .*lr=inf must be a finite"),
        ({"lr": 0.0}, ValueError, r"plan_kwargs .*lr=0.0 must be a finite number > 0"),
        ({"eps": -1.0}, ValueError, r"plan_kwargs .*eps=-1.0 must be a finite number >= 0"),
        ({"weight_decay": -1e-3}, ValueError, r"plan_kwargs .*weight_decay=-0.001 must be"),
        (
            {"reduce_lr_on_plateau": True, "lr_factor": 2.0},
            ValueError,
            r"plan_kwargs .*lr_factor=2.0 must be between 0 and 1",
        ),
        (
            {"reduce_lr_on_plateau": True, "lr_factor": 0.0},
            ValueError,
            r"plan_kwargs .*lr_factor=0.0 must be between 0 and 1",
        ),
        ([], TypeError, r"plan_kwargs must be a mapping .*got list"),
    ],
)
def test_bad_plan_kwargs_are_refused_before_training(sim_tiny, plan_kwargs, error, message):
    model = _model(sim_tiny)
    with pytest.raises(error, match=message):
        model.train(max_epochs=2, plan_kwargs=plan_kwargs)
    assert _untouched(model)


def test_datasplitter_kwargs_that_are_not_a_mapping_are_refused(sim_tiny):
    model = _model(sim_tiny)
    with pytest.raises(TypeError, match=r"datasplitter_kwargs must be a mapping .*got list"):
        model.train(max_epochs=1, datasplitter_kwargs=[("drop_last", True)])
    assert _untouched(model)


# ------------------------------------------------------------------ after failure
def test_a_failed_run_leaves_the_untrained_module_in_train_mode(sim_tiny):
    class FailAtEpoch1(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("disk full")

    model = _model(sim_tiny)
    with pytest.raises(RuntimeError, match="disk full"):
        model.train(max_epochs=3, callbacks=[FailAtEpoch1()])
    assert model.module.training
    assert not model.is_trained


# ------------------------------------------------------------------ Lightning's own callbacks
def test_lightnings_learning_rate_monitor_records_the_rate_in_the_history(sim_tiny):
    model = _model(sim_tiny)  # Lightning's monitor alone needs a logger, which cellvi turns off
    model.train(max_epochs=2, callbacks=[pl.callbacks.LearningRateMonitor()])
    assert model.history["lr-Adam"]["lr-Adam"].tolist() == pytest.approx([1e-3, 1e-3])


def test_lightning_monitors_in_callbacks_are_checked_and_get_their_validation(sim_tiny):
    model = _model(sim_tiny)
    stopper = pl.callbacks.EarlyStopping(monitor="elbo_validation", patience=50)
    with pytest.raises(ValueError, match="EarlyStopping in callbacks monitoring 'elbo_valid"):
        model.train(max_epochs=2, train_size=1.0, callbacks=[stopper])
    with pytest.raises(ValueError, match="ModelCheckpoint in callbacks monitoring 'elbo_x'"):
        model.train(max_epochs=2, callbacks=[pl.callbacks.ModelCheckpoint(monitor="elbo_x")])
    with pytest.raises(ValueError, match="limit_val_batches=0"):
        model.train(max_epochs=2, early_stopping=True, limit_val_batches=0)
    assert _untouched(model)
    # without early_stopping=True, validation runs every epoch for the callback's metric
    model.train(max_epochs=2, callbacks=[stopper])
    assert len(model.history["elbo_validation"]) == 2


def test_overfit_batches_and_an_anndata_subset_in_place_are_clear_errors(sim_tiny):
    model = _model(sim_tiny.copy())
    with pytest.raises(ValueError, match="overfit_batches=1 is not supported"):
        model.train(max_epochs=1, overfit_batches=1)  # was a TypeError deep in the loader
    model.adata._inplace_subset_obs(np.arange(50))
    with pytest.raises(SetupError, match="has 50 cells x .* registered with"):
        model.train(max_epochs=1)  # was an IndexError from the gather
    with pytest.raises(SetupError, match="subset or extended in place"):
        with pytest.warns(CellviWarning, match="not been trained"):
            model.get_latent_representation()
    assert _untouched(model)
