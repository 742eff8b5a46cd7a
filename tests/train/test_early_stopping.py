"""Early stopping replays scripted metrics and stops at the exact epoch it should."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from _callbacks import SignalAtEpoch, resume_checkpoint

from cellvi.errors import TrainingError
from cellvi.model import SCVI
from cellvi.train import LoudEarlyStopping


class _Scripted(pl.LightningModule):
    """Logs a scripted validation metric per epoch; trains a dummy parameter."""

    def __init__(self, values):
        super().__init__()
        self.values = values
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.w - batch[0]).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        self.log("elbo_validation", float(self.values[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(values, every=1, **kwargs):
    data = torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)
    callback = LoudEarlyStopping(monitor="elbo_validation", mode="min", **kwargs)
    trainer = pl.Trainer(
        max_epochs=len(values),
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=every,
    )
    trainer.fit(_Scripted(values), train_dataloaders=data, val_dataloaders=data)
    return trainer, callback


def test_early_stopping_stops_after_patience_checks_without_improvement():
    values = [10, 9, 8, 8.5, 8.2, 8.1, 7, 6]  # best at epoch 2, then 3 worse checks
    trainer, callback = _fit(values, patience=3)
    assert trainer.current_epoch == 6  # stopped after the check of epoch index 5
    assert callback.best_epoch == 2
    report = callback.report()
    assert "epoch 6" in report and "epoch 3" in report and "did not improve" in report


def test_early_stopping_warmup_ignores_early_checks():
    values = [5, 6, 7, 8, 1, 2, 3, 4, 5, 6]
    trainer, callback = _fit(values, patience=2, warmup_epochs=4)
    # checks start at epoch 4 (value 1); epochs 5 and 6 do not improve -> stop after epoch 6
    assert trainer.current_epoch == 7
    assert callback.best_epoch == 4


def test_early_stopping_reports_nothing_when_it_never_stops():
    trainer, callback = _fit([5, 4, 3, 2], patience=2)
    assert callback.report() is None
    assert trainer.current_epoch == 4


def test_early_stopping_stops_on_non_finite_metric():
    trainer, callback = _fit([5, 4, float("nan"), 2, 1], patience=10)
    assert trainer.current_epoch == 3
    assert "non-finite" in callback.report()


def test_early_stopping_warmup_counts_validation_checks_not_epochs():
    values = [9, 9, 9, 6, 9, 7, 9, 7.5, 9, 7.2, 9, 9]  # checked at odd epochs only
    trainer, callback = _fit(values, every=2, patience=2, warmup_epochs=2)
    # checks 1-2 (epochs 1, 3) are the warm-up, so epoch 3's low value is not the best;
    # epoch 5 is; epochs 7, 9 do not improve -> stop
    assert trainer.current_epoch == 10
    assert callback.best_epoch == 5
    assert callback.checks_seen == 5


_WARMUP_RUN = {
    "max_epochs": 10,
    "check_val_every_n_epoch": 2,
    "early_stopping": True,
    "early_stopping_warmup_epochs": 2,
    "early_stopping_patience": 1,
    "early_stopping_min_delta": 1e6,  # nothing improves: stop at the first check after the best
}


def _scvi(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_hidden=16, n_latent=4)


def test_train_warmup_counts_checks_and_a_resumed_run_keeps_the_count(sim_tiny):
    # checks at epochs 1, 3 (warm-up), 5 (best), 7 (stop): 8 epochs
    model = _scvi(sim_tiny.copy())
    model.train(**_WARMUP_RUN)
    assert len(model.history["train_loss"]) == 8

    # interrupted after the two warm-up checks: the resumed run must not restart the warm-up
    model = _scvi(sim_tiny.copy())
    with pytest.raises(TrainingError) as info:
        model.train(**_WARMUP_RUN, callbacks=[SignalAtEpoch(4)])
    assert len(model.history["train_loss"]) == 4
    model.train(**_WARMUP_RUN, ckpt_path=resume_checkpoint(info.value))
    assert len(model.history["train_loss"]) == 8
