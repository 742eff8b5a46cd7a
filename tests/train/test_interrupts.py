"""A signal stops training at a batch boundary; code running when it arrives is not hit."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import pytest

from cellvi.model import SCVI
from cellvi.train import TrainingInterrupted
from cellvi.train._interrupts import InterruptGuard


class SignalInsideCatchAll(pl.Callback):
    """Sends SIGTERM from inside ``try/except Exception`` at the first step of ``epoch``, as when
    a signal lands inside library code that swallows exceptions; ``again`` sends a second one
    after it, outside the ``try``."""

    def __init__(self, epoch: int, again: bool = False):
        self.epoch, self.again = epoch, again
        self.swallowed: list[BaseException] = []
        self.finished_callback = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch != self.epoch or batch_idx != 0:
            return
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))  # bytecode after the kill, where a handler would run
        except Exception as err:  # the catch-all under test
            self.swallowed.append(err)
        if self.again:
            os.kill(os.getpid(), signal.SIGTERM)
            sum(range(1000))
        self.finished_callback = True


def _model(adata):
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_hidden=16, n_latent=4)


def test_signal_is_not_raised_inside_running_code_but_at_the_next_batch(sim_tiny):
    model = _model(sim_tiny)
    probe = SignalInsideCatchAll(epoch=1)
    with pytest.raises(TrainingInterrupted, match="interrupted by SIGTERM"):
        model.train(max_epochs=4, callbacks=[probe])
    assert probe.swallowed == [] and probe.finished_callback
    assert list(model.history["elbo_train"].index) == [0]  # epoch 1 never finished


def test_a_second_signal_interrupts_at_once(sim_tiny):
    model = _model(sim_tiny)
    probe = SignalInsideCatchAll(epoch=1, again=True)
    with pytest.raises(TrainingInterrupted, match="sent twice"):
        model.train(max_epochs=4, callbacks=[probe])
    assert not probe.finished_callback  # the second signal did not wait for the boundary


def test_guard_gives_handlers_back_and_honours_a_late_signal():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="SIGTERM"), InterruptGuard():
        os.kill(os.getpid(), signal.SIGTERM)  # after the last batch: raised on leaving
    assert signal.getsignal(signal.SIGTERM) is before
    with InterruptGuard() as guard:  # no signal: nothing raised, nothing pending
        pass
    assert guard.pending is None


def test_a_rank_other_than_0_points_to_rank_0_for_the_checkpoint(tmp_path):
    from types import SimpleNamespace

    from cellvi.train._runner import RunResult, _annotate

    rows = [{"epoch": 0, "elbo_train": 1.0}]
    for rank, expected in (
        (1, "This is rank 1: rank 0's error names the checkpoint"),
        (0, "No resumable checkpoint was written"),
    ):
        result = RunResult(
            history_rows=rows, run_dir=tmp_path, trainer=SimpleNamespace(global_rank=rank)
        )
        err = TrainingInterrupted("Training was interrupted by SIGTERM.")
        _annotate(err, result, max_epochs=5)
        assert expected in "\n".join(err.__notes__)
        assert ("history.csv" in err.__notes__[0]) == (rank == 0)  # rank 0 writes the folder
