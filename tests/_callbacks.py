"""Lightning callbacks that break a training run on purpose, shared by the crash tests on the
CPU (``tests/model``) and on a GPU (``tests/gpu``). ``tests/`` is on ``sys.path`` because its
``conftest.py`` is (pytest's default import mode)."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import torch


class SignalAtEpoch(pl.Callback):
    """Sends this process ``signum`` (SIGTERM, as a cluster scheduler would) when ``epoch``
    starts."""

    def __init__(self, epoch: int, signum: int = signal.SIGTERM):
        self.epoch, self.signum = epoch, signum

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), self.signum)


class PoisonAt(pl.Callback):
    """Puts a NaN into a decoder weight at step ``batch_idx`` of ``epoch``, and records the
    weights at the end of the epoch before (the state a rollback must restore)."""

    def __init__(self, epoch: int, batch_idx: int = 0):
        self.epoch, self.batch_idx = epoch, batch_idx
        self.epoch_end_weights: dict[str, torch.Tensor] | None = None

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch - 1:
            self.epoch_end_weights = {
                k: v.detach().clone() for k, v in pl_module.module.state_dict().items()
            }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch_idx:
            with torch.no_grad():
                pl_module.module.decoder.px_scale_decoder.weight[0, 0] = float("nan")

    def assert_rolled_back(self, model) -> None:
        """The model holds exactly the weights recorded before the poisoned epoch."""
        state = model.module.state_dict()
        for name, value in self.epoch_end_weights.items():
            torch.testing.assert_close(state[name], value, msg=name)


class NanGradientAt(PoisonAt):
    """Makes one decoder weight's gradient NaN at one step (the loss there stays finite)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch_idx:
            weight = pl_module.module.decoder.px_scale_decoder.weight
            handle = weight.register_hook(lambda g: (handle.remove(), g * float("nan"))[1])


def resume_checkpoint(error: BaseException) -> str:
    """The ``ckpt_path`` a failed run's error names in its notes."""
    note = next(n for n in error.__notes__ if "ckpt_path='" in n)
    return note.split("ckpt_path='")[1].split("'")[0]
