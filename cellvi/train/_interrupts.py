"""Ctrl-C and a scheduler's SIGTERM stop training at the next step boundary, not mid-call.

A signal handler that raises at once lands wherever the main thread happens to be: inside
``inspect``, a data loader or an optimizer step, where library code may catch it as an
ordinary exception and turn it into something else (``inspect.getfullargspec`` reports
``TypeError('unsupported callable')``). So the first signal is only recorded; a callback raises
:class:`TrainingInterrupted` at the next batch boundary, where the weights are consistent. A
second signal raises at once, for a run that is stuck inside one call.
"""

from __future__ import annotations

import signal
import threading

import lightning.pytorch as pl

from ..errors import TrainingError

__all__ = ["TrainingInterrupted", "InterruptGuard"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(TrainingError):
    """Training was stopped by Ctrl-C (SIGINT) or a scheduler's SIGTERM."""


class InterruptGuard(pl.Callback):
    """Owns the SIGINT/SIGTERM handlers while a fit runs (``with guard:``) and raises
    :class:`TrainingInterrupted` at the first batch boundary after a signal.

    Lightning answers Ctrl-C with ``sys.exit``; raising our own exception instead lets the
    runner keep weights and history and say how to resume. Outside the main thread (where
    handlers cannot be installed) the guard does nothing.
    """

    def __init__(self) -> None:
        self.pending: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.pending is not None:  # asked twice: the run may be stuck inside one call
            raise TrainingInterrupted(f"Training was interrupted by {name} (sent twice).")
        self.pending = name

    def check(self) -> None:
        """Raise :class:`TrainingInterrupted` if a signal arrived since the guard started."""
        if self.pending is not None:
            raise TrainingInterrupted(f"Training was interrupted by {self.pending}.")

    def __enter__(self) -> InterruptGuard:
        self.pending = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.getsignal(s) for s in _SIGNALS}
            for s in _SIGNALS:
                signal.signal(s, self._handler)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
        if exc_type is None:  # the signal came after the last batch: still honour it
            self.check()

    # the batch boundaries at which a recorded signal stops the run
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.check()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.check()

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.check()
