"""train() option combinations that used to fail: the plateau scheduler with sparse validation
or a resumed run, and a KeyboardInterrupt raised inside training."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

import cellvi
from cellvi.model import SCANVI, SCVI
from cellvi.train import TrainingInterrupted


@pytest.fixture
def sim():
    return cellvi.data.simulate(n_cells=200, n_genes=60, n_batches=2, n_cell_types=2, seed=0)


def _model(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_hidden=16, n_latent=4)


class RaiseAtEpoch(pl.Callback):
    def __init__(self, epoch: int, exc: type[BaseException] = RuntimeError):
        self.epoch, self.exc = epoch, exc

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise self.exc("stopped on purpose")


def _resume_path(err: BaseException) -> str:
    note = next(n for n in err.__notes__ if "ckpt_path=" in n)
    return note.split("ckpt_path='")[1].split("'")[0]


# lr_patience=0 with a metric that always rises (the KL weight): the LR drops every check
_PLATEAU = {
    "reduce_lr_on_plateau": True,
    "lr_patience": 0,
    "lr_scheduler_metric": "kl_weight",
    "n_epochs_kl_warmup": 5,
}


def test_plateau_scheduler_with_validation_every_other_epoch(sim):
    model = _model(sim)
    plan_kwargs = {"reduce_lr_on_plateau": True, "lr_patience": 0, "lr_threshold": 1e9}
    model.train(max_epochs=6, check_val_every_n_epoch=2, plan_kwargs=plan_kwargs)
    assert list(model.history["elbo_validation"].index) == [1, 3, 5]
    # stepped after the validation epochs only: the first check sets the best value, each
    # later one (no improvement by 1e9) reduces the LR used from the next epoch on
    lrs = model.history["lr-Adam"]["lr-Adam"].to_numpy()
    np.testing.assert_allclose(lrs, [1e-3] * 4 + [6e-4] * 2)


def test_resume_with_plateau_scheduler_equals_an_uninterrupted_run(sim):
    kwargs = {"max_epochs": 5, "plan_kwargs": _PLATEAU}
    whole = _model(sim)
    whole.train(**kwargs)
    lrs = whole.history["lr-Adam"]["lr-Adam"].to_numpy()
    np.testing.assert_allclose(lrs, 1e-3 * 0.6 ** np.array([0, 0, 1, 2, 3]))

    part = _model(sim.copy())
    with pytest.raises(RuntimeError, match="stopped on purpose") as info:
        part.train(callbacks=[RaiseAtEpoch(3)], **kwargs)
    part.train(ckpt_path=_resume_path(info.value), **kwargs)
    np.testing.assert_allclose(part.history["lr-Adam"]["lr-Adam"].to_numpy(), lrs)
    for name, frame in whole.history.items():
        np.testing.assert_allclose(part.history[name].to_numpy(), frame.to_numpy(), err_msg=name)
    for key, value in whole.module.state_dict().items():
        assert torch.equal(part.module.state_dict()[key], value), key


def test_keyboard_interrupt_inside_a_callback_is_an_interruption_not_system_exit(sim):
    model = _model(sim)
    with pytest.raises(TrainingInterrupted, match="KeyboardInterrupt") as info:
        model.train(max_epochs=4, callbacks=[RaiseAtEpoch(2, KeyboardInterrupt)])
    assert isinstance(info.value.__cause__, KeyboardInterrupt)
    assert list(model.history["train_loss"].index) == [0, 1]
    assert not model.is_trained
    model.train(max_epochs=4, ckpt_path=_resume_path(info.value))
    assert list(model.history["train_loss"].index) == [0, 1, 2, 3]


def test_monitoring_a_classification_metric_of_a_split_without_labels_fails_before_training(sim):
    sim.obs["label"] = "Unknown"
    sim.obs.loc[sim.obs.index[:3], "label"] = "A"
    SCANVI.setup_anndata(sim, batch_key="batch", labels_key="label", unlabeled_category="Unknown")
    model = SCANVI(sim, n_hidden=16, n_latent=4)
    # the 3 labeled cells all go to the training set (ceil(0.9 x 3)): none to validation
    with pytest.raises(ValueError, match="validation set has no labeled cells"):
        model.train(
            max_epochs=3,
            early_stopping=True,
            early_stopping_monitor="validation_accuracy",
            early_stopping_mode="max",
        )
    assert model.history == {} and not model.is_trained


@pytest.mark.parametrize("reload", [False, True])
def test_resuming_a_finished_run_replaces_its_rows_instead_of_repeating_them(sim, tmp_path, reload):
    model = _model(sim)
    model.train(max_epochs=3, batch_size=100, plan_kwargs={"on_step": True})
    last = next((tmp_path / "cellvi_log").glob("SCVI_*/checkpoints/last.ckpt"))
    if reload:  # the saved model's history holds the run whose checkpoint is resumed
        model.save(tmp_path / "saved")
        model = SCVI.load(tmp_path / "saved", adata=sim)
    model.train(max_epochs=5, batch_size=100, ckpt_path=last, plan_kwargs={"on_step": True})
    assert list(model.history["train_loss"].index) == [0, 1, 2, 3, 4]
    assert list(model.history["train_loss_step"].index) == list(range(10))
