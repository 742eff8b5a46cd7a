"""Early stopping replays scripted metrics and stops at the exact epoch it should."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

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


def _fit(values, **kwargs):
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
